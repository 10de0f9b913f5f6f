"""Expected calibration error with equal-width, right-closed bins, as in the paper.

Bins are ``(0, 1/n], (1/n, 2/n], ..., ((n-1)/n, 1]``; a confidence of exactly 0 goes to the
first bin. A confidence equal to an edge belongs to the bin that edge closes (0.3 is in
``(0.2, 0.3]``), also when floating point puts it a hair above the edge (``0.1 + 0.2``).
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

#: Values within this distance of a bin edge are treated as equal to it.
EDGE_TOLERANCE = 1e-9


@dataclass(frozen=True)
class CalibrationBin:
    """One bin: its bounds, its size, and mean accuracy / confidence (``None`` when empty)."""

    lo: float
    hi: float
    count: int
    accuracy: float | None
    confidence: float | None


@dataclass(frozen=True)
class EceResult:
    """ECE and the per-bin statistics it was computed from."""

    ece: float
    bins: tuple[CalibrationBin, ...]
    n: int

    def as_dict(self) -> dict:
        return {"ece": self.ece, "n": self.n, "bins": [asdict(b) for b in self.bins]}


def bin_index(confidence: float, n_bins: int = 10) -> int:
    """Index of the right-closed bin holding ``confidence`` (0-based)."""
    if math.isnan(confidence) or confidence < -EDGE_TOLERANCE or confidence > 1.0 + EDGE_TOLERANCE:
        raise ValueError(f"confidence must lie in [0, 1], got {confidence!r}")
    scaled = confidence * n_bins
    nearest = round(scaled)
    if abs(scaled - nearest) <= EDGE_TOLERANCE * n_bins:
        scaled = float(nearest)
    return min(max(math.ceil(scaled) - 1, 0), n_bins - 1)


def expected_calibration_error(
    confidences: Sequence[float], correct: Sequence[bool | int], n_bins: int = 10
) -> EceResult:
    """ECE = sum_b (n_b / N) * |acc_b - conf_b| over non-empty bins.

    Parameters
    ----------
    confidences:
        The probability the predictor gave to its emitted label, each in [0, 1].
    correct:
        Whether each emitted label was right (bool or 0/1).
    n_bins:
        Number of equal-width bins (the paper uses 10).
    """
    if n_bins < 1:
        raise ValueError("n_bins must be at least 1")
    if len(confidences) != len(correct):
        raise ValueError("confidences and correct differ in length")
    if not confidences:
        raise ValueError("ECE needs at least one prediction")
    members: list[list[tuple[float, float]]] = [[] for _ in range(n_bins)]
    for conf, ok in zip(confidences, correct):
        if ok not in (0, 1, True, False):
            raise ValueError(f"correct must be 0/1, got {ok!r}")
        members[bin_index(float(conf), n_bins)].append((float(conf), float(ok)))
    total = len(confidences)
    ece = 0.0
    bins = []
    for i, items in enumerate(members):
        lo, hi = i / n_bins, (i + 1) / n_bins
        if not items:
            bins.append(CalibrationBin(lo, hi, 0, None, None))
            continue
        acc = sum(ok for _, ok in items) / len(items)
        conf = sum(c for c, _ in items) / len(items)
        ece += len(items) / total * abs(acc - conf)
        bins.append(CalibrationBin(lo, hi, len(items), acc, conf))
    return EceResult(ece=ece, bins=tuple(bins), n=total)


def read_predictions(path: str | Path) -> tuple[list[float], list[int]]:
    """Read ``confidence,correct`` rows; errors name the file and the line."""
    path = Path(path)
    confidences: list[float] = []
    correct: list[int] = []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"confidence", "correct"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        for line, record in enumerate(reader, start=2):
            try:
                conf = float(record["confidence"])
                ok = record["correct"].strip().lower()
                if ok in ("1", "true"):
                    flag = 1
                elif ok in ("0", "false"):
                    flag = 0
                else:
                    raise ValueError(f"correct must be 0 or 1, got {record['correct']!r}")
                bin_index(conf)
            except (TypeError, ValueError, AttributeError) as exc:
                raise ValueError(f"{path}: line {line}: {exc}") from exc
            confidences.append(conf)
            correct.append(flag)
    if not confidences:
        raise ValueError(f"{path}: no rows")
    return confidences, correct
