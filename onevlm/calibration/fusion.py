"""Two sources of evidence per routing stage, the DICOM header and the pixels, pooled into one distribution.

The *hybrid* router reads the header first and asks the pixel source (a VLM) only when the header
alone cannot decide a stage. This module holds the mathematics, with no model and no DICOM, so
``onevlm calibrate fit --scores`` can fit it and ``onevlm calibrate apply`` check it on numbers
alone. Definitions, per stage and over the stage's admissible answers ``A``:

- **A source's distribution.** ``h(a)`` (header) and ``v(a)`` (pixels). A source that lists only
  some answers (a free-text VLM gives its top two) leaves its unlisted mass to the unlisted
  admissible answers in equal shares (the least informative completion of what it said); an
  answer outside ``A`` counts as unlisted mass. Probabilities are floored at :data:`PROB_FLOOR`
  before logarithms, so neither source can rule an answer out on its own. A source without
  evidence for the stage (the header names no finding: ``informative: false``) counts as flat.
- **Header alone:** ``q_h(a) ∝ h(a)^(1/T_h)`` (temperature scaling), with its own temperature ``T_c``
  where the header corroborates its answer (its statements agree: such a header is right far more
  often than one resting on a single field, and only such a header may decide alone).
- **Pixels alone:** ``q_v(a) ∝ v(a)^(1/T_v)``.
- **Pooled** (log-linear pooling): ``q(a) ∝ h(a)^w_h · v(a)^w_p``. With ``w_h = w_p = 1`` this is
  the product of the two, i.e. Bayes' rule for independent evidence under a flat prior.
- **Gate (the cascade):** the header decides alone when ``max_a q_h(a) >= g`` and the header
  *corroborates* its answer (two independent header statements back it and none contradicts it:
  one wrong field is the commonest header error); ``g >= 0.5``, so the header's answer is then
  unique. Otherwise the pixels are read and the stage's distribution is the pooled one.
- **Disagreement:** the pixels were read, the header says ``a_h = argmax q_h`` (with more than half
  its probability: a header torn between answers says none of them), the pixels' answer
  ``a_v = argmax q_v`` differs, and ``D = q_v(a_v) - q_v(a_h) > m``: the image contradicts what the
  header says, by more than the margin ``m``. The site's policy then sends the case to review
  (default) or decides the stage on the pixels alone.

Uncalibrated (no fit): ``T_h = T_v = w_h = w_p = 1``, ``T_c =`` :data:`DEFAULT_CORROBORATED_TEMPERATURE`
(two agreeing header statements err together far less often than one: at the published rates of
10-15 % per field, and independent errors, about 1-2 %, so a corroborated header's probabilities
are sharpened), ``g =`` :data:`DEFAULT_GATE`, ``m =`` :data:`DEFAULT_MARGIN`, and every output says
``calibrated: false``.

Fitted per stage on labelled rows that carry both sources (:func:`fit_stage_fusion`): ``T_h``, ``T_c``
(on the corroborated rows) and ``T_v`` by temperature scaling; ``(w_h, w_p)`` by minimising the gold answers' negative
log-likelihood, which is convex (a multinomial logistic regression with two features and no
intercept); ``g`` as the lowest header probability at which the corroborated header alone was
wrong on at most ``alpha`` of the fitting rows at or above it, raised until the conformal quantile
of the resulting stage distribution admits the header's answer on every row the gate lets through
(the coverage guarantee is that quantile's, fitted on the distribution the gate produces; the gate
only decides which inputs need their pixels read); ``m`` as the split-conformal quantile (level
``alpha``) of ``D`` over rows whose header answer was right, so a right header is flagged at most
``alpha`` of the time, and never below :data:`MIN_MARGIN`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from onevlm.calibration.conformal import conformal_quantile
from onevlm.calibration.scores import SUM_TOLERANCE, StageScores

HEADER = "header"
PIXELS = "pixels"
SOURCES = (HEADER, PIXELS)
#: A source's probability of any admissible answer is at least this inside the pooling's logarithms.
PROB_FLOOR = 1e-6
#: Uncalibrated gate: the header decides alone at this probability or above.
DEFAULT_GATE = 0.95
#: Uncalibrated temperature of a corroborated header alone (module docstring).
DEFAULT_CORROBORATED_TEMPERATURE = 0.5
#: Uncalibrated disagreement margin (in the pixels' probability).
DEFAULT_MARGIN = 0.5
#: A fitted margin is never smaller: a near-tie of the pixels is no contradiction.
MIN_MARGIN = 0.2
#: The header "says" its answer when it gives it more than this probability alone.
HEADER_SAYS = 0.5
#: Pooling weights are searched in [0, MAX_WEIGHT].
MAX_WEIGHT = 5.0
#: What a disagreement does: send the case to review, or decide the stage on the pixels alone.
DISAGREEMENT_ACTIONS = ("review", "pixels")


def complete(probs: Mapping[str, float] | None, answers: Sequence[str]) -> dict[str, float] | None:
    """A source's probabilities over every admissible answer (see the module docstring).

    Parameters
    ----------
    probs:
        What the source said (answer to probability); ``None`` for a source that was not read.
    answers:
        The stage's admissible answers, in order.

    Returns
    -------
    dict or None
        One probability per admissible answer, summing to 1; ``None`` when ``probs`` is ``None``.
    """
    if probs is None:
        return None
    if not answers:
        raise ValueError("a stage needs at least one admissible answer")
    listed = {a: float(probs[a]) for a in answers if a in probs}
    rest = max(0.0, 1.0 - math.fsum(listed.values()))
    unlisted = [a for a in answers if a not in listed]
    out = {a: listed.get(a, rest / len(unlisted) if unlisted else 0.0) for a in answers}
    total = math.fsum(out.values())
    if total <= 0.0:
        return {a: 1.0 / len(answers) for a in answers}
    return {a: p / total for a, p in out.items()}


def flat(answers: Sequence[str]) -> dict[str, float]:
    """The distribution of a source with no evidence."""
    return {a: 1.0 / len(answers) for a in answers}


def _logs(probs: Mapping[str, float], answers: Sequence[str]) -> np.ndarray:
    return np.log(np.maximum(np.array([probs[a] for a in answers], dtype=float), PROB_FLOOR))


def _softmax(logits: np.ndarray, answers: Sequence[str]) -> dict[str, float]:
    weights = np.exp(logits - logits.max())
    weights /= weights.sum()
    return {a: float(w) for a, w in zip(answers, weights)}


def top(probs: Mapping[str, float]) -> tuple[str, float]:
    """The most probable answer and its probability (ties: the first listed)."""
    best, best_p = None, -1.0
    for answer, p in probs.items():
        if p > best_p:
            best, best_p = answer, p
    assert best is not None
    return best, best_p


@dataclass(frozen=True)
class Disagreement:
    """The header says one answer, the image looks like another.

    Attributes
    ----------
    stage:
        The stage whose answers disagree.
    header_answer, header_p:
        The header's answer and its probability (header alone; ``None`` where the check ran at a
        later stage, which does not see it).
    pixels_answer, pixels_p:
        The pixels' answer and its probability (pixels alone).
    margin, threshold:
        ``D = q_v(pixels_answer) - q_v(header_answer)`` and the margin ``m`` it exceeds.
    action:
        ``review`` or ``pixels`` (the site's policy).
    finding:
        Set when the image's stage-2 finding belongs to another modality's cards than the one
        the header decided (``pixels_answer`` is then that modality, ``pixels_p`` the finding's
        probability).
    """

    stage: int
    header_answer: str
    header_p: float | None
    pixels_answer: str
    pixels_p: float
    margin: float
    threshold: float
    action: str = "review"
    finding: str | None = None

    def __post_init__(self) -> None:
        if self.action not in DISAGREEMENT_ACTIONS:
            raise ValueError(f"action must be one of {', '.join(DISAGREEMENT_ACTIONS)}, got {self.action!r}")

    def text(self, header_says: str | None = None) -> str:
        """In words: ``header says chest CT scan; the image looks like brain CT scan (p 0.93)``."""
        said = f" ({header_says})" if header_says else ""
        if self.finding:
            return (f"header says {self.header_answer}{said}; the image's finding {self.finding} "
                    f"(p {self.pixels_p:.2f}) belongs to {self.pixels_answer}, not to it")
        return (f"header says {self.header_answer}{said}; the image looks like {self.pixels_answer} "
                f"(p {self.pixels_p:.2f})")

    def as_dict(self) -> dict[str, Any]:
        out = {"stage": self.stage, "header_answer": self.header_answer,
               "header_p": None if self.header_p is None else round(self.header_p, 6),
               "pixels_answer": self.pixels_answer, "pixels_p": round(self.pixels_p, 6),
               "margin": round(self.margin, 6), "threshold": round(self.threshold, 6), "action": self.action}
        if self.finding:
            out["finding"] = self.finding
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Disagreement":
        header_p = data.get("header_p")
        return cls(stage=int(data["stage"]), header_answer=str(data["header_answer"]),
                   header_p=None if header_p is None else float(header_p), pixels_answer=str(data["pixels_answer"]),
                   pixels_p=float(data["pixels_p"]), margin=float(data["margin"]),
                   threshold=float(data["threshold"]), action=str(data.get("action", "review")),
                   finding=data.get("finding"))


@dataclass(frozen=True)
class StageMix:
    """One input's stage after the cascade: its distribution and how it was made.

    Attributes
    ----------
    probs:
        The stage's distribution (header alone, pooled, or pixels alone under a disagreement
        policy ``pixels``), over the admissible answers.
    consulted:
        ``("header",)`` or ``("header", "pixels")``.
    reason:
        Why the pixels were or were not read, in words.
    disagreement:
        Set when header and pixels contradict each other beyond the margin.
    """

    probs: Mapping[str, float]
    consulted: tuple[str, ...]
    reason: str
    disagreement: Disagreement | None = None


@dataclass(frozen=True)
class StageFusion:
    """The fitted (or default) fusion of one stage; see the module docstring for each symbol.

    Attributes
    ----------
    header_temperature, corroborated_temperature, pixel_temperature:
        ``T_h``, ``T_c`` and ``T_v``.
    header_weight, pixel_weight:
        ``w_h`` and ``w_p`` of the log-linear pooling.
    gate:
        ``g``; ``None``: the header never decides alone (the pixels are always read).
    margin:
        ``m``, the disagreement margin.
    n, n_pixels:
        Fitting rows, and how many of them carried pixels.
    """

    stage: int
    header_temperature: float = 1.0
    corroborated_temperature: float = DEFAULT_CORROBORATED_TEMPERATURE
    pixel_temperature: float = 1.0
    header_weight: float = 1.0
    pixel_weight: float = 1.0
    gate: float | None = DEFAULT_GATE
    margin: float = DEFAULT_MARGIN
    n: int = 0
    n_pixels: int = 0

    def __post_init__(self) -> None:
        if self.stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, got {self.stage!r}")
        for name in ("header_temperature", "corroborated_temperature", "pixel_temperature"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0.0:
                raise ValueError(f"stage {self.stage}: {name} must be positive, got {value!r}")
        for name in ("header_weight", "pixel_weight"):
            value = getattr(self, name)
            if not math.isfinite(value) or not 0.0 <= value <= MAX_WEIGHT:
                raise ValueError(f"stage {self.stage}: {name} must lie in [0, {MAX_WEIGHT}], got {value!r}")
        if self.gate is not None and not 0.5 <= self.gate <= 1.0:
            raise ValueError(f"stage {self.stage}: gate must lie in [0.5, 1] or be null, got {self.gate!r}")
        if not math.isfinite(self.margin) or not 0.0 < self.margin <= 1.0:
            raise ValueError(f"stage {self.stage}: margin must lie in (0, 1], got {self.margin!r}")

    # -- the three distributions ----------------------------------------------------------------

    def header_alone(self, header: Mapping[str, float], answers: Sequence[str],
                     corroborated: bool = False) -> dict[str, float]:
        temperature = self.corroborated_temperature if corroborated else self.header_temperature
        return _softmax(_logs(header, answers) / temperature, answers)

    def pixels_alone(self, pixels: Mapping[str, float], answers: Sequence[str]) -> dict[str, float]:
        return _softmax(_logs(pixels, answers) / self.pixel_temperature, answers)

    def pooled(self, header: Mapping[str, float], pixels: Mapping[str, float], answers: Sequence[str]) -> dict[str, float]:
        return _softmax(self.header_weight * _logs(header, answers) + self.pixel_weight * _logs(pixels, answers),
                        answers)

    def header_decides(self, header_alone: Mapping[str, float], corroborated: bool = True) -> bool:
        """Whether the header alone certifies the stage: corroborated, and its answer's probability reaches the gate."""
        return corroborated and self.gate is not None and top(header_alone)[1] >= self.gate

    def disagreement(self, header_alone: Mapping[str, float], pixels_alone: Mapping[str, float],
                     action: str = "review") -> Disagreement | None:
        """The contradiction between the header's and the pixels' answers, if beyond the margin."""
        header_answer, header_p = top(header_alone)
        if header_p <= HEADER_SAYS:
            return None  # a header torn between answers says nothing to contradict
        pixels_answer, pixels_p = top(pixels_alone)
        if pixels_answer == header_answer:
            return None
        margin = pixels_p - pixels_alone.get(header_answer, 0.0)
        if margin <= self.margin:
            return None
        return Disagreement(self.stage, header_answer, header_p, pixels_answer, pixels_p, margin, self.margin, action)

    def foreign_finding(self, pixels_alone: Mapping[str, float], modality: str, owners: Mapping[str, Sequence[str]],
                        action: str = "review") -> Disagreement | None:
        """The image's finding belongs to other modalities' cards, none of ``modality``'s (stage 2).

        ``owners`` maps a finding (lower case) to the modalities whose cards list it. The finding
        must beat the margin ``m`` in the pixels' own probability and be no ``Normal``.
        """
        finding, p = top(pixels_alone)
        holders = list(owners.get(finding.lower(), ()))
        if p <= self.margin or finding.lower() == "normal" or not holders or modality in holders:
            return None
        return Disagreement(1, modality, None, holders[0], p, p, self.margin, action, finding=finding)

    # -- the cascade ----------------------------------------------------------------------------

    def gate_reason(self, header_alone: Mapping[str, float], corroboration: str | None = None) -> str:
        """Why the header alone does or does not decide; ``corroboration``: why it is not corroborated."""
        answer, p = top(header_alone)
        if corroboration:
            return f"the header alone cannot decide {answer} (p {p:.2f}): {corroboration}"
        if self.gate is None:
            return f"the header alone never certifies stage {self.stage} on this site's labels (header {answer} p {p:.2f})"
        if p >= self.gate:
            return f"the header certifies {answer} (p {p:.2f} >= gate {self.gate:.2f})"
        return f"the header alone is not certain enough (p {p:.2f} for {answer} < gate {self.gate:.2f})"

    def mix(self, header: Mapping[str, float], pixels: Mapping[str, float] | None, answers: Sequence[str],
            on_disagreement: str = "review", no_pixels_reason: str | None = None,
            corroborated: bool = False) -> StageMix:
        """The stage's distribution for complete sources (:func:`complete`); ``pixels`` ``None``: not read.

        ``no_pixels_reason`` is the reason recorded (default: the gate's); ``corroborated``: whether
        the header's statements back its answer (its header-alone temperature).
        """
        alone = self.header_alone(header, answers, corroborated)
        reason = no_pixels_reason or self.gate_reason(alone)
        if pixels is None:
            return StageMix(alone, (HEADER,), reason)
        disagreement = self.disagreement(alone, self.pixels_alone(pixels, answers), on_disagreement)
        if disagreement is not None and on_disagreement == "pixels":
            return StageMix(self.pixels_alone(pixels, answers), (HEADER, PIXELS), reason, disagreement)
        return StageMix(self.pooled(header, pixels, answers), (HEADER, PIXELS), reason, disagreement)

    # -- file form -----------------------------------------------------------------------------

    def as_dict(self) -> dict[str, Any]:
        return {"header_temperature": self.header_temperature,
                "corroborated_temperature": self.corroborated_temperature,
                "pixel_temperature": self.pixel_temperature,
                "header_weight": self.header_weight, "pixel_weight": self.pixel_weight, "gate": self.gate,
                "margin": self.margin, "n": self.n, "n_pixels": self.n_pixels}

    @classmethod
    def from_dict(cls, stage: int, data: Mapping[str, Any]) -> "StageFusion":
        unknown = set(data) - set(cls(stage=stage).as_dict())
        if unknown:
            raise ValueError(f"fusion stage {stage}: unknown key(s) {', '.join(sorted(unknown))}")
        gate = data.get("gate", DEFAULT_GATE)
        return cls(stage=stage, header_temperature=float(data.get("header_temperature", 1.0)),
                   corroborated_temperature=float(data.get("corroborated_temperature",
                                                           DEFAULT_CORROBORATED_TEMPERATURE)),
                   pixel_temperature=float(data.get("pixel_temperature", 1.0)),
                   header_weight=float(data.get("header_weight", 1.0)),
                   pixel_weight=float(data.get("pixel_weight", 1.0)),
                   gate=None if gate is None else float(gate), margin=float(data.get("margin", DEFAULT_MARGIN)),
                   n=int(data.get("n", 0)), n_pixels=int(data.get("n_pixels", 0)))


@dataclass(frozen=True)
class Fusion:
    """The fusion of every stage, and what a disagreement does.

    Attributes
    ----------
    stages:
        Stage number to :class:`StageFusion`; a stage not listed uses the defaults.
    on_disagreement:
        ``review`` (default) or ``pixels``.
    calibrated:
        Whether it was fitted on the site's labels.
    answers:
        Per stage, the admissible answers it was fitted on (the scores-only contract checks lines
        against them; empty for a router fit, whose answers come from the cards).
    """

    stages: Mapping[int, StageFusion] = field(default_factory=dict)
    on_disagreement: str = "review"
    calibrated: bool = False
    answers: Mapping[int, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.on_disagreement not in DISAGREEMENT_ACTIONS:
            raise ValueError(f"on_disagreement must be one of {', '.join(DISAGREEMENT_ACTIONS)}, "
                             f"got {self.on_disagreement!r}")
        for key, value in self.stages.items():
            if key != value.stage:
                raise ValueError(f"fusion stage key {key!r} holds stage {value.stage}")

    def stage(self, stage: int) -> StageFusion:
        return self.stages.get(stage) or StageFusion(stage=stage)

    def as_dict(self) -> dict[str, Any]:
        return {"on_disagreement": self.on_disagreement, "calibrated": self.calibrated,
                "stages": {str(s): f.as_dict() for s, f in sorted(self.stages.items())},
                "answers": {str(s): list(a) for s, a in sorted(self.answers.items())}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Fusion":
        unknown = set(data) - {"on_disagreement", "calibrated", "stages", "answers"}
        if unknown:
            raise ValueError(f"fusion: unknown key(s) {', '.join(sorted(unknown))}")
        return cls(stages={int(k): StageFusion.from_dict(int(k), v) for k, v in (data.get("stages") or {}).items()},
                   on_disagreement=str(data.get("on_disagreement", "review")),
                   calibrated=bool(data.get("calibrated", False)),
                   answers={int(k): tuple(v) for k, v in (data.get("answers") or {}).items()})


# -- fitting ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceRow:
    """One labelled input at one stage with both sources, completed over ``answers``.

    ``pixels`` is ``None`` when the pixels were not read (the row then fits the header only).
    ``gold`` is the right answer (``None``: unknown; such rows are not fitted on).
    ``corroborated``: whether the header's statements back its answer (else it never decides alone).
    """

    stage: int
    answers: tuple[str, ...]
    header: Mapping[str, float]
    pixels: Mapping[str, float] | None
    gold: str | None
    corroborated: bool = True

    def __post_init__(self) -> None:
        for name in SOURCES:
            probs = getattr(self, name)
            if probs is None:
                continue
            if set(probs) != set(self.answers):
                raise ValueError(f"the {name} distribution must cover exactly the admissible answers")
            if abs(math.fsum(probs.values()) - 1.0) > 1e-6:
                raise ValueError(f"the {name} distribution must sum to 1 (complete it first)")


def _weighted_nll(rows: Sequence[SourceRow], weights: np.ndarray) -> tuple[float, np.ndarray]:
    from scipy.special import logsumexp

    total, grad = 0.0, np.zeros(2)
    for row in rows:
        features = np.stack([_logs(row.header, row.answers), _logs(row.pixels, row.answers)])  # (2, |A|)
        logits = weights @ features
        norm = logsumexp(logits)
        gold = row.answers.index(row.gold)
        total -= logits[gold] - norm
        probs = np.exp(logits - norm)
        grad -= features[:, gold] - features @ probs
    return total / len(rows), grad / len(rows)


def fit_weights(rows: Sequence[SourceRow]) -> tuple[float, float]:
    """``(w_h, w_p)`` minimising the gold answers' mean negative log-likelihood of the pooled distribution."""
    usable = [r for r in rows if r.pixels is not None and r.gold in r.answers]
    if not usable:
        return 1.0, 1.0
    from scipy.optimize import minimize

    result = minimize(lambda w: _weighted_nll(usable, w), x0=np.array([1.0, 1.0]), jac=True, method="L-BFGS-B",
                      bounds=[(0.0, MAX_WEIGHT), (0.0, MAX_WEIGHT)])
    w_h, w_p = (float(min(max(x, 0.0), MAX_WEIGHT)) for x in result.x)
    return w_h, w_p


def _temperature(rows: Sequence[SourceRow], source: str, corroborated_only: bool = False) -> float:
    from onevlm.calibration.temperature import fit_temperature

    scores = [StageScores(r.stage, dict(getattr(r, source)), r.gold) for r in rows
              if getattr(r, source) is not None and r.gold in r.answers and (r.corroborated or not corroborated_only)]
    if not scores:
        return 1.0
    return fit_temperature(scores).temperature


def _stage_probs(fusion: StageFusion, row: SourceRow, gate: float | None) -> dict[str, float]:
    alone = fusion.header_alone(row.header, row.answers, row.corroborated)
    if row.pixels is None or (row.corroborated and gate is not None and top(alone)[1] >= gate):
        return alone
    return fusion.pooled(row.header, row.pixels, row.answers)


def fit_gate(fusion: StageFusion, rows: Sequence[SourceRow], alpha: float) -> float | None:
    """The gate ``g`` (module docstring); ``None`` when the header alone is never right often enough.

    On the rows the header may decide alone (corroborated ones): the lowest header probability at
    which the header's answer was wrong on at most ``alpha`` of the fitting rows at or above it (and
    at least ``1/alpha`` rows lie there, so the rate means something); then raised until the
    conformal quantile of the stage's distribution admits the header's answer on every row the gate
    lets through. The guarantee itself comes from that conformal quantile, fitted afterwards on the
    distribution the gate produces: the gate decides how many pixels are read, not the coverage.
    """
    labelled = [r for r in rows if r.gold in r.answers]
    eligible = [r for r in labelled if r.corroborated]
    scored = sorted(((top(a)[1], top(a)[0] == r.gold) for r in eligible
                     for a in (fusion.header_alone(r.header, r.answers, corroborated=True),)), reverse=True)
    least = math.ceil(1.0 / alpha)
    gate, errors = None, 0
    for count, (p, right) in enumerate(scored, start=1):
        errors += not right
        next_p = scored[count][0] if count < len(scored) else -1.0
        if next_p == p:
            continue  # a threshold keeps every row of its probability
        if count >= least and errors <= alpha * count:
            gate = p
    if gate is None:
        return None
    gate = max(gate, 0.5)
    for _ in range(64):  # g only rises; each step lets fewer rows through, so this ends
        scores = [1.0 - _stage_probs(fusion, r, gate)[r.gold] for r in labelled]
        qhat = conformal_quantile(scores, alpha)
        if not math.isfinite(qhat) or qhat >= 1.0:
            return gate
        needed = 1.0 - qhat
        if needed <= gate + 1e-12:
            return gate
        gate = needed
    return gate


def fit_margin(fusion: StageFusion, rows: Sequence[SourceRow], alpha: float) -> float:
    """The disagreement margin ``m`` (module docstring)."""
    contrasts = []
    for row in rows:
        if row.pixels is None or row.gold not in row.answers:
            continue
        alone = fusion.header_alone(row.header, row.answers, row.corroborated)
        header_answer, header_p = top(alone)
        if header_answer != row.gold or header_p <= HEADER_SAYS:
            continue
        pixels = fusion.pixels_alone(row.pixels, row.answers)
        pixels_answer, pixels_p = top(pixels)
        contrasts.append(0.0 if pixels_answer == header_answer else pixels_p - pixels[header_answer])
    if not contrasts:
        return DEFAULT_MARGIN
    margin = conformal_quantile(contrasts, alpha)
    if not math.isfinite(margin):
        return DEFAULT_MARGIN
    return float(min(max(margin, MIN_MARGIN), 1.0))


def fit_stage_fusion(stage: int, rows: Sequence[SourceRow], alpha: float) -> StageFusion:
    """Fit one stage's fusion (temperatures, pooling weights, gate, margin) on labelled rows.

    Raises
    ------
    ValueError
        When no row has a gold among its admissible answers.
    """
    labelled = [r for r in rows if r.gold in r.answers]
    if not labelled:
        raise ValueError(f"stage {stage}: no labelled row to fit the fusion on")
    w_h, w_p = fit_weights(labelled)
    fusion = StageFusion(stage=stage, header_temperature=_temperature(labelled, HEADER),
                         corroborated_temperature=_temperature(labelled, HEADER, corroborated_only=True),
                         pixel_temperature=_temperature(labelled, PIXELS), header_weight=w_h, pixel_weight=w_p,
                         gate=None, margin=DEFAULT_MARGIN, n=len(labelled),
                         n_pixels=sum(1 for r in labelled if r.pixels is not None))
    gate = fit_gate(fusion, labelled, alpha)
    margin = fit_margin(fusion, labelled, alpha)
    return StageFusion(**{**fusion.as_dict(), "gate": gate, "margin": margin}, stage=stage)


def check_distribution(probs: Any, what: str) -> dict[str, float]:
    """Validate a source's probabilities as read from a file: answer -> number in [0, 1], sum <= 1."""
    if not isinstance(probs, Mapping) or not probs:
        raise ValueError(f"{what} must be a non-empty object answer -> probability")
    out: dict[str, float] = {}
    for answer, p in probs.items():
        if not isinstance(answer, str) or not answer:
            raise ValueError(f"{what}: answers must be non-empty strings, got {answer!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0.0 <= p <= 1.0:
            raise ValueError(f"{what}: probability of {answer!r} must be a number in [0, 1], got {p!r}")
        out[answer] = float(p)
    total = math.fsum(out.values())
    if total > 1.0 + SUM_TOLERANCE:
        raise ValueError(f"{what}: probabilities sum to {total:.6g}, more than 1 (not a distribution)")
    return out
