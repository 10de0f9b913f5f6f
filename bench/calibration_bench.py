"""Held-out figures of the site calibration on synthetic, deliberately over-confident scores.

Not a speed benchmark: the statistics behind ``onevlm calibrate`` measured the way a site would,
many times over. Each repeat draws a calibration set and a held-out set from the same
distribution (gold drawn from softmax(z), the "backend" reports softmax(3 z), K answers), fits
with :func:`onevlm.calibration.fitting.fit_from_scores` (what ``calibrate fit --scores`` runs) and
applies with :func:`~onevlm.calibration.fitting.apply_to_scores` (``calibrate apply``). Printed per
α: mean held-out coverage (and its spread over repeats) against 1 - α, mean set size, the share of
repeats whose coverage fell below 1 - α by more than the binomial tolerance, ECE of the top answer
before and after temperature scaling, the fitted temperature, and for the selective policy the
share routed and the held-out error rate among routed cases. ``--top2`` keeps only each row's two
most probable answers (the paper's free-text mode).

    python bench/calibration_bench.py [--cal 1000] [--test 5000] [--repeats 20] [--top2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onevlm.calibration.ece import expected_calibration_error  # noqa: E402
from onevlm.calibration.fitting import apply_to_scores, fit_from_scores, top_correct  # noqa: E402
from onevlm.calibration.scores import StageScores  # noqa: E402
from onevlm.calibration.site import RoutingSettings  # noqa: E402

ALPHAS = (0.05, 0.1, 0.2)
SELECTIVE_ALPHA = 0.3
DELTA = 0.1


def draw(n: int, rng: np.random.Generator, k: int, top2: bool) -> list[StageScores]:
    answers = [f"answer {i}" for i in range(k)]
    z = rng.normal(0.0, 1.5, (n, k))
    true = np.exp(z - z.max(axis=1, keepdims=True))
    true /= true.sum(axis=1, keepdims=True)
    reported = np.exp(3 * (z - z.max(axis=1, keepdims=True)))
    reported /= reported.sum(axis=1, keepdims=True)
    rows = []
    for i in range(n):
        gold = answers[rng.choice(k, p=true[i])]
        probs = {a: float(p) for a, p in zip(answers, reported[i])}
        if top2:
            probs = dict(sorted(probs.items(), key=lambda kv: -kv[1])[:2])
        rows.append(StageScores(1, probs, gold))
    return rows


def run(cal: int, test: int, repeats: int, k: int, top2: bool, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    out: dict = {"cal": cal, "test": test, "repeats": repeats, "k": k, "top2": top2, "sets": {}, "selective": {}}
    for alpha in ALPHAS:
        coverages, sizes, below, temperatures, ece_before, ece_after, open_sets = [], [], 0, [], [], [], 0
        listed, reviews = [], []
        for _ in range(repeats):
            calibration = fit_from_scores(draw(cal, rng, k, top2), alpha, DELTA)
            held = draw(test, rng, k, top2)
            results = apply_to_scores(calibration, held)
            fitted = calibration.stage(1)
            if fitted.conformal.open_set:
                open_sets += 1
            # a review case counts as covered: a person sees every answer (an open set always goes to review)
            covered = np.mean([row.gold in r["set"] or r["outcome"] == "review" for row, r in zip(held, results)])
            coverages.append(float(covered))
            listed.append(float(np.mean([row.gold in r["set"] for row, r in zip(held, results)])))
            reviews.append(float(np.mean([r["outcome"] == "review" for r in results])))
            sizes.append(float(np.mean([len(r["set"]) for r in results])))
            tolerance = 3 * math.sqrt(alpha * (1 - alpha) * (1 / test + 1 / (cal + 2)))
            below += covered < 1 - alpha - tolerance
            temperatures.append(fitted.temperature)
            ece_before.append(expected_calibration_error(*top_correct(held)).ece)
            ece_after.append(expected_calibration_error(*top_correct([fitted.calibrate(r) for r in held])).ece)
        out["sets"][str(alpha)] = {
            "target": 1 - alpha, "coverage_mean": float(np.mean(coverages)), "coverage_sd": float(np.std(coverages)),
            "coverage_min": float(np.min(coverages)), "coverage_by_set_alone": float(np.mean(listed)),
            "review_share": float(np.mean(reviews)), "mean_set_size": float(np.mean(sizes)),
            "repeats_below_tolerance": int(below), "open_sets": open_sets,
            "temperature_mean": float(np.mean(temperatures)),
            "ece_before": float(np.mean(ece_before)), "ece_after": float(np.mean(ece_after)),
        }
    shares, risks, violations, certified = [], [], 0, 0
    for _ in range(repeats):
        calibration = fit_from_scores(draw(cal, rng, k, top2), SELECTIVE_ALPHA, DELTA,
                                      settings=RoutingSettings(policy="selective"))
        held = draw(test, rng, k, top2)
        results = apply_to_scores(calibration, held)
        routed = [(row, r) for row, r in zip(held, results) if r["outcome"] == "routed"]
        shares.append(len(routed) / len(held))
        if routed:
            certified += 1
            risk = float(np.mean([r["top"] != row.gold for row, r in routed]))
            risks.append(risk)
            violations += risk > SELECTIVE_ALPHA
    out["selective"] = {"alpha": SELECTIVE_ALPHA, "delta": DELTA, "certified_repeats": certified,
                        "share_routed_mean": float(np.mean(shares)),
                        "heldout_risk_mean": float(np.mean(risks)) if risks else None,
                        "repeats_risk_above_alpha": int(violations)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cal", type=int, default=1000, help="calibration rows per repeat")
    parser.add_argument("--test", type=int, default=5000, help="held-out rows per repeat")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--answers", type=int, default=6, help="admissible answers per row")
    parser.add_argument("--top2", action="store_true", help="keep each row's two most probable answers only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    started = time.perf_counter()
    result = run(args.cal, args.test, args.repeats, args.answers, args.top2, args.seed)
    result["seconds"] = round(time.perf_counter() - started, 1)
    mode = "top-2 only" if args.top2 else "full distributions"
    print(f"calibration bench: {mode}, K={args.answers}, {args.cal} calibration / {args.test} held-out rows, "
          f"{args.repeats} repeats (reported = softmax(3 z), gold ~ softmax(z))")
    print("coverage: the gold answer is in the set, or the row went to review; 'in set' ignores review")
    print(f"{'alpha':>6} {'target':>7} {'coverage':>9} {'sd':>6} {'min':>6} {'in set':>7} {'review':>7} {'set size':>9} "
          f"{'below tol':>9} {'open':>5} {'T':>5} {'ECE before':>10} {'ECE after':>9}")
    for alpha, r in result["sets"].items():
        print(f"{alpha:>6} {r['target']:>7.3f} {r['coverage_mean']:>9.4f} {r['coverage_sd']:>6.4f} "
              f"{r['coverage_min']:>6.4f} {r['coverage_by_set_alone']:>7.4f} {r['review_share']:>7.3f} "
              f"{r['mean_set_size']:>9.2f} {r['repeats_below_tolerance']:>9d} "
              f"{r['open_sets']:>5d} {r['temperature_mean']:>5.2f} {r['ece_before']:>10.4f} {r['ece_after']:>9.4f}")
    s = result["selective"]
    risk = "n/a" if s["heldout_risk_mean"] is None else f"{s['heldout_risk_mean']:.4f}"
    print(f"selective (alpha {s['alpha']}, delta {s['delta']}): certified in {s['certified_repeats']}/{args.repeats} "
          f"repeats, share routed {s['share_routed_mean']:.3f}, held-out risk among routed {risk}, "
          f"repeats with risk > alpha: {s['repeats_risk_above_alpha']}")
    print(f"({result['seconds']} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
