"""Test-only pixel sources for the hybrid router: what a VLM "sees" in an image, scripted per input.

Two kinds, both :class:`~onevlm.router.backend.RouterBackend` s that never touch the pixels (so
tests and ``bench/fusion_bench.py`` exercise the real router, cascade and fusion without a model):

- :class:`FixedPixels`: an exact distribution per file name and stage (unit and end-to-end tests).
- :class:`ConfusedPixels`: a pixel model with a stated confusion, drawn per input from its true
  modality and finding (the bench). Per image a latent *clarity* ``c ~ U(0, 1)`` (one per stage)
  sets both how often the model is right and how sure it says it is: stage 1 is right with
  probability ``stage1_floor + stage1_gain * c`` (85 % on average by default) and otherwise
  answers a neighbouring modality (same organ on another scanner, or the same scanner on another
  organ); stage 2 is right with probability ``stage2_floor + stage2_gain * c`` (70 % on average)
  and otherwise answers another finding of the modality's cards. The answer it gives gets
  ``0.5 + 0.45 c`` (stage 1) or ``0.4 + 0.5 c`` (stage 2); the runner-up (the truth when wrong, a
  neighbour when right) gets 60 % of the rest; the remainder is spread. Deterministic: the draws
  depend on the seed, the file name and the stage only.

Like the ``transformers`` backend, both answer ``None`` with certainty for an object without
pixels (they read its SOP class) and make one VLM call per image stage.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from typing import Mapping, Sequence

from onevlm.router.backend import NONE, OTHER, Candidate, Consultation, StageRequest, StageResponse

PIXELS = Consultation(("pixels",), "scripted pixel source (tests)", vlm_calls=1)


def _non_image(item) -> StageResponse | None:
    kind = item.header.non_image_kind if item.header is not None else None
    if kind is None:
        return None
    return StageResponse((Candidate(NONE, 1.0),), {"method": "sop-class", "pixels_read": False},
                         distribution={NONE: 1.0},
                         consultation=Consultation(("header",), f"no pixels: the SOP class says {kind}"))


def _response(probs: Mapping[str, float], full: bool) -> StageResponse:
    ranked = sorted(probs.items(), key=lambda kv: -kv[1])
    candidates = tuple(Candidate(a, min(p, 1.0), math.log(max(p, 1e-12))) for a, p in ranked[:2])
    return StageResponse(candidates, {"method": "scripted-pixels", "pixels_read": True},
                         distribution=dict(probs) if full else None, consultation=PIXELS)


class FixedPixels:
    """Exact answers: ``answers[file name][stage] = {answer: p}``; unknown inputs get a flat distribution.

    ``full=False`` reports only the top two answers (as a free-text VLM does). ``calls`` counts the
    (file name, stage) pairs asked, in order.
    """

    name = "scripted-pixels"

    def __init__(self, answers: Mapping[str, Mapping[int, Mapping[str, float]]], full: bool = True) -> None:
        self.answers = answers
        self.full = full
        self.calls: list[tuple[str, int]] = []

    def identity(self) -> dict:
        return {"backend": "transformers", "fingerprint": "scripted-fixed", "quantize": "none", "answer_mode": "options",
                "pixels_read": True}

    def warm_up(self) -> None:
        pass

    def answer(self, items: Sequence, requests: Sequence[StageRequest]) -> list[StageResponse]:
        out = []
        for item, request in zip(items, requests):
            shortcut = _non_image(item) if request.stage == 1 else None
            if shortcut is not None:
                out.append(shortcut)
                continue
            self.calls.append((item.path.name, request.stage))
            probs = self.answers.get(item.path.name, {}).get(request.stage)
            if probs is None:
                probs = {a: 1.0 / len(request.allowed) for a in request.allowed}
            out.append(_response(probs, self.full))
        return out


@dataclass(frozen=True)
class Truth:
    """What an image really shows: its modality (or ``Other``) and its primary finding."""

    modality: str
    finding: str = "Normal"


@dataclass(frozen=True)
class Confusion:
    """The stated confusion of :class:`ConfusedPixels` (module docstring)."""

    stage1_floor: float = 0.70
    stage1_gain: float = 0.30
    stage2_floor: float = 0.50
    stage2_gain: float = 0.40


def neighbours(modality: str, modalities: Sequence[str]) -> list[str]:
    """Modalities a pixel model confuses with ``modality``: same organ word or same scanner word."""
    words = set(modality.replace("(", " ").replace(")", " ").split()) - {"scan"}
    near = [m for m in modalities if m != modality and words & set(m.replace("(", " ").replace(")", " ").split())]
    return near or [m for m in modalities if m != modality]


class ConfusedPixels:
    """A pixel model with a known confusion (module docstring), for the bench.

    Parameters
    ----------
    truth:
        File name to :class:`Truth`.
    findings:
        Modality to the findings its cards name (stage 2 confuses among them).
    """

    name = "scripted-pixels"

    def __init__(self, truth: Mapping[str, Truth], findings: Mapping[str, Sequence[str]],
                 confusion: Confusion = Confusion(), seed: int = 0, full: bool = False) -> None:
        self.truth = truth
        self.findings = findings
        self.confusion = confusion
        self.seed = seed
        self.full = full

    def identity(self) -> dict:
        return {"backend": "transformers", "fingerprint": f"scripted-confusion-{self.confusion}", "quantize": "none",
                "answer_mode": "free", "pixels_read": True}

    def warm_up(self) -> None:
        pass

    def _rng(self, name: str, stage: int) -> random.Random:
        digest = hashlib.sha256(f"{self.seed}|{name}|{stage}".encode()).digest()
        return random.Random(int.from_bytes(digest[:8], "big"))

    def clarity(self, name: str, stage: int) -> float:
        return self._rng(name, stage).random()

    def answer(self, items: Sequence, requests: Sequence[StageRequest]) -> list[StageResponse]:
        out = []
        for item, request in zip(items, requests):
            shortcut = _non_image(item) if request.stage == 1 else None
            out.append(shortcut or _response(self.distribution(item.path.name, request), self.full))
        return out

    def distribution(self, name: str, request: StageRequest) -> dict[str, float]:
        allowed = list(request.allowed)
        truth = self.truth.get(name)
        rng = self._rng(name, request.stage)
        c = rng.random()
        if truth is None:
            return {a: 1.0 / len(allowed) for a in allowed}
        if request.stage == 1:
            gold = truth.modality if truth.modality in allowed else OTHER
            right = rng.random() < self.confusion.stage1_floor + self.confusion.stage1_gain * c
            pool = neighbours(gold, [a for a in allowed if a not in (NONE,)])
            top_p = 0.5 + 0.45 * c
        else:
            gold = truth.finding if truth.finding in allowed else "Normal"
            right = rng.random() < self.confusion.stage2_floor + self.confusion.stage2_gain * c
            pool = [f for f in self.findings.get(truth.modality, ()) if f in allowed and f != gold] or \
                [a for a in allowed if a != gold]
            top_p = 0.4 + 0.5 * c
        wrong = rng.choice(pool)
        first, second = (gold, wrong) if right else (wrong, gold)
        second_p = (1.0 - top_p) * 0.6
        others = [a for a in allowed if a not in (first, second)]
        rest = (1.0 - top_p - second_p) / len(others) if others else 0.0
        probs = {a: rest for a in others}
        probs[first], probs[second] = top_p, second_p
        return probs
