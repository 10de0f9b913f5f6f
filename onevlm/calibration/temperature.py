"""Temperature scaling for candidate sets that differ from one input to the next.

Stage 3's candidates depend on the modality and a backend may list only its top answers, so
the number and the names of the classes vary per input. Fixed-class implementations (e.g.
netcal's ``TemperatureScaling``, which needs one class count for the whole data set) do not fit
this, hence this small implementation.

Definition. With listed probabilities ``p_i`` and unlisted mass ``r`` (:attr:`StageScores.rest`),
the scaled probabilities are ``p_i**(1/T) / Z`` and ``r**(1/T) / Z`` with
``Z = sum_i p_i**(1/T) + r**(1/T)`` (``r**(1/T) = 0`` when ``r = 0``). For a full distribution
``p = softmax(z)`` this is exactly ``softmax(z / T)``. The unlisted mass is treated as one
pseudo-answer; for a truly truncated list that is an approximation (the unlisted answers, scaled
one by one, would hold at least ``r**(1/T)`` for ``T > 1``).

An unlisted mass below ``1e-6`` (the tolerance on the listed sum) is taken as rounding noise and
set to 0: raised to ``1/T`` it would otherwise grow into real mass (``(1e-7)**(1/3) ~ 0.005``).

The temperature is fitted by minimising the mean negative log-likelihood of the gold answer,
searching ``log T`` with a bounded scalar minimiser. The NLL is convex in ``1/T`` (a log-sum-exp
of functions linear in ``1/T`` minus a linear term), hence unimodal in ``log T``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from onevlm.calibration.scores import SUM_TOLERANCE, StageScores

#: Probabilities are clipped at this floor inside logarithms during the fit.
LOG_FLOOR = 1e-12


def _effective_rest(scores: StageScores) -> float:
    # a rest at the level of the sum tolerance is rounding noise, not an answer's mass
    rest = scores.rest
    return rest if rest > SUM_TOLERANCE else 0.0


def _check_temperature(temperature: float) -> float:
    value = float(temperature)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return value


def scale(scores: StageScores, temperature: float) -> StageScores:
    """Temperature-scale one input's listed probabilities.

    Parameters
    ----------
    scores:
        The backend's probabilities (listed answers plus the implicit unlisted mass).
    temperature:
        ``T > 0``; ``T > 1`` softens an over-confident backend, ``T < 1`` sharpens.

    Returns
    -------
    StageScores
        Same stage, gold and answer order; probabilities ``p_i**(1/T) / Z``. The scaled
        unlisted mass is what the listed ones leave (``REST`` is never a key). ``T = 1``
        returns the input's probabilities up to float noise.
    """
    inv_t = 1.0 / _check_temperature(temperature)
    answers = list(scores.probs)
    probs = np.array([scores.probs[a] for a in answers], dtype=float)
    rest = _effective_rest(scores)
    # work in logs so that small probabilities and large 1/T neither underflow nor overflow
    with np.errstate(divide="ignore"):
        logs = np.log(np.append(probs, rest)) * inv_t
    # some term is finite: listed probabilities summing to 0 leave an unlisted mass of 1
    weights = np.exp(logs - logs.max())
    scaled = weights / weights.sum()
    out = {a: float(min(1.0, p)) for a, p in zip(answers, scaled[:-1])}
    return StageScores(scores.stage, out, scores.gold)


@dataclass(frozen=True)
class TemperatureFit:
    """A fitted temperature and the mean gold NLL before (``T = 1``) and after scaling.

    Attributes
    ----------
    temperature:
        The fitted ``T``.
    nll_before, nll_after:
        Mean negative log-likelihood of the gold answer at ``T = 1`` and at the fitted ``T``.
    n:
        Rows used.
    n_skipped:
        Rows without a gold, or whose gold has probability 0 at every ``T`` (listed with
        probability 0, or unlisted while the unlisted mass is 0).
    """

    temperature: float
    nll_before: float
    nll_after: float
    n: int
    n_skipped: int

    def __post_init__(self) -> None:
        _check_temperature(self.temperature)
        for name in ("nll_before", "nll_after"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0.0:
                raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n!r}")
        if self.n_skipped < 0:
            raise ValueError(f"n_skipped must be non-negative, got {self.n_skipped!r}")

    def as_dict(self) -> dict:
        return {
            "temperature": self.temperature,
            "nll_before": self.nll_before,
            "nll_after": self.nll_after,
            "n": self.n,
            "n_skipped": self.n_skipped,
        }

    @classmethod
    def from_dict(cls, data: dict) -> TemperatureFit:
        """Inverse of :meth:`as_dict`."""
        try:
            return cls(
                temperature=float(data["temperature"]),
                nll_before=float(data["nll_before"]),
                nll_after=float(data["nll_after"]),
                n=int(data["n"]),
                n_skipped=int(data["n_skipped"]),
            )
        except KeyError as exc:
            raise ValueError(f"temperature fit lacks {exc.args[0]!r}") from exc


def _log_matrix(rows: Sequence[StageScores]) -> tuple[np.ndarray, np.ndarray, int]:
    """Padded log-probabilities (listed answers, then the unlisted mass) and the gold column."""
    usable: list[tuple[list[float], int]] = []
    skipped = 0
    for row in rows:
        if row.gold is None:
            skipped += 1
            continue
        values = list(row.probs.values()) + [_effective_rest(row)]
        if row.gold in row.probs:
            gold_col = list(row.probs).index(row.gold)
        else:
            gold_col = len(values) - 1  # an unlisted gold gets the unlisted mass
        if values[gold_col] <= 0.0:
            skipped += 1  # probability 0 at every T: no temperature can explain it
            continue
        usable.append((values, gold_col))
    if not usable:
        return np.empty((0, 0)), np.empty(0, dtype=int), skipped
    width = max(len(v) for v, _ in usable)
    logs = np.full((len(usable), width), -np.inf)
    for i, (values, _) in enumerate(usable):
        v = np.asarray(values)
        # zeros stay impossible (0**(1/T) = 0); tiny positives are floored for stability
        logs[i, : len(v)] = np.where(v > 0.0, np.log(np.maximum(v, LOG_FLOOR)), -np.inf)
    gold = np.array([g for _, g in usable], dtype=int)
    return logs, gold, skipped


def _mean_nll(logs: np.ndarray, gold: np.ndarray, temperature: float) -> float:
    from scipy.special import logsumexp

    scaled = logs / temperature
    gold_logp = scaled[np.arange(len(gold)), gold] - logsumexp(scaled, axis=1)
    return float(-gold_logp.mean())


def fit_temperature(rows: Sequence[StageScores], bounds: tuple[float, float] = (0.05, 20.0)) -> TemperatureFit:
    """Fit one temperature by minimising the mean NLL of the gold answers.

    Parameters
    ----------
    rows:
        Unscaled stage scores; rows without a gold (or whose gold can never have positive
        probability) are skipped and counted. A gold that is not listed takes the unlisted mass.
    bounds:
        ``(T_min, T_max)``, both positive; the search runs over ``log T`` in this range.

    Returns
    -------
    TemperatureFit

    Raises
    ------
    ValueError
        If no row is usable or the bounds are invalid.
    """
    lo, hi = (float(b) for b in bounds)
    if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 < lo < hi):
        raise ValueError(f"bounds must satisfy 0 < T_min < T_max, got {bounds!r}")
    logs, gold, skipped = _log_matrix(rows)
    if len(gold) == 0:
        raise ValueError(f"no usable row to fit a temperature ({skipped} skipped: no gold, or gold impossible)")
    from scipy.optimize import minimize_scalar

    result = minimize_scalar(
        lambda u: _mean_nll(logs, gold, math.exp(u)),
        bounds=(math.log(lo), math.log(hi)),
        method="bounded",
        options={"xatol": 1e-6},
    )
    temperature = float(math.exp(result.x))
    return TemperatureFit(
        temperature=temperature,
        nll_before=_mean_nll(logs, gold, 1.0),
        nll_after=_mean_nll(logs, gold, temperature),
        n=len(gold),
        n_skipped=skipped,
    )
