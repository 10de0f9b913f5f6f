"""The hybrid router: header and pixels pooled per stage, the cascade, disagreement, the scores-only contract."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from onevlm.calibration.fusion import (
    Fusion,
    SourceRow,
    StageFusion,
    complete,
    fit_stage_fusion,
    flat,
)
from onevlm.cli import main
from scripted_pixels import FixedPixels

SAMPLES = Path(__file__).resolve().parents[1] / "dicom_samples"
ANSWERS = ("brain CT scan", "chest CT scan", "kidney CT scan", "None", "Other")


# -- the mathematics -----------------------------------------------------------------------------


def test_complete_shares_the_unlisted_mass_and_drops_answers_outside_the_set():
    probs = complete({"brain CT scan": 0.7, "chest CT scan": 0.1, "a cat": 0.1}, ANSWERS)
    assert list(probs) == list(ANSWERS)
    assert probs["brain CT scan"] == pytest.approx(0.7) and probs["chest CT scan"] == pytest.approx(0.1)
    # "a cat" is no admissible answer: its mass is unlisted, shared by the three unlisted answers
    assert probs["kidney CT scan"] == pytest.approx(0.2 / 3) == probs["None"] == probs["Other"]
    assert math.fsum(probs.values()) == pytest.approx(1.0)
    assert complete(None, ANSWERS) is None


def test_pooling_with_unit_weights_is_the_normalised_product():
    fusion = StageFusion(stage=1)
    header = complete({"brain CT scan": 0.6, "chest CT scan": 0.3}, ANSWERS)
    pixels = complete({"brain CT scan": 0.2, "chest CT scan": 0.7}, ANSWERS)
    pooled = fusion.pooled(header, pixels, ANSWERS)
    product = {a: header[a] * pixels[a] for a in ANSWERS}
    total = sum(product.values())
    for answer in ANSWERS:
        assert pooled[answer] == pytest.approx(product[answer] / total, rel=1e-6)
    # header alone at T = 1 is the header (the floor inside the logarithms is negligible)
    alone = fusion.header_alone(header, ANSWERS)
    assert all(alone[a] == pytest.approx(header[a], abs=1e-5) for a in ANSWERS)
    # a flat source adds nothing: pooling with it is the other source
    assert fusion.pooled(flat(ANSWERS), pixels, ANSWERS)["chest CT scan"] == pytest.approx(pixels["chest CT scan"])


def test_gate_and_disagreement():
    fusion = StageFusion(stage=1, gate=0.9, margin=0.5)
    sure = {"brain CT scan": 0.95, "chest CT scan": 0.02, "kidney CT scan": 0.01, "None": 0.01, "Other": 0.01}
    unsure = {"brain CT scan": 0.6, "chest CT scan": 0.3, "kidney CT scan": 0.05, "None": 0.03, "Other": 0.02}
    assert fusion.header_decides(sure) and not fusion.header_decides(unsure)
    assert "certifies brain CT scan" in fusion.gate_reason(sure)
    assert "not certain enough" in fusion.gate_reason(unsure)
    assert not StageFusion(stage=1, gate=None).header_decides(sure)
    pixels = complete({"chest CT scan": 0.93, "brain CT scan": 0.02}, ANSWERS)
    flagged = fusion.disagreement(unsure, pixels)
    assert flagged is not None and (flagged.header_answer, flagged.pixels_answer) == ("brain CT scan", "chest CT scan")
    assert flagged.margin == pytest.approx(0.91)
    assert flagged.text("Modality CT, BodyPartExamined HEAD") == (
        "header says brain CT scan (Modality CT, BodyPartExamined HEAD); the image looks like chest CT scan (p 0.93)")
    agreeing = complete({"brain CT scan": 0.9}, ANSWERS)
    assert fusion.disagreement(unsure, agreeing) is None
    weak = complete({"chest CT scan": 0.5, "brain CT scan": 0.3}, ANSWERS)
    assert fusion.disagreement(unsure, weak) is None  # 0.2 < margin 0.5: no contradiction
    mix = fusion.mix(unsure, pixels, ANSWERS, "pixels")
    assert mix.disagreement is not None and mix.probs["chest CT scan"] == pytest.approx(0.93, abs=1e-6)


def _rows(n: int, header_right: float, pixels_right: float, seed: int) -> list[SourceRow]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        gold = rng.choice(ANSWERS[:3])
        others = [a for a in ANSWERS[:3] if a != gold]
        said_h = gold if rng.random() < header_right else rng.choice(others)
        said_v = gold if rng.random() < pixels_right else rng.choice(others)
        rows.append(SourceRow(1, ANSWERS, complete({said_h: 0.8}, ANSWERS), complete({said_v: 0.8}, ANSWERS), gold))
    return rows


def test_fitted_weights_follow_each_sources_reliability():
    # pixels at chance among the three likely answers get little weight (they only tell those from None/Other);
    # a reliable source that says 0.8 when it is right 95 % of the time is under-confident: weight above 1
    noise = fit_stage_fusion(1, _rows(400, header_right=0.95, pixels_right=1 / 3, seed=1), 0.1)
    assert noise.pixel_weight < 0.3 and noise.header_weight > 1.0
    informative = fit_stage_fusion(1, _rows(400, header_right=1 / 3, pixels_right=0.97, seed=2), 0.1)
    assert informative.header_weight < 0.3 and informative.pixel_weight > 1.0
    # a header right 95 % of the time at 0.8 is certified alone; one right a third of the time never is
    assert noise.gate is not None and 0.5 <= noise.gate <= 1.0
    assert informative.gate is None
    assert noise.n == 400 and noise.n_pixels == 400


def test_fusion_round_trips_and_refuses_bad_values():
    fusion = Fusion(stages={1: StageFusion(stage=1, gate=0.97, margin=0.4, header_weight=0.8)}, calibrated=True,
                    answers={1: ANSWERS})
    assert Fusion.from_dict(json.loads(json.dumps(fusion.as_dict()))) == fusion
    assert fusion.stage(2) == StageFusion(stage=2)  # an unfitted stage: the defaults
    with pytest.raises(ValueError, match="gate"):
        StageFusion(stage=1, gate=0.3)
    with pytest.raises(ValueError, match="on_disagreement"):
        Fusion(on_disagreement="ignore")
    with pytest.raises(ValueError, match="unknown key"):
        Fusion.from_dict({"stages": {"1": {"gate": 0.9, "weight": 2}}})


# -- the scores-only contract ---------------------------------------------------------------------


def _line(stage, header, pixels, gold=None):
    record = {"stage": stage, "header": header, "pixels": pixels}
    if gold is not None:
        record["gold"] = gold
    return json.dumps(record)


def _write_lines(path: Path, n: int, seed: int, labelled: bool = True) -> Path:
    """Headers right 85 % (sure ones more often right), pixels right 85 %: a site's calibration rows."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        gold = rng.choice(ANSWERS[:3])
        sure = rng.random() < 0.6
        said = gold if rng.random() < (0.99 if sure else 0.6) else rng.choice([a for a in ANSWERS[:3] if a != gold])
        header = {said: 0.97 if sure else 0.7}
        header.update({a: (1 - header[said]) / 4 for a in ANSWERS if a != said})
        seen = gold if rng.random() < 0.85 else rng.choice([a for a in ANSWERS[:3] if a != gold])
        pixels = {seen: round(rng.uniform(0.6, 0.97), 3)}
        lines.append(_line(1, header, pixels, gold if labelled else None))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_scores_contract_fit_and_apply(tmp_path, capsys):
    fit = _write_lines(tmp_path / "cal.jsonl", 600, seed=3)
    test = _write_lines(tmp_path / "test.jsonl", 300, seed=4)
    calibration = tmp_path / "calibration.json"
    assert main(["calibrate", "fit", "--scores", str(fit), "--risk", "0.1", "-o", str(calibration)]) == 0
    saved = json.loads(calibration.read_text())
    stage = saved["fusion"]["stages"]["1"]
    assert saved["fusion"]["calibrated"] is True and stage["gate"] is not None
    capsys.readouterr()
    assert main(["calibrate", "apply", "--calibration", str(calibration), "--scores", str(test), "--json"]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(results) == 300
    assert set(results[0]) >= {"stage", "set", "outcome", "confidence", "consulted", "disagreement"}
    header_only = [r for r in results if r["consulted"] == ["header"]]
    pooled = [r for r in results if r["consulted"] == ["header", "pixels"]]
    assert header_only and pooled and len(header_only) + len(pooled) == 300
    # held-out coverage of the stage set at alpha 0.1 (the rows are exchangeable)
    golds = [json.loads(line)["gold"] for line in test.read_text().splitlines()]
    covered = sum(g in r["set"] or r["outcome"] == "review" for r, g in zip(results, golds))
    assert covered / len(results) >= 0.9 - 0.05
    flagged = [r for r in results if r["disagreement"]]
    assert flagged and all(r["outcome"] == "review" and "the image looks like" in r["disagreement_text"]
                           for r in flagged)


def test_a_header_decided_line_does_not_depend_on_its_pixels(tmp_path, capsys):
    fit = _write_lines(tmp_path / "cal.jsonl", 600, seed=5)
    calibration = tmp_path / "calibration.json"
    assert main(["calibrate", "fit", "--scores", str(fit), "--risk", "0.1", "-o", str(calibration)]) == 0
    gate = json.loads(calibration.read_text())["fusion"]["stages"]["1"]["gate"]
    sure = {"brain CT scan": 0.99, "chest CT scan": 0.0025, "kidney CT scan": 0.0025, "None": 0.0025, "Other": 0.0025}
    assert max(sure.values()) >= gate
    outputs = []
    for pixels in ({"chest CT scan": 0.99}, {"brain CT scan": 0.99}, None):
        scores = tmp_path / "one.jsonl"
        scores.write_text(_line(1, sure, pixels) + "\n")
        capsys.readouterr()
        assert main(["calibrate", "apply", "--calibration", str(calibration), "--scores", str(scores), "--json"]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0] == outputs[1] == outputs[2]
    assert outputs[0]["consulted"] == ["header"] and outputs[0]["set"] == ["brain CT scan"]
    # an uncertain header without pixels is decided on the header alone, and says so
    scores.write_text(_line(1, {"brain CT scan": 0.5, "chest CT scan": 0.45}, None) + "\n")
    assert main(["calibrate", "apply", "--calibration", str(calibration), "--scores", str(scores), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["consulted"] == ["header"] and "no pixel evidence given" in result["reason"]


@pytest.mark.parametrize("bad, message", [
    ({"stage": 1, "header": {"brain CT scan": 0.7, "chest CT scan": 0.6}}, "line 2: header: probabilities sum to"),
    ({"stage": 1, "header": {"brain CT scan": 0.7}, "pixels": {"a cat": 0.9}}, "line 2: answer(s) 'a cat' are not admissible"),
    ({"stage": 1, "header": {"brain CT scan": -0.1}}, "line 2: header: probability of 'brain CT scan' must be a number"),
    ({"stage": 4, "header": {"brain CT scan": 0.7}}, "line 2: stage must be 1, 2 or 3"),
    ({"stage": 1, "pixels": {"brain CT scan": 0.7}}, "line 2: missing 'header'"),
])
def test_a_bad_line_is_an_error_naming_it_and_nothing_is_applied(tmp_path, capsys, bad, message):
    calibration = tmp_path / "calibration.json"
    assert main(["calibrate", "fit", "--scores", str(_write_lines(tmp_path / "cal.jsonl", 300, seed=6)),
                 "-o", str(calibration)]) == 0
    scores = tmp_path / "test.jsonl"
    scores.write_text(_line(1, {"brain CT scan": 0.9}, None) + "\n" + json.dumps(bad) + "\n")
    capsys.readouterr()
    assert main(["calibrate", "apply", "--calibration", str(calibration), "--scores", str(scores), "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err


# -- the hybrid backend in the router --------------------------------------------------------------


@pytest.fixture(scope="module")
def cards():
    from onevlm.cards import CardRepository, default_cards_dir

    return CardRepository.load(default_cards_dir())


@pytest.fixture(scope="module")
def header_source(cards):
    from onevlm.backends.embedded import EmbeddedBackend

    backend = EmbeddedBackend(cards)
    backend.warm_up()
    return backend


def _router(cards, header_source, pixels, fusion=None, calibration=None):
    from onevlm.backends.hybrid import HybridBackend
    from onevlm.router.pipeline import Router

    return Router(cards, HybridBackend(header_source, pixels, fusion), calibration=calibration)


def _route(router, *names):
    from onevlm.inputs import load_input

    return router.route_many([load_input(SAMPLES / name) for name in names])


def test_objects_without_pixels_and_certain_headers_cost_no_vlm_call(cards, header_source):
    pixels = FixedPixels({})
    router = _router(cards, header_source, pixels)
    sr, rt, nm = _route(router, "sr_simple_image_report.dcm", "rt_plan.dcm", "nm_whole_body_j2k.dcm")
    assert pixels.calls == []
    for decision in (sr, rt, nm):
        assert decision.vlm_calls == 0 and decision.stages[0].consulted == ("header",)
    assert sr.stages[0].consultation.reason.startswith("no pixels to read")
    assert "certifies Other" in nm.stages[0].consultation.reason
    assert nm.outcome_name == "stopped"


def test_an_uncertain_header_asks_the_pixels_and_the_pooled_answer_decides(cards, header_source):
    # only Body Part Examined backs brain CT in this header: the pixels are read at stages 1 and 2
    pixels = FixedPixels({"ct_head_512_j2k.dcm": {
        1: {"brain CT scan": 0.9, "chest CT scan": 0.05},
        2: {"acute ischemic stroke": 0.9, "Normal": 0.05},
    }})
    (decision,) = _route(_router(cards, header_source, pixels), "ct_head_512_j2k.dcm")
    assert pixels.calls == [("ct_head_512_j2k.dcm", 1), ("ct_head_512_j2k.dcm", 2)]
    assert decision.vlm_calls == 2
    first, second, third = decision.stages
    assert first.consulted == ("header", "pixels") and "only BodyPartExamined backs it" in first.consultation.reason
    assert first.chosen == "brain CT scan" and first.confidence > 0.99  # two sources agree
    assert second.consulted == ("header", "pixels") and second.chosen == "acute ischemic stroke"
    assert second.consultation.reason == "the header names no finding: the pixels decide"
    assert second.consultation.sources["header"] is None  # the header had no evidence at stage 2
    assert third.consulted == () and third.vlm_calls == 0  # stage 3 is text only
    assert decision.disagreement is None
    # the finding splits the modality's set: one card (MODEL_04, the stroke card), not the four brain CT cards
    assert decision.outcome_name == "routed" and decision.cards == ("MODEL_04",)
    record = decision.as_dict()
    assert record["vlm_calls"] == 2 and record["stages"][0]["consulted"] == ["header", "pixels"]


def test_a_contradicting_image_is_a_disagreement_sent_to_review(cards, header_source):
    pixels = FixedPixels({"ct_head_512_j2k.dcm": {1: {"chest CT scan": 0.95, "brain CT scan": 0.01}}})
    (decision,) = _route(_router(cards, header_source, pixels), "ct_head_512_j2k.dcm")
    flag = decision.stages[0].consultation.disagreement
    assert flag is not None and (flag.header_answer, flag.pixels_answer) == ("brain CT scan", "chest CT scan")
    assert decision.outcome_name == "review"
    assert decision.disagreement == ("stage 1: header says brain CT scan (Modality CT, BodyPartExamined HEAD); "
                                     "the image looks like chest CT scan (p 0.95)")
    assert decision.outcome.reasons[0].startswith("header and image disagree: stage 1: header says brain CT scan")
    # stage 1 already sends the case to review: the pixels are not read at stage 2
    assert pixels.calls == [("ct_head_512_j2k.dcm", 1)]
    assert "already sends the case to review" in decision.stages[1].consultation.reason
    # the site's policy "pixels": the stage is decided on the pixels, the route goes on, flagged
    (decided,) = _route(_router(cards, header_source, pixels, Fusion(on_disagreement="pixels")),
                        "ct_head_512_j2k.dcm")
    assert decided.stages[0].chosen == "chest CT scan" and decided.outcome_name != "review"
    assert decided.disagreement and any("decided on the pixels" in r for r in decided.outcome.reasons)


def test_unreadable_pixels_fall_back_to_the_header_and_say_so(cards, header_source):
    class Broken(FixedPixels):
        def answer(self, items, requests):
            raise RuntimeError("cannot decode pixel data")

    (decision,) = _route(_router(cards, header_source, Broken({})), "ct_head_512_j2k.dcm")
    assert decision.error is None and decision.stages[0].consulted == ("header",)
    assert "could not be read (cannot decode pixel data)" in decision.stages[0].consultation.reason
    assert decision.vlm_calls == 0


def test_a_calibration_with_another_fusion_is_refused(cards, header_source, tmp_path):
    from onevlm.calibration.site import CalibrationError, SiteCalibration

    router = _router(cards, header_source, FixedPixels({}))
    calibration = SiteCalibration(identity=router.identity, fusion=Fusion(calibrated=True))
    with pytest.raises(CalibrationError, match="without calibration .*'s fusion"):
        _router(cards, header_source, FixedPixels({}), calibration=calibration)
    assert _router(cards, header_source, FixedPixels({}), Fusion(calibrated=True), calibration).calibration is calibration
    embedded_calibration = SiteCalibration(identity={"backend": "embedded"})
    with pytest.raises(CalibrationError, match="does not fit this router"):
        _router(cards, header_source, FixedPixels({}), calibration=embedded_calibration)


def test_calibrate_fit_on_labelled_dicom_fits_the_fusion_and_routes_with_it(cards, header_source, tmp_path):
    """calibrate fit reads both sources of every labelled input once, fits the fusion on the fitting split,
    then fits the sets on what the cascade produces; the router loads the result."""
    import csv

    from onevlm.backends.hybrid import HybridBackend
    from onevlm.calibration.site import SiteCalibration
    from onevlm.router.site_calibration import calibrate_from_labels

    names = ["ct_head_routine_brain.dcm", "ct_head_512_j2k.dcm", "mr_brain_pilot.dcm", "cr_chest_j2k.dcm",
             "nm_whole_body_j2k.dcm", "rt_plan.dcm"]
    gold = {"ct_head_routine_brain.dcm": "brain CT scan", "ct_head_512_j2k.dcm": "brain CT scan",
            "mr_brain_pilot.dcm": "brain MRI scan", "cr_chest_j2k.dcm": "chest X-ray scan",
            "nm_whole_body_j2k.dcm": "Other", "rt_plan.dcm": "None"}
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "modality", "finding", "card"])
        for _ in range(6):
            for name in names:
                writer.writerow([str(SAMPLES / name), gold[name], "", "?"])
    pixels = FixedPixels({name: {1: {gold[name]: 0.9}} for name in names})
    calibration = calibrate_from_labels(labels, cards, HybridBackend(header_source, pixels), risk=0.2, holdout=0.3)
    assert calibration.fusion is not None and calibration.fusion.calibrated
    assert calibration.identity["backend"] == "hybrid" and calibration.identity["pixels"]["fingerprint"] == "scripted-fixed"
    # each labelled input's pixels were read once per stage at most (cached across the passes)
    assert len(pixels.calls) == len(set(pixels.calls))
    assert calibration.stages[1].temperature == 1.0  # the fusion is stage 1's calibration map
    path = calibration.save(tmp_path / "calibration.json")
    loaded = SiteCalibration.load(path)
    router = _router(cards, header_source, pixels, loaded.fusion, loaded)
    (decision,) = _route(router, "cr_chest_j2k.dcm")
    assert decision.outcome.calibrated and decision.stages[0].consultation is not None


def test_corroboration_needs_two_agreeing_header_statements(cards):
    import pydicom

    from onevlm.backends.embedded.modality_evidence import corroboration, modality_profiles
    from onevlm.dicom.header import header_from_dataset
    from onevlm.inputs import load_input

    profiles = modality_profiles(cards)

    def check(name, answer, **fields):
        ds = pydicom.dcmread(SAMPLES / name, stop_before_pixels=True)
        for keyword, value in fields.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        return corroboration(header_from_dataset(ds), answer, profiles)

    routine = corroboration(load_input(SAMPLES / "ct_head_routine_brain.dcm").header, "brain CT scan", profiles)
    assert routine["corroborated"] and "BodyPartExamined" in routine["supporting"]
    only_body_part = corroboration(load_input(SAMPLES / "ct_head_512_j2k.dcm").header, "brain CT scan", profiles)
    assert not only_body_part["corroborated"] and only_body_part["supporting"] == ["BodyPartExamined"]
    # a wrong Body Part Examined contradicts the descriptions: not corroborated, whichever answer
    wrong = check("ct_head_routine_brain.dcm", "brain CT scan", BodyPartExamined="CHEST")
    assert not wrong["corroborated"] and wrong["conflicting"] == ["BodyPartExamined"]
    # the same text copied into two fields is one statement
    copied = check("ct_head_512_j2k.dcm", "chest CT scan", BodyPartExamined=None, StudyDescription="CT CHEST",
                   SeriesDescription="CT CHEST")
    assert copied["supporting"] == ["StudyDescription"] and not copied["corroborated"]
    # a Modality no card accepts is Other on its own; two different uncovered regions are no agreement
    assert corroboration(load_input(SAMPLES / "nm_whole_body_j2k.dcm").header, "Other", profiles)["corroborated"]
    torn = check("mr_brain_pilot.dcm", "Other", BodyPartExamined="SHOULDER", StudyDescription="MRI LIVER")
    assert not torn["corroborated"]
    # a named organ another modality owns does not back this one through a shared generic region
    liver = check("mr_brain_pilot.dcm", "kidney MRI scan", BodyPartExamined="LIVER", StudyDescription="MR LIVER")
    assert liver["conflicting"] and not liver["corroborated"]


def test_only_a_corroborated_certain_header_decides_alone(cards, header_source):
    fusion = Fusion(stages={1: StageFusion(stage=1, corroborated_temperature=0.5, gate=0.9)}, calibrated=True)
    pixels = FixedPixels({})
    routine, single = _route(_router(cards, header_source, pixels, fusion), "ct_head_routine_brain.dcm",
                             "ct_head_512_j2k.dcm")
    assert routine.stages[0].consulted == ("header",) and routine.stages[0].consultation.corroborated is True
    assert "certifies brain CT scan" in routine.stages[0].consultation.reason
    assert routine.stages[0].confidence > 0.99  # sharpened by the corroborated temperature
    assert single.stages[0].consulted == ("header", "pixels")
    assert "only BodyPartExamined backs it" in single.stages[0].consultation.reason
    assert ("ct_head_512_j2k.dcm", 1) in pixels.calls and ("ct_head_routine_brain.dcm", 1) not in pixels.calls


def test_stage3_weighs_the_cards_by_stage2s_findings(cards, header_source):
    # unsure between two findings of two different cards: the card set holds both, weighed
    torn = FixedPixels({"ct_head_routine_brain.dcm": {
        1: {"brain CT scan": 0.95}, 2: {"acute ischemic stroke": 0.5, "calvarial fracture": 0.45}}})
    (decision,) = _route(_router(cards, header_source, torn), "ct_head_routine_brain.dcm")
    third = decision.stages[2]
    weighed = third.evidence["findings_weighed"]
    assert set(weighed) >= {"acute ischemic stroke", "calvarial fracture"}
    assert third.distribution["MODEL_04"] > 0.2 and third.distribution["MODEL_03"] > 0.2
    sure = FixedPixels({"ct_head_routine_brain.dcm": {1: {"brain CT scan": 0.95}, 2: {"acute ischemic stroke": 0.995}}})
    (decision,) = _route(_router(cards, header_source, sure), "ct_head_routine_brain.dcm")
    assert "findings_weighed" not in decision.stages[2].evidence  # one finding holds the mass: its match alone
    assert max(decision.stages[2].distribution, key=decision.stages[2].distribution.get) == "MODEL_04"


def test_the_router_package_has_no_import_circle():
    """onevlm/router: no module imports one that imports it back (directly or around a circle), lazily or not."""
    import ast

    root = Path(__file__).resolve().parents[1] / "onevlm" / "router"
    graph = {}
    for path in root.glob("*.py"):
        module = f"onevlm.router.{path.stem}"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("onevlm.router."):
                targets.add(node.module)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("onevlm.router."))
        graph[module] = targets - {module}

    def reaches(start, goal, seen=()):
        return any(t == goal or (t not in seen and reaches(t, goal, (*seen, t))) for t in graph.get(start, ()))

    circles = sorted(m for m in graph if reaches(m, m))
    assert circles == [], f"import circles through {circles}"


def test_a_finding_of_another_modality_contradicts_a_header_wrong_in_every_field(cards, header_source, tmp_path):
    """Body Part and description agree on a gastroscopy (as a wrong protocol writes them): the header decides stage 1,
    but the finding the image shows belongs to colonoscopy cards only: flagged, reviewed."""
    from conftest import header_variant

    header_variant(tmp_path / "scope.dcm", Modality="ES", BodyPartExamined="STOMACH", SeriesDescription="GASTROSCOPY")
    pixels = FixedPixels({"scope.dcm": {2: {"adenomatous polyp": 0.9, "Normal": 0.05}}})
    fusion = Fusion(stages={1: StageFusion(stage=1, gate=0.6)})
    from onevlm.inputs import load_input

    (decision,) = _router(cards, header_source, pixels, fusion).route_many([load_input(tmp_path / "scope.dcm")])
    assert decision.stages[0].consulted == ("header",) and decision.stages[0].chosen == "esophageal gastroscopy scan"
    flag = decision.stages[1].consultation.disagreement
    assert flag is not None and flag.stage == 1 and flag.finding == "adenomatous polyp"
    assert (flag.header_answer, flag.pixels_answer, flag.header_p) == ("esophageal gastroscopy scan",
                                                                        "colonoscopy scan", None)
    assert decision.outcome_name == "review"
    assert "the image's finding adenomatous polyp (p 0.90) belongs to colonoscopy scan, not to it" in \
        decision.disagreement
    # a finding the chosen modality's cards list is no contradiction
    same = FixedPixels({"scope.dcm": {2: {"barrett's esophagus": 0.9}}})
    (decision,) = _router(cards, header_source, same, fusion).route_many([load_input(tmp_path / "scope.dcm")])
    assert decision.disagreement is None
