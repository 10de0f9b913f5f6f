"""Turn evidence scores into a probability distribution and its top-2 answers."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Ranked:
    """An answer, its probability and its raw score (logit before the temperature)."""

    answer: str
    p: float
    logit: float


def softmax_ranking(answers: Sequence[str], logits: Sequence[float], temperature: float) -> list[Ranked]:
    """Softmax of ``logits / temperature``, sorted by decreasing probability.

    Ties keep the order of ``answers`` (the sort is stable), so results are deterministic.
    """
    if len(answers) != len(logits) or not answers:
        raise ValueError("answers and logits must be non-empty and of equal length")
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    scaled = [x / temperature for x in logits]
    top = max(scaled)
    weights = [math.exp(x - top) for x in scaled]
    total = sum(weights)
    ranked = [Ranked(a, w / total, l) for a, w, l in zip(answers, weights, logits)]
    return sorted(ranked, key=lambda r: -r.p)
