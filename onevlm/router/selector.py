"""Algorithm 1 of the paper: choose between the top-2 answers of one stage."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum


class Index(str, Enum):
    """Which of the two candidates a stage kept."""

    FIRST = "FIRST"
    SECOND = "SECOND"


@dataclass(frozen=True)
class Selection:
    """The selector's output: the chosen answer and whether it was the runner-up."""

    answer: str
    index: Index


def select_answer(a1: str, p1: float, a2: str | None, p2: float | None, tau: float | None) -> Selection:
    """Algorithm 1: keep ``a1`` unless the runner-up is likely enough and different.

    Parameters
    ----------
    a1, p1:
        The most likely answer and its first-token probability.
    a2, p2:
        The runner-up answer and its probability (``None`` when the backend gave one answer).
    tau:
        The stage cutoff in [0, 1]; ``None`` disables switching (the paper's baseline).

    Returns
    -------
    Selection
        ``a2``/SECOND iff ``p2 >= tau`` and ``a2 != a1``; otherwise ``a1``/FIRST.
    """
    for name, value in (("p1", p1), ("p2", p2), ("tau", tau)):
        if value is not None and (math.isnan(value) or not 0.0 <= value <= 1.0):
            raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    if p2 is not None and p2 > p1:
        raise ValueError(f"candidates must be ordered p1 >= p2, got p1={p1!r} < p2={p2!r}")
    if tau is not None and a2 is not None and p2 is not None and p2 >= tau and a2 != a1:
        return Selection(a2, Index.SECOND)
    return Selection(a1, Index.FIRST)
