"""Algorithm 2 of the paper: learn a stage cutoff by one sorted sweep over runner-up probabilities.

Semantics. The selector switches to the runner-up iff ``p2 >= tau``. For a cutoff anywhere in
``(v_i, v_{i+1}]`` between two successive distinct event values the decisions, hence the score,
are the same; the first interval is ``[0, v_1]`` and the last ``(v_n, 1]``. Intervals are
reported as ``(lo, hi)`` pairs with these bounds; ``tau*`` is the midpoint of the widest optimal
interval, the lowest one on ties. (The paper prints intervals as ``[lo, hi)``; the bounds and
midpoints are the same numbers.)
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

FIRST = "FIRST"
SECOND = "SECOND"
WIDTH_TOLERANCE = 1e-12
#: The router's stages (modality, finding, card): the only ones a cutoff exists for.
STAGES = (1, 2, 3)


@dataclass(frozen=True)
class CutoffRow:
    """One training row: a stage, its runner-up probability and the correct index."""

    stage: int
    p2: float
    label: str

    def __post_init__(self) -> None:
        # Rejected at fit time: a cutoffs file with another stage would only fail at `route --cutoffs`.
        if self.stage not in STAGES:
            raise ValueError(f"stage must be 1, 2 or 3, got {self.stage!r}")
        if self.label not in (FIRST, SECOND):
            raise ValueError(f"label must be FIRST or SECOND, got {self.label!r}")
        if math.isnan(self.p2) or not 0.0 <= self.p2 <= 1.0:
            raise ValueError(f"p2 must lie in [0, 1], got {self.p2!r}")


@dataclass(frozen=True)
class CutoffFit:
    """Result of the sweep for one stage."""

    intervals: tuple[tuple[float, float], ...]
    score: int
    tau: float
    n_rows: int

    def as_dict(self) -> dict:
        return {
            "intervals": [[lo, hi] for lo, hi in self.intervals],
            "score": self.score,
            "tau": self.tau,
            "n": self.n_rows,
        }


def label_for(first_answer: str, second_answer: str | None, gold: str) -> str:
    """The row label: SECOND iff the runner-up equals the gold answer and the first does not."""
    if second_answer is not None and second_answer == gold and first_answer != gold:
        return SECOND
    return FIRST


def sweep(p2_values: Sequence[float], labels: Sequence[str]) -> CutoffFit:
    """Run Algorithm 2 on one stage's rows.

    Parameters
    ----------
    p2_values:
        Runner-up probabilities, each in [0, 1].
    labels:
        ``"FIRST"`` or ``"SECOND"`` per row.

    Returns
    -------
    CutoffFit
        Every optimal interval, the best score (rows decided correctly) and ``tau*``.
    """
    if len(p2_values) != len(labels):
        raise ValueError("p2_values and labels differ in length")
    if not p2_values:
        raise ValueError("cannot fit a cutoff without rows")
    # The rows validate p2 and label; the sweep does not depend on which stage they are.
    rows = [CutoffRow(stage=1, p2=float(p), label=str(l)) for p, l in zip(p2_values, labels)]
    flips = Counter(r.p2 for r in rows if r.label == SECOND)  # A: correct only when switched
    stays = Counter(r.p2 for r in rows if r.label == FIRST)  # B: correct only when kept
    events = sorted(set(flips) | set(stays))

    # tau in [0, v_1]: every row switches, so exactly the A rows are right.
    score = sum(flips.values())
    segments: list[tuple[float, float, int]] = [(0.0, events[0], score)]
    for i, value in enumerate(events):
        # Crossing `value` (equal values together): those rows now stay with FIRST.
        score += stays[value] - flips[value]
        upper = events[i + 1] if i + 1 < len(events) else 1.0
        if value < upper:  # (v_n, 1] is empty when v_n == 1
            segments.append((value, upper, score))
    best = max(s for _, _, s in segments)
    optimal = tuple((lo, hi) for lo, hi, s in segments if s == best)
    widest = max(hi - lo for lo, hi in optimal)
    # Widths equal up to float noise (0.8 - 0.6 vs 0.4 - 0.2) are ties: take the lowest.
    lo, hi = next((lo, hi) for lo, hi in optimal if hi - lo >= widest - WIDTH_TOLERANCE)
    return CutoffFit(intervals=optimal, score=best, tau=(lo + hi) / 2.0, n_rows=len(rows))


def fit_cutoffs(rows: Iterable[CutoffRow]) -> dict[int, CutoffFit]:
    """Run :func:`sweep` for every stage present in ``rows``."""
    by_stage: dict[int, list[CutoffRow]] = defaultdict(list)
    for row in rows:
        by_stage[row.stage].append(row)
    return {
        stage: sweep([r.p2 for r in stage_rows], [r.label for r in stage_rows])
        for stage, stage_rows in sorted(by_stage.items())
    }


def read_rows(path: str | Path) -> list[CutoffRow]:
    """Read ``stage,p2,label`` rows from a CSV file; errors name the file and line."""
    path = Path(path)
    rows: list[CutoffRow] = []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"stage", "p2", "label"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        for line, record in enumerate(reader, start=2):
            try:
                rows.append(
                    CutoffRow(
                        stage=int(record["stage"]),
                        p2=float(record["p2"]),
                        label=record["label"].strip().upper(),
                    )
                )
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}: line {line}: {exc}") from exc
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


@dataclass(frozen=True)
class Cutoffs:
    """The per-stage cutoffs used by the router; ``None`` means never switch (baseline)."""

    stage1: float | None = None
    stage2: float | None = None
    stage3: float | None = None

    def __post_init__(self) -> None:
        for name in ("stage1", "stage2", "stage3"):
            value = getattr(self, name)
            if value is not None and (math.isnan(value) or not 0.0 <= value <= 1.0):
                raise ValueError(f"cutoff {name} must lie in [0, 1], got {value!r}")

    def for_stage(self, stage: int) -> float | None:
        return (self.stage1, self.stage2, self.stage3)[stage - 1]

    def as_dict(self) -> dict[str, float | None]:
        return {"1": self.stage1, "2": self.stage2, "3": self.stage3}

    @classmethod
    def from_fits(cls, fits: Mapping[int, CutoffFit]) -> "Cutoffs":
        return cls(*(fits[s].tau if s in fits else None for s in (1, 2, 3)))

    @classmethod
    def load(cls, path: str | Path) -> "Cutoffs":
        """Read a cutoffs file: ``{"1": tau, ...}`` or the JSON written by ``onevlm cutoffs fit``.

        Raises
        ------
        ValueError
            Naming the file and the problem.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot read cutoffs: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path}: cutoffs must be a JSON object keyed by stage 1, 2, 3")
        values: dict[int, float | None] = {}
        for key, value in data.items():
            if str(key) not in ("1", "2", "3"):
                raise ValueError(f"{path}: unknown stage {key!r} (expected 1, 2 or 3)")
            if isinstance(value, dict):
                value = value.get("tau")
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{path}: stage {key}: tau must be a number or null")
            values[int(key)] = None if value is None else float(value)
        try:
            return cls(values.get(1), values.get(2), values.get(3))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
