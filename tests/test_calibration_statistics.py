"""Statistics of site calibration on synthetic, deliberately miscalibrated scores.

The data: K = 5 answers, true logits ``z ~ N(shift, 1.5**2 I)``, the gold drawn from
``softmax(z)``, and a backend that reports ``softmax(3 z)`` (over-confident, true temperature 3)
or ``softmax(z / 3)`` (under-confident). Every check asserts numbers that a wrong implementation
(or data that are not really miscalibrated) would miss. Run with ``-s`` to see them.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest

from onevlm.calibration.conformal import (
    ConformalFit,
    conformal_quantile,
    coverage_report,
    fit_conformal,
    is_open_set,
    min_calibration_size,
    nonconformity,
    prediction_set,
)
from onevlm.calibration.ece import expected_calibration_error
from onevlm.calibration.risk_coverage import plot_risk_coverage, risk_coverage
from onevlm.calibration.scores import REST, StageScores, read_scores, write_scores
from onevlm.calibration.selective import (
    SelectiveFit,
    clopper_pearson_upper,
    fit_selective,
    min_certifiable_size,
    selective_report,
)
from onevlm.calibration.temperature import TemperatureFit, fit_temperature, scale

K = 5
NAMES = ("CT", "MR", "XR", "US", "PET")
SHIFT = np.array([0.8, 0.4, 0.0, -0.4, -0.8])
ALPHAS = (0.05, 0.1, 0.2)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def synth(seed: int, n: int, power: float = 3.0, top: int | None = None, spread: float = 1.5) -> list[StageScores]:
    """``n`` rows whose backend reports ``softmax(power * z)``; the gold follows ``softmax(z)``.

    ``z ~ N(SHIFT, spread**2 I)``; ``top`` keeps only the backend's ``top`` most probable answers
    (the rest is unlisted).
    """
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, spread, size=(n, K)) + SHIFT
    gold = np.minimum((rng.random(n)[:, None] > np.cumsum(_softmax(z), axis=1)).sum(axis=1), K - 1)
    reported = _softmax(power * z)
    rows = []
    for probs, g in zip(reported, gold):
        keep = np.argsort(-probs, kind="stable")[: top or K]
        rows.append(StageScores(3, {NAMES[j]: float(probs[j]) for j in keep}, NAMES[g]))
    return rows


def top_confidence(rows: list[StageScores]) -> tuple[list[float], list[bool]]:
    tops = [r.top() for r in rows]
    return [p for _, p in tops], [a == r.gold for (a, _), r in zip(tops, rows)]


# --------------------------------------------------------------------------- conformal quantile


def _rank(n: int, alpha: float) -> int:
    # exact arithmetic: the decimal alpha as written, no float noise in 1 - alpha
    return math.ceil(Fraction(n + 1) * (1 - Fraction(str(alpha))))


@pytest.mark.parametrize("n", [19, 20, 37, 100, 999])
@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.1, 0.2, 0.5])
def test_conformal_quantile_is_the_rank_statistic(n, alpha):
    values = np.random.default_rng(n).random(n)
    k = _rank(n, alpha)
    got = conformal_quantile(values.tolist(), alpha)
    if k > n:
        assert got == math.inf
        return
    assert got == np.sort(values)[k - 1]
    # numpy's "inverted_cdf" gives the k-th order statistic (queried mid-step, away from the
    # float noise in n * (k / n)); the often quoted method="higher" at k / n reads index
    # ceil(k (n - 1) / n), one rank higher unless k = n, so it is only ever more conservative
    assert got == np.quantile(values, (k - 0.5) / n, method="inverted_cdf")
    higher = np.quantile(values, k / n, method="higher")
    assert higher >= got
    assert (higher == got) == (k == n)


def test_conformal_quantile_inf_when_rank_exceeds_n():
    assert conformal_quantile([0.1] * 18, 0.05) == math.inf  # ceil(19 * 0.95) = 19 > 18
    assert conformal_quantile([0.1] * 19, 0.05) == 0.1  # ceil(20 * 0.95) = 19 <= 19
    assert prediction_set(StageScores(1, {"CT": 0.9, "MR": 0.1}), math.inf) == ("CT", "MR")


@pytest.mark.parametrize("alpha", [0.2, 0.1, 0.05, 0.01, 0.3, 0.07, 0.6])
def test_min_calibration_size_matches_brute_force(alpha):
    brute = next(n for n in range(1, 10_000) if _rank(n, alpha) <= n)
    assert min_calibration_size(alpha) == brute
    assert conformal_quantile([0.5] * brute, alpha) == 0.5
    assert conformal_quantile([0.5] * (brute - 1), alpha) == math.inf or brute == 1


# --------------------------------------------------------------------------- conformal coverage


def _naive_coverage(rows: list[StageScores], alpha: float) -> float:
    """Take answers by decreasing uncalibrated probability until their mass reaches 1 - alpha."""
    covered = 0
    for row in rows:
        mass, chosen = 0.0, []
        for answer, p in sorted(row.probs.items(), key=lambda item: -item[1]):
            chosen.append(answer)
            mass += p
            if mass >= 1 - alpha:
                break
        covered += row.gold in chosen
    return covered / len(rows)


@pytest.fixture(scope="module")
def overconfident():
    return {"fit": synth(1, 2000), "cal": synth(2, 1000), "test": synth(3, 5000)}


@pytest.mark.parametrize("scaled", [True, False], ids=["temperature-scaled", "raw"])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_conformal_coverage_holds_on_overconfident_scores(overconfident, alpha, scaled):
    cal, test = overconfident["cal"], overconfident["test"]
    if scaled:
        t = fit_temperature(overconfident["fit"]).temperature
        cal, test = [scale(r, t) for r in cal], [scale(r, t) for r in test]
    fit = fit_conformal(cal, alpha)
    report = coverage_report(test, fit.qhat, alpha, n_calibration=fit.n)
    print(f"\nconformal {'scaled' if scaled else 'raw   '} alpha={alpha}: qhat={fit.qhat:.4f} "
          f"coverage={report.coverage:.4f} (target {1 - alpha}, tol {report.tolerance:.4f}) "
          f"mean set size={report.mean_set_size:.3f} empty={report.empty_sets}")
    assert report.n == 5000 and fit.n == 1000
    assert report.tolerance == pytest.approx(3 * math.sqrt(alpha * (1 - alpha) * (1 / 5000 + 1 / 1002)))
    assert report.meets_guarantee
    # also within the narrower tolerance of the test rows alone (3 binomial sd of 5000 rows)
    assert coverage_report(test, fit.qhat, alpha).meets_guarantee
    assert report.coverage >= 1 - alpha - report.tolerance
    assert report.coverage <= 1 - alpha + 0.05  # valid, not vacuous
    assert 1.0 <= report.mean_set_size <= K
    assert not fit.open_set
    # with full distributions, covered by score <=> gold in the returned set
    assert report.covered == sum(r.gold in prediction_set(r, fit.qhat) for r in test)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_naive_mass_rule_undercovers_overconfident_scores(overconfident, alpha):
    test = overconfident["test"]
    naive = _naive_coverage(test, alpha)
    tolerance = 3 * math.sqrt(alpha * (1 - alpha) / len(test))
    print(f"\nnaive mass rule alpha={alpha}: coverage={naive:.4f} (target {1 - alpha})")
    assert naive < 1 - alpha - tolerance


def test_conformal_fit_round_trip_and_validation():
    fit = ConformalFit(alpha=0.1, qhat=math.inf, n=5)
    data = fit.as_dict()
    assert data["qhat"] is None and json.loads(json.dumps(data)) == data
    assert ConformalFit.from_dict(data) == fit
    assert ConformalFit.from_dict(ConformalFit(0.1, 0.25, 50).as_dict()).qhat == 0.25
    with pytest.raises(ValueError, match="alpha"):
        ConformalFit(alpha=1.0, qhat=0.5, n=5)
    with pytest.raises(ValueError, match="qhat"):
        ConformalFit(alpha=0.1, qhat=float("nan"), n=5)
    with pytest.raises(ValueError, match="gold"):
        fit_conformal([StageScores(1, {"CT": 1.0})], 0.1)
    with pytest.raises(ValueError, match="gold"):
        nonconformity(StageScores(1, {"CT": 1.0}))


def test_prediction_set_order_threshold_and_unlisted_gold():
    row = StageScores(2, {"chest": 0.2, "head": 0.5, "abdomen": 0.2}, gold="pelvis")
    assert prediction_set(row, 0.5) == ("head",)
    assert prediction_set(row, 0.8) == ("head", "chest", "abdomen")  # ties keep the listed order
    assert prediction_set(row, 0.1) == ()
    assert nonconformity(row) == 1.0  # unlisted gold
    assert nonconformity(StageScores(2, {"head": 0.7}, gold="head")) == pytest.approx(0.3)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("scaled", [True, False], ids=["temperature-scaled", "raw"])
@pytest.mark.parametrize(
    "seed,power,spread", [(10, 3.0, 1.5), (20, 2.0, 4.0)], ids=["gold-often-unlisted", "gold-mostly-listed"]
)
def test_conformal_on_top2_partial_distributions(alpha, scaled, seed, power, spread):
    fit_rows, cal, test = (synth(seed + i, n, power, top=2, spread=spread) for i, n in enumerate((2000, 1000, 5000)))
    assert all(len(r.probs) == 2 for r in test)
    unlisted = sum(r.gold not in r.probs for r in test) / len(test)
    if scaled:
        t = fit_temperature(fit_rows).temperature
        cal, test = [scale(r, t) for r in cal], [scale(r, t) for r in test]
    fit = fit_conformal(cal, alpha)
    report = coverage_report(test, fit.qhat, alpha, n_calibration=fit.n)
    sets = [prediction_set(r, fit.qhat) for r in test]
    print(f"\ntop-2 spread={spread} power={power} {'scaled' if scaled else 'raw   '} alpha={alpha}: "
          f"unlisted gold={unlisted:.3f} "
          f"qhat={fit.qhat:.4f} open={fit.open_set} coverage={report.coverage:.4f} "
          f"mean set size={report.mean_set_size:.3f}")
    assert unlisted > 0.0  # the gold really is unlisted sometimes
    assert all(REST not in s for s in sets)
    assert all(len(s) <= 2 for s in sets)
    assert fit.qhat == math.inf or report.coverage >= 1 - alpha - report.tolerance
    listed_cover = sum(r.gold in s for r, s in zip(test, sets))
    # the set is open exactly when the calibration rows whose gold is unlisted (score 1) reach
    # into the conformal rank: n + 1 - ceil((n+1)(1-alpha)) of them or more
    at_one = sum(nonconformity(r) >= 1 - 1e-12 for r in cal)
    assert is_open_set(fit.qhat) == (at_one >= fit.n + 1 - _rank(fit.n, alpha))
    if is_open_set(fit.qhat):
        assert listed_cover <= report.covered
    else:
        assert listed_cover == report.covered  # closed sets: covered by score <=> gold listed in the set
        assert report.coverage <= 1 - alpha + 0.05
    if spread == 4.0 and alpha > 0.05:
        assert not is_open_set(fit.qhat)  # this case exercises closed sets
    if spread == 1.5 and alpha < 0.2:
        assert is_open_set(fit.qhat)  # and this one open sets


# --------------------------------------------------------------------------- temperature


def test_temperature_scaling_recovers_overconfidence_and_lowers_ece():
    fit = fit_temperature(synth(31, 3000))
    test = synth(32, 5000)
    before = expected_calibration_error(*top_confidence(test))
    after = expected_calibration_error(*top_confidence([scale(r, fit.temperature) for r in test]))
    print(f"\ntemperature (over-confident, true T=3): T={fit.temperature:.3f} "
          f"NLL {fit.nll_before:.4f} -> {fit.nll_after:.4f}; ECE {before.ece:.4f} -> {after.ece:.4f}")
    assert 2.0 <= fit.temperature <= 4.5
    assert fit.nll_after < fit.nll_before
    assert before.ece > 0.1
    assert after.ece < before.ece / 3
    assert fit.n == 3000 and fit.n_skipped == 0


def test_temperature_scaling_detects_underconfidence():
    fit = fit_temperature(synth(33, 3000, power=1 / 3))
    print(f"\ntemperature (under-confident, true T=1/3): T={fit.temperature:.3f}")
    assert fit.temperature < 1.0
    assert 0.2 <= fit.temperature <= 0.5


def test_temperature_with_candidate_sets_that_vary_per_input():
    # 3 to 8 candidates per input, names differing per input: exact for softmax(3 z) / 3
    rng = np.random.default_rng(34)
    pool = [f"answer-{i}" for i in range(12)]
    rows = []
    for _ in range(3000):
        k = int(rng.integers(3, 9))
        names = rng.choice(pool, size=k, replace=False)
        z = rng.normal(0.0, 1.5, size=(1, k))
        g = int(rng.choice(k, p=_softmax(z)[0]))
        rows.append(StageScores(3, dict(zip(names.tolist(), _softmax(3 * z)[0].tolist())), str(names[g])))
    fit = fit_temperature(rows)
    print(f"\ntemperature (3-8 candidates per input, true T=3): T={fit.temperature:.3f}")
    assert 2.5 <= fit.temperature <= 3.6


def test_scale_identity_order_and_mass():
    row = StageScores(3, {"a": 0.5, "b": 0.3, "c": 0.05}, gold="z")  # rest 0.15
    same = scale(row, 1.0)
    assert same.probs == pytest.approx(dict(row.probs), abs=1e-12)
    assert same.rest == pytest.approx(row.rest, abs=1e-12)
    for t in (0.1, 0.5, 2.0, 3.0, 20.0):
        s = scale(row, t)
        assert list(s.probs) == ["a", "b", "c"] and s.gold == "z" and s.stage == 3
        assert s.probs["a"] > s.probs["b"] > s.probs["c"]
        assert math.fsum(s.probs.values()) + s.rest == pytest.approx(1.0, abs=1e-12)
        # the closed form: p**(1/T) / Z with the rest as one more term
        z = sum(p ** (1 / t) for p in (0.5, 0.3, 0.05, 0.15))
        assert s.probs["b"] == pytest.approx(0.3 ** (1 / t) / z, rel=1e-9)
    # a full distribution scales like softmax(logits / T)
    logits = np.array([[2.0, 0.5, -1.0]])
    full = StageScores(1, dict(zip("xyz", _softmax(logits)[0].tolist())))
    assert list(scale(full, 2.5).probs.values()) == pytest.approx(_softmax(logits / 2.5)[0].tolist(), abs=1e-12)
    # zeros stay zero, extreme temperatures stay finite
    sharp = scale(StageScores(1, {"x": 0.999, "y": 1e-300, "w": 0.0}), 0.05)
    assert sharp.probs["w"] == 0.0 and sharp.probs["x"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="temperature"):
        scale(row, 0.0)
    # a rest within the sum tolerance is rounding noise: it must not grow into mass at large T
    for noisy in ({"a": 0.6, "b": 0.3999995}, {"a": 0.6, "b": 0.4000005}):
        hot = scale(StageScores(1, noisy), 20.0)
        assert math.fsum(hot.probs.values()) == pytest.approx(1.0, abs=1e-12)
        assert hot.probs["a"] > hot.probs["b"]


def test_fit_temperature_skips_unusable_rows_and_validates():
    usable = synth(35, 300)
    extra = [
        StageScores(1, {"CT": 0.9, "MR": 0.1}),  # no gold
        StageScores(1, {"CT": 1.0}, gold="MR"),  # unlisted gold, no unlisted mass
        StageScores(1, {"CT": 1.0, "MR": 0.0}, gold="MR"),  # listed gold with probability 0
    ]
    fit = fit_temperature(usable + extra)
    assert (fit.n, fit.n_skipped) == (300, 3)
    assert TemperatureFit.from_dict(json.loads(json.dumps(fit.as_dict()))) == fit
    with pytest.raises(ValueError, match="no usable row"):
        fit_temperature(extra)
    with pytest.raises(ValueError, match="bounds"):
        fit_temperature(usable, bounds=(2.0, 1.0))


# --------------------------------------------------------------------------- selective


@pytest.mark.parametrize("k,n", [(0, 10), (1, 10), (3, 50), (12, 200), (49, 50), (0, 1), (7, 7)])
@pytest.mark.parametrize("delta", [0.05, 0.1])
def test_clopper_pearson_matches_scipy_exact_interval(k, n, delta):
    from scipy.stats import binomtest

    expected = binomtest(k, n).proportion_ci(confidence_level=1 - 2 * delta, method="exact").high
    assert clopper_pearson_upper(k, n, delta) == pytest.approx(expected, abs=1e-12)


def test_clopper_pearson_edges():
    assert clopper_pearson_upper(0, 0, 0.1) == 1.0
    assert clopper_pearson_upper(5, 5, 0.1) == 1.0
    assert clopper_pearson_upper(0, 22, 0.1) == pytest.approx(1 - 0.1 ** (1 / 22))
    assert min_certifiable_size(0.1, 0.1) == 22
    with pytest.raises(ValueError):
        clopper_pearson_upper(3, 2, 0.1)


def _selective_sample(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    # over-confident: P(correct | conf) = conf**2, confidences skewed high like a top probability
    conf = rng.beta(5.0, 1.0, size=n)
    return conf, rng.random(n) < conf**2


def test_selective_risk_bound_holds_over_repetitions():
    alpha, delta, reps = 0.1, 0.1, 200
    rng = np.random.default_rng(41)
    ltt_fail = late_fail = plugin_fail = 0
    shares, late_shares, risks = [], [], []
    for _ in range(reps):
        conf, ok = _selective_sample(rng, 500)
        fit = fit_selective(conf, ok, alpha, delta)
        late = fit_selective(conf, ok, alpha, delta, min_routed=100)  # start the walk lower
        fresh_conf, fresh_ok = _selective_sample(rng, 20_000)
        report = selective_report(fresh_conf, fresh_ok, fit.threshold)
        shares.append(report.share_routed)
        if report.selective_risk is not None:
            risks.append(report.selective_risk)
            ltt_fail += report.selective_risk > alpha
        late_report = selective_report(fresh_conf, fresh_ok, late.threshold)
        late_shares.append(late_report.share_routed)
        late_fail += late_report.selective_risk is not None and late_report.selective_risk > alpha
        # the plug-in rule (lowest threshold whose *empirical* risk is <= alpha) for contrast
        order = np.argsort(-conf)
        emp = np.cumsum(~ok[order]) / np.arange(1, len(conf) + 1)
        plug = conf[order][np.flatnonzero(emp <= alpha).max()]
        plug_risk = selective_report(fresh_conf, fresh_ok, float(plug)).selective_risk
        plugin_fail += plug_risk is not None and plug_risk > alpha
    print(f"\nselective (alpha=delta=0.1, n=500, {reps} reps): LTT violation rate={ltt_fail / reps:.3f} "
          f"plug-in violation rate={plugin_fail / reps:.3f} mean share routed={np.mean(shares):.3f} "
          f"mean held-out selective risk={np.mean(risks):.4f} (overall error "
          f"{1 - np.mean(_selective_sample(np.random.default_rng(0), 100_000)[1]):.3f}); "
          f"min_routed=100: violation rate={late_fail / reps:.3f} mean share routed={np.mean(late_shares):.3f}; "
          f"oracle share {1 - 0.89**5:.3f}")
    assert ltt_fail / reps <= delta + 0.05
    assert late_fail / reps <= delta + 0.05
    assert plugin_fail / reps > delta + 0.05  # the test can tell a bound from a plug-in
    assert np.mean(shares) > 0.1 and np.mean(late_shares) > 0.1  # not bought by routing nothing


def test_selective_edge_cases():
    conf = np.linspace(0.3, 0.99, 100)
    fit = fit_selective(conf, [True] * 100, 0.1, 0.1)
    assert fit.threshold == pytest.approx(0.3) and fit.routed == 100 and fit.share_routed == 1.0
    assert fit.errors == 0 and fit.selective_accuracy == 1.0 and fit.upper_bound <= 0.1
    tiny = fit_selective([0.9, 0.8, 0.7], [True, True, True], 0.1, 0.1)
    assert tiny.threshold is None and tiny.share_routed == 0.0 and tiny.routed == 0
    assert tiny.upper_bound is None and tiny.selective_accuracy is None
    assert SelectiveFit.from_dict(json.loads(json.dumps(fit.as_dict()))) == fit
    assert SelectiveFit.from_dict(tiny.as_dict()) == tiny
    # an early error ends the walk: fixed sequence, no skipping past a threshold not rejected,
    # although routing all 100 cases (1 error) would pass the bound on its own
    desc = conf[::-1]
    early = [True] * 30 + [False] + [True] * 69
    assert clopper_pearson_upper(1, 31, 0.1) > 0.1 >= clopper_pearson_upper(1, 100, 0.1)
    stopped = fit_selective(desc, early, 0.1, 0.1)
    assert (stopped.threshold, stopped.routed, stopped.errors) == (desc[29], 30, 0)
    # ties: a threshold never splits equal confidences
    tied = fit_selective([0.9] * 30 + [0.5] * 30, [True] * 30 + [True] * 29 + [False], 0.1, 0.1)
    assert tied.routed in (30, 60)
    report = selective_report([0.9, 0.5, 0.95], [True, False, False], 0.9)
    assert (report.routed, report.errors, report.selective_risk) == (2, 1, 0.5)
    assert selective_report([0.2], [True], None).selective_risk is None


# --------------------------------------------------------------------------- risk-coverage


def test_risk_coverage_hand_computed():
    curve = risk_coverage([0.9, 0.8, 0.7, 0.6], [1, 1, 0, 1])
    assert curve.coverage == (0.25, 0.5, 0.75, 1.0)
    assert curve.risk == pytest.approx((0.0, 0.0, 1 / 3, 1 / 4))
    assert curve.aurc == pytest.approx((1 / 3 + 1 / 4) / 4) == pytest.approx(0.1458333, abs=1e-7)


def test_risk_coverage_ties_take_the_group_end():
    # sorted: 0.9 (ok), 0.7 (err), 0.7 (ok), 0.7 (ok), 0.5 (err); the 0.7 group ends at k = 4
    curve = risk_coverage([0.7, 0.9, 0.7, 0.5, 0.7], [0, 1, 1, 0, 1])
    assert curve.coverage == (0.2, 0.8, 1.0)
    assert curve.risk == pytest.approx((0.0, 0.25, 0.4))
    assert curve.aurc == pytest.approx((0.0 + 3 * 0.25 + 0.4) / 5)
    # the order of tied cases must not matter
    assert risk_coverage([0.9, 0.7, 0.7, 0.7, 0.5], [1, 1, 1, 0, 0]).aurc == pytest.approx(curve.aurc)


def test_risk_coverage_ranking_and_plot(tmp_path):
    rng = np.random.default_rng(51)
    correct = rng.random(400) < 0.8
    conf = rng.random(400)
    perfect = np.where(correct, 1.0, 0.0) + conf * 0.5  # every error below every right answer
    reversed_ = np.where(correct, 0.0, 1.0) + conf * 0.5
    best, worst = risk_coverage(perfect, correct), risk_coverage(reversed_, correct)
    random_ = risk_coverage(conf, correct)
    assert best.aurc < random_.aurc < worst.aurc
    assert best.risk[-1] == worst.risk[-1] == pytest.approx(1 - correct.mean())
    path = plot_risk_coverage({"perfect": best, "random": random_, "reversed": worst}, tmp_path / "rc.png",
                              "risk-coverage", marks={"threshold": (0.5, random_.risk[199])})
    assert path.exists() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- scores files


def test_scores_round_trip_and_properties(tmp_path):
    rows = [StageScores(1, {"CT": 0.7, "MR": 0.2}, "CT"), StageScores(3, {"pneumonia": 0.5, "normal": 0.5})]
    path = write_scores(rows, tmp_path / "s.jsonl")
    path.write_text(path.read_text() + "\n\n")  # blank lines are skipped
    back = read_scores(path)
    assert back == rows
    assert back[0].rest == pytest.approx(0.1) and back[0].top() == ("CT", 0.7)
    assert back[1].top() == ("pneumonia", 0.5)  # ties: first listed
    assert back[1].gold is None and back[1].rest == 0.0


@pytest.mark.parametrize(
    "line,reason",
    [
        ('{"stage": 1, "probs": {"CT": 0.9}', "Expecting"),  # bad JSON
        ('{"probs": {"CT": 0.9}}', "missing 'stage'"),
        ('{"stage": 4, "probs": {"CT": 0.9}}', "stage must be 1, 2 or 3"),
        ('{"stage": 1, "probs": {"CT": 1.2}}', r"must lie in \[0, 1\]"),
        ('{"stage": 1, "probs": {"CT": 0.7, "MR": 0.4}}', "sum to"),
        ('{"stage": 1, "probs": {}}', "at least one"),
        ('{"stage": 1, "probs": {"<unlisted>": 0.1}}', "reserved"),
        ('[1, 2]', "JSON object"),
    ],
)
def test_read_scores_errors_name_file_and_line(tmp_path, line, reason):
    path = tmp_path / "scores.jsonl"
    path.write_text('{"stage": 2, "probs": {"head": 0.9}, "gold": "head"}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=reason) as info:
        read_scores(path)
    assert str(info.value).startswith(f"{path}: line 3: ")
