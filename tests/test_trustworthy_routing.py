"""Trustworthy routing: route confidence, ties, no-evidence stages, the site's calibration file,
prediction sets and the selective threshold, through the router, the CLI and real DICOM.

The statistics themselves (coverage, risk bound, temperature scaling) are tested on synthetic
distributions in ``test_calibration_statistics.py``; here they are exercised end to end.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from onevlm.calibration.conformal import ConformalFit
from onevlm.calibration.cutoffs import Cutoffs
from onevlm.calibration.scores import StageScores, write_scores
from onevlm.calibration.selective import SelectiveFit
from onevlm.calibration.site import CalibrationError, RoutingSettings, SiteCalibration, StageCalibration
from onevlm.cards import CardRepository
from onevlm.cli import main
from onevlm.inputs import load_input
from onevlm.router import Candidate, Router, StageResponse

from conftest import SAMPLES, pydicom_file


class ScriptedBackend:
    """Answers each stage from a script: ``{stage: (distribution, informative)}``; top-2 are the candidates."""

    def __init__(self, script):
        self.script = script

    def identity(self):
        return {"backend": "scripted", "model": "script"}

    def answer(self, items, requests):
        out = []
        for request in requests:
            distribution, informative = self.script[request.stage]
            ranked = sorted(distribution.items(), key=lambda kv: -kv[1])[:2]
            out.append(StageResponse(tuple(Candidate(a, p) for a, p in ranked), distribution=dict(distribution),
                                     informative=informative))
        return out


@pytest.fixture()
def item():
    return load_input(pydicom_file("17106"))


def _route(small_cards, script, calibration=None):
    router = Router(CardRepository.load(small_cards), ScriptedBackend(script), calibration=calibration)
    return router, router.route(load_input(pydicom_file("17106")))


S1 = {"brain CT scan": 0.8, "brain MRI scan": 0.1, "chest X-ray scan": 0.05, "None": 0.03, "Other": 0.02}
S2 = {"intracranial hemorrhage": 0.7, "Normal": 0.2, "glioma": 0.1}


# -- the outcome rules (module docstring of onevlm.router.outcome) ------------------------------------


def test_route_confidence_is_p1_times_p3_and_never_above_p1(small_cards):
    _, decision = _route(small_cards, {1: (S1, True), 2: (S2, True),
                                       3: ({"MODEL_01": 0.9, "MODEL_02": 0.06, "None": 0.04}, True)})
    assert decision.outcome.outcome == "routed" and decision.model_card_id == "MODEL_01"
    assert decision.confidence == pytest.approx(0.8 * 0.9)
    assert decision.final_confidence == pytest.approx(0.9)  # the paper's stage-3 p, kept for its tables
    rng = np.random.default_rng(0)
    for _ in range(50):
        p1 = rng.dirichlet(np.ones(5))
        p3 = rng.dirichlet(np.ones(3))
        s1 = dict(zip(S1, p1))
        s3 = dict(zip(("MODEL_01", "MODEL_02", "None"), p3))
        _, decision = _route(small_cards, {1: (s1, True), 2: (S2, rng.random() < 0.5), 3: (s3, True)})
        if decision.confidence is not None and decision.cards:
            assert decision.confidence <= decision.outcome.stages[0].p + 1e-12
            assert decision.confidence <= s1[decision.modality] + 1e-12


def test_a_stage3_tie_routes_both_cards_as_a_set(small_cards):
    _, decision = _route(small_cards, {1: (S1, True), 2: (S2, True),
                                       3: ({"MODEL_01": 0.45, "MODEL_02": 0.44, "None": 0.11}, True)})
    assert decision.outcome.outcome == "routed-set" and decision.cards == ("MODEL_01", "MODEL_02")
    assert decision.model_card_id is None
    assert decision.confidence == pytest.approx(0.8 * (0.45 + 0.44))
    stage3 = decision.outcome.stages[2]
    assert stage3.tie and stage3.tied == ("MODEL_01", "MODEL_02") and stage3.margin == pytest.approx(0.01)
    assert any(r.startswith("stage 3 tie") for r in decision.outcome.reasons)


def test_a_stage1_tie_is_review_but_a_none_other_tie_still_stops(small_cards):
    tie = {"brain CT scan": 0.41, "brain MRI scan": 0.40, "chest X-ray scan": 0.09, "None": 0.05, "Other": 0.05}
    _, decision = _route(small_cards, {1: (tie, True), 2: (S2, True), 3: ({"MODEL_01": 0.9, "None": 0.1}, True)})
    assert decision.outcome.outcome == "review" and decision.confidence is None and decision.cards == ()
    assert decision.outcome.reasons[0] == ("stage 1 tie: brain CT scan (0.4100) vs brain MRI scan (0.4000) "
                                           "(margin 0.0100 < 0.02)")
    stop = {"None": 0.45, "Other": 0.44, "brain CT scan": 0.11}
    _, decision = _route(small_cards, {1: (stop, True)})
    assert decision.outcome.outcome == "stopped" and decision.outcome.stages[0].tie
    assert decision.confidence == pytest.approx(0.89)  # P(not routable) = P(None) + P(Other)


def test_no_stage2_evidence_routes_the_modality_cards_not_a_guess(small_cards):
    router, decision = _route(small_cards, {1: (S1, True), 2: ({"Normal": 0.02, "glioma": 0.01}, False),
                                            3: ({"MODEL_01": 0.7, "MODEL_02": 0.2, "None": 0.1}, True)})
    assert decision.finding is None and not decision.finding_assessed
    assert decision.cards == tuple(router.modality_cards("brain CT scan")) == ("MODEL_01", "MODEL_02")
    assert decision.confidence == pytest.approx(0.8 * 0.9)  # P1 x P3(not None)
    assert decision.as_dict()["finding"] is None and decision.stage(2).chosen == "Normal"


def _calibration(stages=None, policy="sets", route_threshold=None, max_set_size=5, identity=None):
    selective = None
    if route_threshold is not None:
        selective = SelectiveFit(alpha=0.1, delta=0.1, threshold=route_threshold, n=100, routed=50, errors=1,
                                 upper_bound=0.09, share_routed=0.5, selective_accuracy=0.98)
    return SiteCalibration(settings=RoutingSettings(policy=policy, max_set_size=max_set_size),
                           stages=stages or {s: StageCalibration(stage=s) for s in (1, 2, 3)},
                           risk=0.1, delta=0.1, route_selective=selective,
                           identity=identity or {"backend": "scripted", "model": "script", "methods": None,
                                                 "prompts": _prompts()})


def _prompts():
    from onevlm.router.prompts import prompt_id

    return [prompt_id(s) for s in (1, 2, 3)]


def test_prediction_sets_decide_routed_set_or_review(small_cards):
    def with_qhat(q1, q3):
        return _calibration({1: StageCalibration(1, conformal=ConformalFit(alpha=0.05, qhat=q1, n=100)),
                             2: StageCalibration(2),
                             3: StageCalibration(3, conformal=ConformalFit(alpha=0.05, qhat=q3, n=100))})

    s3 = {"MODEL_01": 0.6, "MODEL_02": 0.35, "None": 0.05}
    script = {1: (S1, True), 2: (S2, True), 3: (s3, True)}
    _, decision = _route(small_cards, script, with_qhat(0.5, 0.7))  # sets {brain CT} and {MODEL_01, MODEL_02}
    assert decision.outcome.outcome == "routed-set" and decision.cards == ("MODEL_01", "MODEL_02")
    assert decision.outcome.calibrated and decision.outcome.stages[2].prediction_set == ("MODEL_01", "MODEL_02")
    assert decision.confidence == pytest.approx(0.8 * 0.95)
    _, decision = _route(small_cards, script, with_qhat(0.5, 0.5))  # {MODEL_01}
    assert decision.outcome.outcome == "routed" and decision.cards == ("MODEL_01",)
    _, decision = _route(small_cards, script, with_qhat(0.95, 0.5))  # stage 1 holds brain CT and MRI
    assert decision.outcome.outcome == "review" and "modality is uncertain" in decision.outcome.reasons[0]
    _, decision = _route(small_cards, script, with_qhat(0.5, 0.99))  # None joins the set
    assert decision.outcome.outcome == "review" and "holds None" in decision.outcome.reasons[0]
    _, decision = _route(small_cards, script, with_qhat(0.5, math.inf))  # too few calibration studies
    assert decision.outcome.outcome == "review"


def test_selective_policy_routes_one_card_above_the_threshold(small_cards):
    script = {1: (S1, True), 2: (S2, True), 3: ({"MODEL_01": 0.9, "MODEL_02": 0.06, "None": 0.04}, True)}
    _, decision = _route(small_cards, script, _calibration(policy="selective", route_threshold=0.7))
    assert decision.outcome.outcome == "routed" and decision.confidence == pytest.approx(0.72)
    _, decision = _route(small_cards, script, _calibration(policy="selective", route_threshold=0.75))
    assert decision.outcome.outcome == "review"
    assert decision.outcome.reasons[0] == "route confidence 0.7200 below the threshold 0.7500"


def test_temperature_changes_what_people_see(small_cards):
    hot = _calibration({1: StageCalibration(1, temperature=2.0), 2: StageCalibration(2),
                        3: StageCalibration(3, temperature=2.0)})
    script = {1: (S1, True), 2: (S2, True), 3: ({"MODEL_01": 0.9, "MODEL_02": 0.06, "None": 0.04}, True)}
    _, decision = _route(small_cards, script, hot)
    stage1 = decision.outcome.stages[0]
    expected = math.sqrt(0.8) / sum(math.sqrt(p) for p in S1.values())
    assert stage1.p == pytest.approx(expected) and stage1.raw["brain CT scan"] == 0.8
    assert decision.confidence < 0.8 * 0.9 and decision.outcome.calibrated
    assert decision.as_dict()["calibrated"] is True
    assert decision.as_dict()["route"]["calibration"]["calibration_id"] == hot.calibration_id


# -- the calibration file -----------------------------------------------------------------------------


def test_calibration_file_round_trip_and_tamper_check(tmp_path):
    calibration = _calibration({1: StageCalibration(1, temperature=1.7, tau=0.3,
                                                    conformal=ConformalFit(alpha=0.05, qhat=0.8, n=40)),
                                2: StageCalibration(2), 3: StageCalibration(3, conformal=ConformalFit(0.05, math.inf, 10))},
                               policy="selective", route_threshold=0.6)
    path = calibration.save(tmp_path / "calibration.json")
    back = SiteCalibration.load(path)
    assert back.calibration_id == calibration.calibration_id
    assert back.stage(1).temperature == 1.7 and back.cutoffs() == Cutoffs(0.3, None, None)
    assert math.isinf(back.stage(3).conformal.qhat) and back.route_selective.threshold == 0.6
    data = json.loads(path.read_text())
    data["stages"]["1"]["temperature"] = 1.0
    path.write_text(json.dumps(data))
    with pytest.raises(CalibrationError, match="content changed after fitting"):
        SiteCalibration.load(path)
    with pytest.raises(CalibrationError, match="calibration file not found"):
        SiteCalibration.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(CalibrationError, match="bad.json: cannot read"):
        SiteCalibration.load(tmp_path / "bad.json")


def test_a_cutoffs_file_still_reads_and_says_uncalibrated(tmp_path, small_cards):
    path = tmp_path / "cutoffs.json"
    path.write_text(json.dumps({"1": {"tau": 0.2}, "2": None, "3": 0.4}))
    calibration = SiteCalibration.load(path)
    assert not calibration.calibrated and calibration.cutoffs() == Cutoffs(0.2, None, 0.4)
    script = {1: (S1, True), 2: (S2, True), 3: ({"MODEL_01": 0.9, "None": 0.1}, True)}
    router, decision = _route(small_cards, script, calibration)
    assert router.cutoffs == Cutoffs(0.2, None, 0.4)
    assert decision.outcome.calibrated is False and decision.outcome.stages[0].calibrated is None


def test_a_calibration_for_another_model_is_refused(small_cards):
    other = _calibration(identity={"backend": "transformers", "fingerprint": "abc", "quantize": "none",
                                   "answer_mode": "free", "prompts": _prompts()})
    with pytest.raises(CalibrationError, match="backend: fitted for 'transformers', this router has 'scripted'"):
        Router(CardRepository.load(small_cards), ScriptedBackend({}), calibration=other)
    old_prompts = _calibration(identity={"backend": "scripted", "model": "script", "methods": None,
                                         "prompts": ["stage1-v0-00000000", *_prompts()[1:]]})
    with pytest.raises(CalibrationError, match="prompts: fitted for"):
        Router(CardRepository.load(small_cards), ScriptedBackend({}), calibration=old_prompts)
    scores_only = SiteCalibration(stages={1: StageCalibration(1)}, risk=0.1, identity={})
    with pytest.raises(CalibrationError, match="fitted from scores alone"):
        Router(CardRepository.load(small_cards), ScriptedBackend({}), calibration=scores_only)


# -- scores-only entry points (no model) ---------------------------------------------------------------


def _overconfident_rows(n: int, seed: int, k: int = 6, stage: int = 1) -> list[StageScores]:
    """Gold drawn from softmax(z); the 'model' reports softmax(3 z): deliberately over-confident."""
    rng = np.random.default_rng(seed)
    answers = [f"answer {i}" for i in range(k)]
    rows = []
    for _ in range(n):
        z = rng.normal(0, 1.5, k)
        true = np.exp(z - z.max())
        true /= true.sum()
        reported = np.exp(3 * (z - z.max()))
        reported /= reported.sum()
        gold = answers[rng.choice(k, p=true)]
        rows.append(StageScores(stage, {a: float(p) for a, p in zip(answers, reported)}, gold))
    return rows


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2])
def test_calibrate_fit_and_apply_on_scores_keep_the_coverage_promise(tmp_path, capsys, alpha):
    write_scores(_overconfident_rows(1000, seed=1), tmp_path / "cal.jsonl")
    test_rows = _overconfident_rows(3000, seed=2)
    write_scores(test_rows, tmp_path / "test.jsonl")
    assert main(["calibrate", "fit", "--scores", str(tmp_path / "cal.jsonl"), "--risk", str(alpha), "--holdout", "0",
                 "-o", str(tmp_path / "calibration.json")]) == 0
    capsys.readouterr()
    calibration = SiteCalibration.load(tmp_path / "calibration.json")
    assert calibration.stage(1).temperature > 2  # the fit saw the over-confidence
    assert main(["calibrate", "apply", "--calibration", str(tmp_path / "calibration.json"),
                 "--scores", str(tmp_path / "test.jsonl"), "--json"]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(results) == len(test_rows)
    covered = np.mean([row.gold in result["set"] for row, result in zip(test_rows, results)])
    n = len(test_rows)
    tolerance = 3 * math.sqrt(alpha * (1 - alpha) * (1 / n + 1 / 1002))
    assert covered >= 1 - alpha - tolerance, (alpha, covered)
    assert covered <= 1 - alpha + 0.05  # the promise, not a trivial "everything" set
    for result in results:
        assert {"stage", "set", "outcome", "confidence"} <= set(result)
        assert 0 <= result["confidence"] <= 1
        size = len(result["set"])
        if result["outcome"] == "routed":
            assert size == 1 and not result["tie"]
        elif result["outcome"] == "routed-set":
            assert 2 <= size <= calibration.settings.max_set_size
    outcomes = {r["outcome"] for r in results}
    assert "routed" in outcomes and ("routed-set" in outcomes or "review" in outcomes)


def test_calibrate_fit_on_scores_reports_held_out_figures(tmp_path, capsys):
    write_scores(_overconfident_rows(1500, seed=3), tmp_path / "cal.jsonl")
    assert main(["calibrate", "fit", "--scores", str(tmp_path / "cal.jsonl"), "--risk", "0.3", "--holdout", "0.4",
                 "--policy", "selective", "-o", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert "held-out figures:" in out and "ECE " in out and "coverage " in out
    calibration = SiteCalibration.load(tmp_path / "c.json")
    heldout = calibration.heldout["1"]
    assert heldout["n"] == 600
    assert heldout["ece_after"] < heldout["ece_before"]  # temperature scaling helped on held-out rows
    assert heldout["coverage"]["coverage"] >= 0.7 - heldout["coverage"]["tolerance"]
    # selective: a threshold is certified at alpha 0.3, and the held-out cases it routes are right at least
    # about 70 % of the time (binomial tolerance on the routed count)
    fitted = calibration.stage(1).selective
    assert fitted.threshold is not None and fitted.upper_bound <= 0.3
    routed = heldout["selective"]["routed"]
    assert routed > 0 and heldout["selective"]["selective_accuracy"] >= 0.7 - 3 * math.sqrt(0.21 / routed)
    # at alpha 0.1 nothing is certifiable on these scores (the most confident 22 already hold 3 errors):
    # the honest answer is "every case to a person", not a threshold
    assert main(["calibrate", "fit", "--scores", str(tmp_path / "cal.jsonl"), "--risk", "0.1", "--holdout", "0.4",
                 "--policy", "selective", "-o", str(tmp_path / "strict.json")]) == 0
    capsys.readouterr()
    assert SiteCalibration.load(tmp_path / "strict.json").stage(1).selective.threshold is None
    assert main(["calibrate", "apply", "--calibration", str(tmp_path / "strict.json"),
                 "--scores", str(tmp_path / "cal.jsonl"), "--json"]) == 0
    assert {json.loads(line)["outcome"] for line in capsys.readouterr().out.splitlines()} == {"review"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"stage": 1, "probs": {"a": 0.7, "b": 0.6}, "gold": "a"}\n')
    assert main(["calibrate", "fit", "--scores", str(bad), "-o", str(tmp_path / "x.json")]) == 1
    assert "bad.jsonl: line 1" in capsys.readouterr().err


# -- the site's own labelled studies: real DICOM, the embedded backend ----------------------------------


VARIANTS = [
    # (source sample, header changes, modality, finding, card)
    ("ct_head_routine_brain.dcm", {}, "brain CT scan", "", "?"),
    ("ct_head_routine_brain.dcm", {"ReasonForStudy": "suspected intracranial hemorrhage"}, "brain CT scan",
     "intracranial hemorrhage", "MODEL_02"),
    ("ct_head_routine_brain.dcm", {"ReasonForStudy": "acute ischemic stroke"}, "brain CT scan",
     "acute ischemic stroke", "MODEL_04"),
    ("ct_head_routine_brain.dcm", {"ReasonForStudy": "calvarial fracture after a fall"}, "brain CT scan",
     "calvarial fracture", "MODEL_03"),
    ("cr_chest_j2k.dcm", {}, "chest X-ray scan", "", "?"),
    ("cr_chest_j2k.dcm", {"ReasonForStudy": "pneumothorax"}, "chest X-ray scan", "pneumothorax", "MODEL_92"),
    ("cr_chest_j2k.dcm", {"ReasonForStudy": "cardiomegaly"}, "chest X-ray scan", "cardiomegaly", "MODEL_89"),
    ("cr_chest_j2k.dcm", {"ReasonForStudy": "pneumonia"}, "chest X-ray scan", "pneumonia", "MODEL_91"),
    ("us_small_parts_j2k.dcm", {"BodyPartExamined": "BREAST"}, "breast ultrasound scan", "", "?"),
    ("us_small_parts_j2k.dcm", {"BodyPartExamined": "BREAST", "ReasonForStudy": "breast lesion"},
     "breast ultrasound scan", "breast lesion", "MODEL_20"),
    ("us_small_parts_j2k.dcm", {"BodyPartExamined": "LIVER", "ReasonForStudy": "hepatic steatosis"},
     "liver ultrasound scan", "hepatic steatosis", "MODEL_67"),
    ("us_small_parts_j2k.dcm", {}, "Other", "", ""),
    ("cr_extremity_j2k.dcm", {}, "Other", "", ""),
    ("us_echocardiogram.dcm", {}, "Other", "", ""),
    ("mr_abdomen_liver.dcm", {}, "Other", "", ""),
    ("rt_plan.dcm", {}, "None", "", ""),
    ("sr_simple_image_report.dcm", {}, "None", "", ""),
]


@pytest.fixture(scope="module")
def labelled_site(tmp_path_factory) -> Path:
    """A site's labelled studies: real sample files, their headers varied as scanners write them, labelled."""
    root = tmp_path_factory.mktemp("site")
    rows = []
    for copy in range(3):
        for i, (name, changes, modality, finding, card) in enumerate(VARIANTS):
            ds = pydicom.dcmread(SAMPLES / name)
            for keyword, value in changes.items():
                setattr(ds, keyword, value)
            ds.SeriesDescription = ("", "AXIAL", "ROUTINE")[copy]
            ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            path = root / "dicom" / f"{copy}_{i:02d}_{name}"
            path.parent.mkdir(exist_ok=True)
            ds.save_as(path)
            rows.append((path.relative_to(root), modality, finding, card))
    with (root / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "modality", "finding", "card"])
        writer.writerows(rows)
    return root


@pytest.mark.slow
def test_calibrate_fit_on_labelled_dicom_then_route_with_it(labelled_site, tmp_path, capsys):
    calibration_file = tmp_path / "calibration.json"
    assert main(["calibrate", "fit", str(labelled_site / "labels.csv"), "--risk", "0.2", "--holdout", "0.3",
                 "-o", str(calibration_file)]) == 0
    out = capsys.readouterr().out
    assert "held-out figures:" in out and "stage 1: n=" in out
    calibration = SiteCalibration.load(calibration_file)
    assert calibration.identity["backend"] == "embedded" and calibration.identity["prompts"] == _prompts()
    assert calibration.fitted["inputs"] == 3 * len(VARIANTS) and calibration.fitted["holdout"] == 15
    assert calibration.fitted["alpha_per_set_stage"] == pytest.approx(0.1)
    for stage in (1, 2):
        assert calibration.stage(stage).n > 0 and calibration.stage(stage).temperature > 0
    report = calibration.heldout
    assert report["n"] == 15 and set(report["stages"]) >= {"1"}
    assert report["route"]["n"] > 0 and "aurc" in report["route"]
    plots = tmp_path / "calibration_report"
    assert (plots / "reliability_stage1.png").read_bytes()[:4] == b"\x89PNG"
    assert (plots / "risk_coverage.png").read_bytes()[:4] == b"\x89PNG"

    assert main(["route", str(SAMPLES / "cr_chest_j2k.dcm"), str(SAMPLES / "us_small_parts_j2k.dcm"),
                 "--calibration", str(calibration_file), "--json", "--log", str(tmp_path / "log.jsonl")]) == 0
    chest, tie = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    for record in (chest, tie):
        assert record["calibrated"] is True
        assert record["route"]["calibration"]["calibration_id"] == calibration.calibration_id
        if record["confidence"] is not None and record["cards"]:
            assert record["confidence"] <= record["route"]["stages"][0]["p"] + 1e-9
    assert tie["outcome"] == "review"  # a calibration never turns a coin flip into a decision

    # the same fit from a decision log instead of routing again
    assert main(["route", str(labelled_site / "dicom"), "--json", "--log", str(tmp_path / "site.jsonl")]) == 0
    capsys.readouterr()
    assert main(["calibrate", "fit", str(labelled_site / "labels.csv"), "--decisions", str(tmp_path / "site.jsonl"),
                 "--risk", "0.2", "--holdout", "0.3", "-o", str(tmp_path / "from_log.json")]) == 0
    from_log = SiteCalibration.load(tmp_path / "from_log.json")
    assert from_log.stage(1).temperature == pytest.approx(calibration.stage(1).temperature, rel=1e-6)


@pytest.mark.slow
def test_router_evaluate_reports_calibration_on_a_held_out_split(labelled_site, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["router", "evaluate", str(labelled_site / "labels.csv"), "--holdout", "0.4", "--risk", "0.2",
                 "-o", str(out)]) == 0
    capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())
    section = summary["calibration"]
    assert section["heldout"]["n"] == round(0.4 * 3 * len(VARIANTS))
    stage1 = section["heldout"]["stages"]["1"]
    assert stage1["ece_before"] is not None and stage1["ece_after"] is not None
    assert "coverage" in stage1 and stage1["coverage"]["alpha"] == pytest.approx(0.1)
    assert (out / "calibration.json").exists() and (out / "risk_coverage.png").exists()
    text = (out / "summary.md").read_text()
    assert "## Calibration cal-" in text and "| Stage | n | ECE before | ECE after |" in text
    # the paper's table counts the rows with a final label, and says which
    assert "inputs whose card label is not '?'" in text
    # without cutoffs the reliability diagram holds one curve (the cutoff run is the baseline)
    assert summary["cutoff"]["cutoffs"] == {"1": None, "2": None, "3": None}


def test_route_with_a_mismatched_calibration_fails_with_a_clear_error(tmp_path, capsys):
    other = _calibration(identity={"backend": "transformers", "fingerprint": "abc", "quantize": "none",
                                   "answer_mode": "free", "prompts": _prompts()})
    path = other.save(tmp_path / "calibration.json")
    assert main(["route", str(SAMPLES / "rt_plan.dcm"), "--calibration", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: calibration {other.calibration_id} does not fit this router" in err
    assert "backend: fitted for 'transformers', this router has 'embedded'" in err
