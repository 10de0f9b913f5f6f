"""The hybrid router on numbers alone: fit and apply the fusion and the cascade from score lines.

File format (JSON Lines, one stage of one input per line, blank lines skipped)::

    {"stage": 1, "header": {"chest CT scan": 0.80, "brain CT scan": 0.15}, "pixels": {"brain CT scan": 0.93}, "gold": "brain CT scan"}

``header`` is required; ``pixels`` may be missing or ``null`` (the pixels were not read: the line is
decided on the header alone, and says so); ``gold`` is required to fit, optional to apply;
``corroborated`` (optional, default ``true``) says whether the header's own statements back its
answer (the router's rule: a header that does not never decides alone). Each
source is a distribution over the stage's admissible answers (probabilities in [0, 1] summing to
at most 1; what a source leaves unlisted is shared by the answers it did not list). When fitting,
a stage's admissible answers are every answer its lines name; when applying, every answer of a
line must be one the calibration was fitted on.

``apply`` prints per line ``{"stage", "set", "outcome", "confidence", "consulted", "disagreement"}``
(plus ``reason`` and, when flagged, ``disagreement_text``). A line decided on the header alone
never depends on its ``pixels``. Every line is checked before any is applied: a malformed line is
an error naming its line number, and nothing is printed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from onevlm.calibration.fitting import fit_stage, score_outcome, scores_calibration, split_indices, stage_heldout
from onevlm.calibration.fusion import (
    HEADER,
    PIXELS,
    Fusion,
    SourceRow,
    StageFusion,
    check_distribution,
    complete,
    fit_stage_fusion,
)
from onevlm.calibration.scores import STAGES, StageScores, read_json_lines
from onevlm.calibration.site import RoutingSettings, SiteCalibration, StageCalibration

OUTCOME_REVIEW = "review"


@dataclass(frozen=True)
class HybridLine:
    """One line of a hybrid scores file (``line`` is its 1-based number)."""

    line: int
    stage: int
    header: Mapping[str, float]
    pixels: Mapping[str, float] | None
    gold: str | None = None
    corroborated: bool = True


def _parse(record: Any, number: int) -> HybridLine:
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    unknown = set(record) - {"stage", "header", "pixels", "gold", "corroborated"}
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(sorted(unknown))}")
    stage = record.get("stage")
    if isinstance(stage, bool) or not isinstance(stage, int) or stage not in STAGES:
        raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}")
    if "header" not in record:
        raise ValueError("missing 'header'")
    header = check_distribution(record["header"], HEADER)
    pixels = None if record.get("pixels") is None else check_distribution(record["pixels"], PIXELS)
    gold = record.get("gold")
    if gold is not None and (not isinstance(gold, str) or not gold):
        raise ValueError(f"gold must be a non-empty string or null, got {gold!r}")
    corroborated = record.get("corroborated", True)
    if not isinstance(corroborated, bool):
        raise ValueError(f"corroborated must be true or false, got {corroborated!r}")
    return HybridLine(number, stage, header, pixels, gold, corroborated)


def read_hybrid_scores(path: str | Path) -> list[HybridLine]:
    """Read a hybrid scores file.

    Raises
    ------
    ValueError
        ``"<path>: line <n>: <reason>"`` for the first malformed line.
    """
    return read_json_lines(path, _parse)


def is_hybrid_scores(path: str | Path) -> bool:
    """Whether a scores file holds header/pixels lines (else plain ``probs`` lines)."""
    with Path(path).open(encoding="utf-8") as handle:
        for text in handle:
            if text.strip():
                try:
                    record = json.loads(text)
                except ValueError:
                    return False
                return isinstance(record, dict) and "header" in record
    return False


def _answers(lines: Sequence[HybridLine]) -> dict[int, tuple[str, ...]]:
    answers: dict[int, dict[str, None]] = {}
    for line in lines:
        seen = answers.setdefault(line.stage, {})
        for probs in (line.header, line.pixels or {}):
            seen.update(dict.fromkeys(probs))
        if line.gold is not None:
            seen[line.gold] = None
    return {stage: tuple(seen) for stage, seen in answers.items()}


def _source_row(line: HybridLine, answers: Sequence[str]) -> SourceRow:
    return SourceRow(line.stage, tuple(answers), complete(line.header, answers), complete(line.pixels, answers),
                     line.gold, line.corroborated)


def mixed_scores(fusion: StageFusion, row: SourceRow, on_disagreement: str):
    """The cascade on one row: the header alone when it decides (its pixels unread), else pooled."""
    alone = fusion.header_alone(row.header, row.answers, row.corroborated)
    if fusion.header_decides(alone, row.corroborated):
        return fusion.mix(row.header, None, row.answers, on_disagreement, corroborated=True)
    why = fusion.gate_reason(alone, None if row.corroborated else "the line says its header is not corroborated")
    if row.pixels is None:
        return fusion.mix(row.header, None, row.answers, on_disagreement,
                          no_pixels_reason=f"{why}; no pixel evidence given: decided on the header alone",
                          corroborated=row.corroborated)
    return fusion.mix(row.header, row.pixels, row.answers, on_disagreement, no_pixels_reason=why,
                      corroborated=row.corroborated)


def fit_hybrid_from_scores(lines: Sequence[HybridLine], risk: float, delta: float = 0.1, holdout: float = 0.0,
                           seed: int = 0, settings: RoutingSettings | None = None, source: str | None = None,
                           on_disagreement: str = "review") -> SiteCalibration:
    """Fit the fusion, the cascade's gate and each stage's sets on hybrid score lines.

    Per stage: the fusion (:func:`~onevlm.calibration.fusion.fit_stage_fusion`) at level ``risk``,
    then the conformal quantile and selective threshold of the cascade's distribution (already
    calibrated: no further temperature). With ``holdout > 0`` a seeded share of each stage's lines
    is kept out of fitting and reported. The result carries no backend identity, so a router
    refuses it (as for ``probs`` lines).
    """
    answers = _answers(lines)
    stage_fusions: dict[int, StageFusion] = {}
    stages: dict[int, StageCalibration] = {}
    heldout: dict[str, Any] = {}
    sizes: dict[str, int] = {}
    for stage in sorted(answers):
        rows = [_source_row(line, answers[stage]) for line in lines if line.stage == stage and line.gold is not None]
        if not rows:
            continue
        fit_idx, held_idx = split_indices(len(rows), holdout, seed)
        fit_rows = [rows[i] for i in fit_idx]
        fusion = fit_stage_fusion(stage, fit_rows, risk)
        stage_fusions[stage] = fusion
        mixed = [StageScores(stage, mixed_scores(fusion, r, on_disagreement).probs, r.gold) for r in fit_rows]
        stages[stage] = fit_stage(stage, mixed, risk, delta, scale_temperature=False).calibration
        sizes[str(stage)] = len(rows)
        if held_idx:
            held = [rows[i] for i in held_idx]
            figures = stage_heldout(stages[stage], [StageScores(stage, mixed_scores(fusion, r, on_disagreement).probs,
                                                                r.gold) for r in held])
            figures["pixels_read_share"] = sum(
                PIXELS in mixed_scores(fusion, r, on_disagreement).consulted for r in held) / len(held)
            heldout[str(stage)] = figures
    if not stages:
        raise ValueError("no labelled hybrid score lines to fit on (every line needs a gold)")
    fusion = Fusion(stages=stage_fusions, on_disagreement=on_disagreement, calibrated=True, answers=answers)
    return scores_calibration(stages, risk, delta, settings, source, sizes, holdout, seed, heldout, kind="hybrid",
                              fusion=fusion)


def apply_hybrid(calibration: SiteCalibration, lines: Sequence[HybridLine], source: str = "scores") -> list[dict[str, Any]]:
    """Per line: the cascade, the fused set, the outcome (a disagreement under policy ``review`` is a review).

    Raises
    ------
    ValueError
        When the calibration holds no fusion, or a line's stage or answers do not fit it (naming
        the line); no line is applied then.
    """
    fusion = calibration.fusion
    if fusion is None:
        raise ValueError(f"{calibration.path or 'the calibration'} holds no fusion: fit it with hybrid score lines "
                         "(header/pixels) to apply it to them")
    rows = []
    for line in lines:
        fitted = calibration.stage(line.stage)
        answers = fusion.answers.get(line.stage)
        if fitted is None or not answers:
            raise ValueError(f"{source}: line {line.line}: the calibration has no stage {line.stage}")
        unknown = [a for probs in (line.header, line.pixels or {}) for a in probs if a not in answers]
        if unknown:
            raise ValueError(f"{source}: line {line.line}: answer(s) {', '.join(map(repr, dict.fromkeys(unknown)))} "
                             f"are not admissible at stage {line.stage} (fitted on {len(answers)} answers)")
        rows.append((line, fitted, _source_row(line, answers)))
    out = []
    for line, fitted, row in rows:
        mix = mixed_scores(fusion.stage(line.stage), row, fusion.on_disagreement)
        result = score_outcome(fitted, fitted.calibrate(StageScores(line.stage, mix.probs)), calibration.settings)
        flagged = mix.disagreement is not None
        if flagged and mix.disagreement.action == "review":
            result["outcome"] = OUTCOME_REVIEW
        result.update(consulted=list(mix.consulted), disagreement=flagged, reason=mix.reason)
        if flagged:
            result["disagreement_text"] = mix.disagreement.text()
        out.append(result)
    return out
