"""The three-stage pipeline with a scripted backend: early stop, cutoffs, candidates, records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from onevlm.calibration.cutoffs import Cutoffs
from onevlm.cards import CardRepository
from onevlm.inputs import RoutingInput
from onevlm.router import Candidate, DecisionLog, Router, StageResponse, read_log

from conftest import pydicom_file


class ScriptedBackend:
    """A test double: answers each stage from a script and records what it was asked."""

    def __init__(self, script: dict[int, list[tuple[str, float]]], fail_on: set[str] = frozenset()):
        self.script = script
        self.fail_on = fail_on
        self.requests = []

    def identity(self):
        return {"backend": "scripted"}

    def answer(self, items, requests):
        out = []
        for item, request in zip(items, requests):
            self.requests.append(request)
            if item.path.name in self.fail_on:
                raise RuntimeError(f"{item.path.name}: cannot process")
            out.append(StageResponse(tuple(Candidate(text, p) for text, p in self.script[request.stage])))
        return out


@pytest.fixture()
def item() -> RoutingInput:
    from onevlm.inputs import load_input

    return load_input(pydicom_file("17106"))


def _router(small_cards: Path, script, cutoffs=None, **kw):
    backend = ScriptedBackend(script, **kw)
    return Router(CardRepository.load(small_cards), backend, cutoffs), backend


def test_full_route_with_top2_and_justification(small_cards, item):
    router, backend = _router(small_cards, {
        1: [("brain CT scan", 0.7), ("brain MRI scan", 0.2)],
        2: [("Intracranial hemorrhage.", 0.6), ("Normal", 0.3)],
        3: [("MODEL_01: detects hemorrhage in head CT", 0.8), ("MODEL_02: stroke", 0.1)],
    })
    decision = router.route(item)
    assert decision.model_card_id == "MODEL_01"
    assert [s.chosen for s in decision.stages] == ["brain CT scan", "intracranial hemorrhage", "MODEL_01"]
    assert decision.stages[2].chosen_record.justification == "detects hemorrhage in head CT"
    # the paper's confidence is stage 3's p; the route confidence combines the stages: P1 x P3
    assert decision.final_confidence == pytest.approx(0.8)
    assert decision.confidence == pytest.approx(0.7 * 0.8)
    assert decision.outcome.outcome == "routed" and not decision.outcome.calibrated
    # stage 3 saw only the stage-1 modality's cards, the structured fields, and no image
    s3 = backend.requests[2]
    assert [c.id for c in s3.cards] == ["MODEL_01", "MODEL_02"]
    assert s3.allowed == ("MODEL_01", "MODEL_02", "None")
    assert (s3.modality, s3.finding) == ("brain CT scan", "intracranial hemorrhage")
    assert not s3.prompt.uses_image
    # stage 1 lists each modality once plus None and Other
    assert backend.requests[0].allowed[-2:] == ("None", "Other")
    assert "Normal" in backend.requests[1].allowed
    assert backend.requests[1].allowed.count("Normal") == 1


@pytest.mark.parametrize("answer,reason", [("None", "not a medical image"), ("Other", "no card covers")])
def test_stage1_none_or_other_stops_early(small_cards, item, answer, reason):
    router, backend = _router(small_cards, {1: [(answer, 0.9), ("brain CT scan", 0.05)]})
    decision = router.route(item)
    assert decision.stopped_early and reason in decision.stop_reason
    assert decision.model_card_id is None and decision.final_label == "None"
    assert len(decision.stages) == 1 and len(backend.requests) == 1  # no further compute
    assert decision.confidence == pytest.approx(0.9)


def test_cutoff_prefers_the_runner_up(small_cards, item):
    script = {
        1: [("brain MRI scan", 0.5), ("brain CT scan", 0.45)],
        2: [("Normal", 0.9), ("glioma", 0.05)],
        3: [("MODEL_01: fits", 0.6), ("MODEL_02: fits less", 0.3)],
    }
    baseline, _ = _router(small_cards, script)
    assert baseline.route(item).modality == "brain MRI scan"
    router, backend = _router(small_cards, script, Cutoffs(stage1=0.4, stage3=0.35))
    decision = router.route(item)
    assert decision.modality == "brain CT scan"
    assert decision.stages[0].index.value == "SECOND" and decision.stages[0].tau == 0.4
    assert decision.stages[2].index.value == "FIRST"  # 0.3 < 0.35
    assert backend.requests[2].modality == "brain CT scan"  # stage 3 follows the chosen modality


def test_stage3_none_and_out_of_set(small_cards, item):
    router, _ = _router(small_cards, {1: [("brain CT scan", 0.9)], 2: [("Normal", 0.9)], 3: [("None", 0.7), ("MODEL_01", 0.2)]})
    decision = router.route(item)
    assert decision.model_card_id is None and not decision.stopped_early
    assert "no candidate card fits" in decision.stop_reason
    router, _ = _router(small_cards, {1: [("brain CT scan", 0.9)], 2: [("Normal", 0.9)], 3: [("MODEL_05: chest", 0.7)]})
    decision = router.route(item)
    assert decision.model_card_id is None
    assert not decision.stages[2].chosen_record.in_allowed_set  # MODEL_05 is not a brain CT card


def test_stage1_answer_outside_the_list_stops_and_is_flagged(small_cards, item):
    router, _ = _router(small_cards, {1: [("knee MRI scan", 0.6), ("brain MRI scan", 0.3)]})
    decision = router.route(item)
    assert decision.stopped_early and "not an admissible modality" in decision.stop_reason
    first = decision.stages[0].candidates[0]
    assert (first.answer, first.in_allowed_set, first.raw) == ("knee MRI scan", False, "knee MRI scan")


def test_batch_isolates_a_failing_input(small_cards, tmp_path):
    from onevlm.inputs import load_input

    good = load_input(pydicom_file("17106"))
    bad = load_input(pydicom_file("4950"))
    router, _ = _router(small_cards, {1: [("brain CT scan", 0.9)], 2: [("Normal", 0.9)], 3: [("MODEL_01", 0.9)]},
                        fail_on={"4950"})
    first, second = router.route_many([good, bad])
    assert first.model_card_id == "MODEL_01" and first.error is None
    assert second.error and "4950" in second.error and second.model_card_id is None


def test_decision_record_and_log(small_cards, item, tmp_path):
    router, _ = _router(small_cards, {1: [("brain CT scan", 0.7), ("Other", 0.2)], 2: [("Normal", 0.5), ("glioma", 0.2)],
                                      3: [("MODEL_01: fits", 0.8), ("None", 0.1)]})
    decision = router.route(item)
    log_path = tmp_path / "log" / "decisions.jsonl"
    with DecisionLog(log_path) as log:
        log.write(decision)
        log.write(decision)
    records = list(read_log(log_path))
    assert len(records) == 2
    record = records[0]
    assert record["input"].endswith("17106")
    assert record["reference"]["sop_instance_uid"] == item.header.sop_instance_uid
    assert record["backend"] == {"backend": "scripted"}
    assert record["cutoffs"] == {"1": None, "2": None, "3": None}
    assert record["model_card_id"] == "MODEL_01" and record["not_for_clinical_use"] is True
    stage = record["stages"][0]
    assert stage["stage"] == 1 and stage["index"] == "FIRST" and stage["chosen"] == "brain CT scan"
    assert stage["prompt_id"].startswith("stage1-v")
    assert [c["answer"] for c in stage["candidates"]] == ["brain CT scan", "Other"]
    assert [c["p"] for c in stage["candidates"]] == [0.7, 0.2]
    assert record["stages"][2]["justification"] == "fits"
    # no patient data in the log
    text = log_path.read_text()
    assert str(item.header.sop_instance_uid) in text
    import pydicom

    ds = pydicom.dcmread(item.path)
    assert str(ds.PatientName) not in text
    json.loads(text.splitlines()[0])


class _UninformedBackend(ScriptedBackend):
    """Stage 1 as for an image file without a usable hint: a default answer, no evidence."""

    def answer(self, items, requests):
        return [StageResponse((Candidate("Other", 0.08), Candidate("None", 0.05)),
                              evidence={"source": "no DICOM header and no hint: the modality is unknown"},
                              informative=False) for _ in items]


def test_stop_reason_says_what_is_known_when_stage1_had_no_evidence(small_cards, item):
    router = Router(CardRepository.load(small_cards), _UninformedBackend({}))
    decision = router.route(item)
    assert decision.stopped_early and decision.modality == "Other"
    assert decision.stop_reason == "stage 1: no DICOM header and no hint: the modality is unknown (Other)"
    assert "no card covers" not in decision.stop_reason  # no verdict without evidence


def test_pixel_data_cut_short_is_an_error_before_any_stage(small_cards, item):
    from dataclasses import replace

    damaged = replace(item, header=replace(item.header, pixel_data_problem="pixel data truncated: 256 of 512 bytes"))
    router, backend = _router(small_cards, {1: [("brain CT scan", 0.9)], 2: [("Normal", 0.9)], 3: [("MODEL_01", 0.9)]})
    bad, good = router.route_many([damaged, item])
    assert bad.error == f"{item.path}: pixel data truncated: 256 of 512 bytes"
    assert bad.stages == () and bad.model_card_id is None and bad.outcome.outcome == "failed"
    assert good.error is None and good.model_card_id == "MODEL_01"
    assert len(backend.requests) == 3  # only the intact input was asked about, once per stage
