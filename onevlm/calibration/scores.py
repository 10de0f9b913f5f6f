"""One input's candidate probabilities at one routing stage, and their JSON Lines form.

A backend may list only some answers (e.g. its top-2); the probability it did not attribute to
any listed answer is the *rest* (:data:`REST`), ``max(0, 1 - sum(probs))``. Temperature scaling
and conformal sets treat that mass explicitly instead of renormalising it away.

File format (one JSON object per line, blank lines skipped)::

    {"stage": 1, "probs": {"CT": 0.91, "MR": 0.06}, "gold": "CT"}

``gold`` is optional (unknown for unlabelled production traffic).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, TypeVar

T = TypeVar("T")
#: Pseudo-answer naming the mass a backend did not attribute to any listed answer.
REST = "<unlisted>"
#: What a decoded (free-text) answer's probability is: its own token sequence's, not its first
#: token's (:func:`onevlm.router.outcome.stage_scores`). Part of a VLM calibration's identity, so
#: a calibration fitted on another definition is refused.
DECODED_ANSWER_SCORE = "answer-sequence-probability"
#: Listed probabilities may sum to slightly more than 1 (float noise, rounded JSON).
SUM_TOLERANCE = 1e-6
#: Valid routing stages (1: modality, 2: anatomy, 3: the modality-specific question).
STAGES = (1, 2, 3)


@dataclass(frozen=True)
class StageScores:
    """The probabilities a backend gave to its listed answers for one input at one stage.

    Attributes
    ----------
    stage:
        1, 2 or 3.
    probs:
        Answer to probability, each in [0, 1]; the sum may be below 1 (a truncated list) and at
        most ``1 + 1e-6``. Stored read-only, in the given order.
    gold:
        The right answer, or ``None`` when unknown. It need not be listed.
    """

    stage: int
    probs: Mapping[str, float]
    gold: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stage, bool) or not isinstance(self.stage, Integral):
            raise ValueError(f"stage must be an integer, got {self.stage!r}")
        if int(self.stage) not in STAGES:
            raise ValueError(f"stage must be 1, 2 or 3, got {self.stage!r}")
        if not isinstance(self.probs, Mapping):
            raise ValueError(f"probs must be a mapping answer -> probability, got {type(self.probs).__name__}")
        if not self.probs:
            raise ValueError("probs must list at least one answer")
        clean: dict[str, float] = {}
        for answer, p in self.probs.items():
            if not isinstance(answer, str) or not answer:
                raise ValueError(f"answers must be non-empty strings, got {answer!r}")
            if answer == REST:
                raise ValueError(f"{REST!r} is reserved for the unlisted mass and cannot be an answer")
            if isinstance(p, bool) or not isinstance(p, Real):
                raise ValueError(f"probability of {answer!r} must be a number, got {p!r}")
            value = float(p)
            if not math.isfinite(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"probability of {answer!r} must lie in [0, 1], got {p!r}")
            clean[answer] = value
        total = math.fsum(clean.values())
        if total > 1.0 + SUM_TOLERANCE:
            raise ValueError(f"probabilities sum to {total!r}, more than 1")
        if self.gold is not None and (not isinstance(self.gold, str) or not self.gold):
            raise ValueError(f"gold must be a non-empty string or None, got {self.gold!r}")
        # frozen in spirit too: nobody can change the probabilities behind a fitted calibrator
        object.__setattr__(self, "stage", int(self.stage))
        object.__setattr__(self, "probs", MappingProxyType(clean))

    @property
    def rest(self) -> float:
        """The unlisted mass, ``max(0, 1 - sum(probs))``."""
        return max(0.0, 1.0 - math.fsum(self.probs.values()))

    def top(self) -> tuple[str, float]:
        """The most probable listed answer and its probability (ties: the first listed)."""
        best, best_p = None, -1.0
        for answer, p in self.probs.items():
            if p > best_p:
                best, best_p = answer, p
        assert best is not None  # probs is non-empty (validated)
        return best, best_p

    def as_dict(self) -> dict:
        """JSON-safe form (``gold`` omitted when unknown)."""
        out: dict = {"stage": self.stage, "probs": dict(self.probs)}
        if self.gold is not None:
            out["gold"] = self.gold
        return out


def _parse(record: object) -> StageScores:
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    unknown = set(record) - {"stage", "probs", "gold"}
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(sorted(unknown))}")
    if "stage" not in record:
        raise ValueError("missing 'stage'")
    if "probs" not in record:
        raise ValueError("missing 'probs'")
    if not isinstance(record["probs"], dict):
        raise ValueError("'probs' must be an object answer -> probability")
    return StageScores(stage=record["stage"], probs=record["probs"], gold=record.get("gold"))


def read_scores(path: str | Path) -> list[StageScores]:
    """Read stage scores from a JSON Lines file.

    Parameters
    ----------
    path:
        File with one ``{"stage": ..., "probs": {...}, "gold": ...}`` object per line; blank
        lines are skipped.

    Returns
    -------
    list of StageScores
        In file order.

    Raises
    ------
    ValueError
        On any malformed line, as ``"<path>: line <n>: <reason>"``.
    """
    return read_json_lines(path, lambda record, number: _parse(record))


def read_json_lines(path: str | Path, parse: Callable[[Any, int], T]) -> list[T]:
    """``parse(record, line_number)`` of every non-blank line of a JSON Lines file, in order.

    Raises
    ------
    ValueError
        ``"<path>: line <n>: <reason>"`` for the first line that is not JSON or that ``parse`` refuses.
    """
    path = Path(path)
    out: list[T] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                out.append(parse(json.loads(line), number))
            except (ValueError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
                raise ValueError(f"{path}: line {number}: {exc}") from exc
    return out


def write_scores(rows: Iterable[StageScores], path: str | Path) -> Path:
    """Write stage scores as JSON Lines (the format :func:`read_scores` reads).

    Parameters
    ----------
    rows:
        The scores to write, in order.
    path:
        Output file; parent folders are created.

    Returns
    -------
    Path
        The written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row.as_dict(), ensure_ascii=False) + "\n")
    return path
