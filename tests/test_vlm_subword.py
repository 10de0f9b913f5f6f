"""The transformers backend on a subword (BPE, Gemma 3-shaped) synthetic model, with messy answers.

A real MedGemma never answers in one token: answers span several pieces, start alike ("brain CT
scan" / "brain MRI scan" share "brain"), card IDs split ("MODEL_", "0", "7"), and come capitalised,
with punctuation, markdown or a lead-in. These tests drive Algorithm 1, the options scorer and the
normaliser through exactly those shapes, on every engine, with answers scripted by
``tests/scripted_vlm.ScriptedAnswers`` (a known distribution, so expected values are computed,
not copied).

Tolerances: engines must agree on every answer's text exactly, on first-token probabilities
within 1e-5 and on sequence log-probabilities within 1e-3 (float32 on the CPU; the engines sum
the same log-probabilities in different orders and attention shapes).
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from onevlm.calibration.cutoffs import Cutoffs
from onevlm.inputs import load_input
from onevlm.router import Router
from onevlm.router.outcome import stage_scores
from onevlm.router.selector import Index
from onevlm.vlm.backend import EngineSettings, TransformersBackend
from onevlm.vlm.loading import LoadOptions, load_model
from onevlm.vlm.synthetic import answer_phrases, build_synthetic_model

from conftest import SAMPLES
from scripted_vlm import ScriptedAnswers
from test_vlm import requests_for

IMAGES = ["ct_head_512_j2k.dcm", "cr_chest_j2k.dcm", "us_obstetric_rle.dcm"]
ENGINES = ["naive", "fast", "graph"]
P_TOL, LOGP_TOL = 1e-5, 1e-3


@pytest.fixture(scope="module")
def subword_dir(tmp_path_factory, shipped_cards) -> Path:
    return build_synthetic_model("tiny", tmp_path_factory.mktemp("tiny-subword"), cards=shipped_cards,
                                 tokenizer="subword")


@pytest.fixture()
def loaded(subword_dir):
    # A fresh load per test: scripted tests patch the model in place.
    return load_model(subword_dir, LoadOptions(device="cpu"))


def backend(loaded, engine="fast", answer_mode="free") -> TransformersBackend:
    return TransformersBackend(loaded, EngineSettings(engine=engine, answer_mode=answer_mode))


def test_subword_tokenizer_is_shaped_like_a_real_one(loaded, subword_dir, shipped_cards):
    tok = loaded.processor.tokenizer
    assert loaded.identity["synthetic"]["tokenizer"] == "subword"
    assert 1000 <= len(tok) <= 8000

    def pieces(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    for phrase in answer_phrases(shipped_cards):
        ids = pieces(phrase)
        assert tok.decode(ids) == phrase  # lossless, no <unk>
        assert tok.unk_token_id not in ids
    assert pieces("brain CT scan")[0] == pieces("brain MRI scan")[0]
    assert len(pieces("brain CT scan")) >= 3 and len(pieces("MODEL_19")) >= 3
    assert pieces("MODEL_19")[:-2] == pieces("MODEL_07")[:-2]  # the ID's digits are pieces of their own
    multi = [p for p in shipped_cards.modalities if len(pieces(p)) > 1]
    assert len(multi) == len(shipped_cards.modalities)
    # the chat template's special tokens stay whole
    assert len(pieces("<start_of_turn>model\n")) == 3


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_engines_agree_on_the_random_subword_model(loaded, shipped_cards, stage):
    items = [load_input(SAMPLES / name) for name in IMAGES]
    requests = requests_for(stage, shipped_cards, len(items))
    answers = {engine: backend(loaded, engine).answer(items, requests) for engine in ENGINES}
    for engine in ("fast", "graph"):
        for got, ref in zip(answers[engine], answers["naive"]):
            assert [c.text for c in got.candidates] == [c.text for c in ref.candidates]
            for cg, cr in zip(got.candidates, ref.candidates):
                assert cg.p == pytest.approx(cr.p, abs=P_TOL)
                assert cg.sequence_logprob == pytest.approx(cr.sequence_logprob, abs=LOGP_TOL)


@pytest.mark.parametrize("stage", [1, 3])
def test_options_scores_are_sums_of_token_logprobs(loaded, shipped_cards, stage):
    """Batched option scoring (one shared prefill, right padding) = one pass per option, and
    the scripted options' scores equal their known log-probabilities."""
    request = requests_for(stage, shipped_cards, 1)[0]
    scripted = ({"brain CT scan": 0.5, "brain MRI scan": 0.2, "chest X-ray scan": 0.1} if stage == 1
                else {"MODEL_02": 0.4, "MODEL_03": 0.3, "None": 0.1})
    script = ScriptedAnswers(loaded, scripted)
    item = load_input(SAMPLES / "ct_head_512_j2k.dcm")
    fast, naive = backend(loaded, "fast", "options"), backend(loaded, "naive", "options")
    prompt = fast.prompts.tokens(request.prompt)
    options = [fast.prompts.option_tokens(o) for o in request.allowed]
    assert len({len(o) for o in options}) > 1  # candidates of different lengths
    image = request.prompt.uses_image
    batched = fast.engine.score_options(prompt, fast._image_features([item])[0] if image else None, options)
    alone = naive.engine.score_options(prompt, naive._pixel_values([item])[0] if image else None, options)
    for b, a in zip(batched, alone):
        assert b.sequence_logprob == pytest.approx(a.sequence_logprob, abs=LOGP_TOL)
        assert b.p == pytest.approx(a.p, abs=P_TOL)
    for text in scripted:
        index = list(request.allowed).index(text)
        assert batched[index].sequence_logprob == pytest.approx(script.answer_logprob(text), abs=LOGP_TOL)
    # the response's candidates are the two best options, whatever the engine
    for b in (fast, naive):
        response = b.answer([item], [request])[0]
        best = sorted(scripted, key=scripted.get, reverse=True)[:2]
        assert [c.text for c in response.candidates] == best
        assert response.distribution[best[0]] > response.distribution[best[1]]


@pytest.mark.parametrize("engine", ENGINES)
def test_shared_first_token_the_continuation_decides(loaded, shipped_cards, engine):
    # "brain" starts two admissible answers; its continuation picks the more likely one
    script = ScriptedAnswers(loaded, {"brain MRI scan": 0.4, "brain CT scan": 0.2, "chest X-ray scan": 0.3})
    request = requests_for(1, shipped_cards, 1)[0]
    b = backend(loaded, engine)
    response = b.answer([load_input(SAMPLES / "ct_head_512_j2k.dcm")], [request])[0]
    first, second = response.candidates
    assert (first.text, second.text) == ("brain MRI scan", "chest X-ray scan")
    assert first.p == pytest.approx(0.6, abs=P_TOL)  # the first token's probability: "brain"
    assert second.p == pytest.approx(0.3, abs=P_TOL)
    assert first.sequence_logprob == pytest.approx(script.answer_logprob("brain MRI scan"), abs=LOGP_TOL)
    assert second.sequence_logprob == pytest.approx(script.answer_logprob("chest X-ray scan"), abs=LOGP_TOL)
    # the answer's own probability is below its first token's: the decision log keeps both, and
    # what a person is shown as this answer's probability is the answer's own, not its first token's
    assert math.exp(first.sequence_logprob) < first.p
    decision = Router(shipped_cards, backend(loaded, engine)).route_many([load_input(SAMPLES / "ct_head_512_j2k.dcm")])[0]
    shown = stage_scores(decision.stages[0]).probs
    assert shown["brain MRI scan"] == pytest.approx(math.exp(script.answer_logprob("brain MRI scan")), abs=1e-4)
    assert shown["brain MRI scan"] < 0.6 * 0.7  # 0.6 × (0.4 / 0.6) × 0.99³: the "MRI" continuation's share
    assert decision.stages[0].candidates[0].p == pytest.approx(0.6, abs=P_TOL)  # Algorithm 1 keeps p_i
    if engine != "naive":  # early exit: no decode step after both branches ended
        longest = max(len(script.tokens["brain MRI scan"]), len(script.tokens["chest X-ray scan"]))
        assert b.engine.stats.decode_steps == longest - 1


MESSY = ["The modality is brain CT scan.", "**brain CT scan**", "Brain CT Scan", "brain CT scan!", "Answer: brain CT scan"]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("messy", MESSY)
def test_messy_answers_normalise(loaded, shipped_cards, engine, messy):
    ScriptedAnswers(loaded, {messy: 0.55, "chest X-ray scan": 0.35})
    router = Router(shipped_cards, backend(loaded, engine))
    stage1 = router.route_many([load_input(SAMPLES / "ct_head_512_j2k.dcm")])[0].stages[0]
    first, second = stage1.candidates
    assert first.raw == messy and first.answer == "brain CT scan" and first.in_allowed_set
    assert second.answer == "chest X-ray scan" and second.match == "exact"
    assert stage1.chosen == "brain CT scan" and stage1.index == Index.FIRST


@pytest.mark.parametrize("engine", ENGINES)
def test_two_branches_with_the_same_normalised_answer_do_not_switch(loaded, shipped_cards, engine):
    ScriptedAnswers(loaded, {"The modality is brain CT scan.": 0.5, "brain CT scan": 0.3})
    router = Router(shipped_cards, backend(loaded, engine), cutoffs=Cutoffs(stage1=0.1))
    stage1 = router.route_many([load_input(SAMPLES / "ct_head_512_j2k.dcm")])[0].stages[0]
    first, second = stage1.candidates
    assert second.p >= 0.1  # the runner-up clears the cutoff...
    assert first.answer == second.answer == "brain CT scan"
    assert (first.match, second.match) == ("contained", "exact")
    assert stage1.index == Index.FIRST  # ...but says the same thing: no switch


@pytest.mark.parametrize("engine", ENGINES)
def test_stage3_card_ids_in_pieces(loaded, shipped_cards, engine):
    ScriptedAnswers(loaded, {"**MODEL_03**: the scan shows the head": 0.5, "MODEL_2 - fits": 0.3})
    request = requests_for(3, shipped_cards, 1)[0]
    router = Router(shipped_cards, backend(loaded, engine))
    response = router.backend.answer([load_input(SAMPLES / "ct_head_512_j2k.dcm")], [request])[0]
    decision = router._decide(request, response, 0.0)
    first, second = decision.candidates
    assert (first.answer, first.in_allowed_set, first.justification) == ("MODEL_03", True, "the scan shows the head")
    assert (second.answer, second.in_allowed_set, second.match) == ("MODEL_02", True, "close")
    assert decision.chosen == "MODEL_03"


@pytest.mark.parametrize("engine", ENGINES)
def test_an_answer_outside_the_set_is_logged_as_such(loaded, shipped_cards, engine, caplog):
    ScriptedAnswers(loaded, {"dental panoramic radiograph": 0.7, "Other.": 0.2})
    router = Router(shipped_cards, backend(loaded, engine))
    with caplog.at_level(logging.INFO, logger="onevlm.router.pipeline"):
        decision = router.route_many([load_input(SAMPLES / "ct_head_512_j2k.dcm")])[0]
    stage1 = decision.stages[0]
    first = stage1.candidates[0]
    assert (first.answer, first.in_allowed_set, first.match) == ("dental panoramic radiograph", False, "none")
    assert stage1.candidates[1].answer == "Other" and stage1.candidates[1].in_allowed_set
    assert decision.stopped_early and "not an admissible modality" in decision.stop_reason
    assert decision.outcome_name == "stopped" and decision.model_card_id is None
    logged = decision.as_dict()["stages"][0]["candidates"][0]
    assert logged["in_allowed_set"] is False and logged["raw"] == "dental panoramic radiograph"
    assert any("outside the admissible set" in r.getMessage() and "ct_head_512_j2k.dcm" in r.getMessage()
               and "dental" not in r.getMessage()
               for r in caplog.records)


# -- the graph engine's own machinery ----------------------------------------------------------


def test_buckets():
    from onevlm.vlm.graph_engine import length_bucket, row_bucket

    assert [row_bucket(n) for n in (1, 2, 3, 4, 5, 17, 64)] == [2, 2, 4, 4, 8, 32, 64]
    assert [length_bucket(n) for n in (1, 64, 65, 300)] == [64, 64, 128, 320]
    with pytest.raises(ValueError):
        row_bucket(0)
    with pytest.raises(ValueError, match="graph_compile"):
        EngineSettings(engine="graph", graph_compile="max-speed")


def test_cuda_graph_modes_refuse_a_cpu_model(loaded):
    for mode in ("cuda-graph", "reduce-overhead"):
        with pytest.raises(ValueError, match="needs a CUDA device"):
            TransformersBackend(loaded, EngineSettings(engine="graph", graph_compile=mode))
    assert backend(loaded, "graph").engine.compile_mode == "none"  # auto on the CPU


def test_graph_engine_reuses_buckets_and_falls_back_beyond_the_window(loaded, shipped_cards):
    items = [load_input(SAMPLES / name) for name in IMAGES]
    fast, graph = backend(loaded, "fast"), backend(loaded, "graph")
    for count in (3, 2, 1):  # 6, 4 and 2 decode rows: buckets 8, 4, 2; stage-1 prompts share a length bucket
        requests = requests_for(1, shipped_cards, count)
        assert [[c.text for c in r.candidates] for r in graph.answer(items[:count], requests)] == \
            [[c.text for c in r.candidates] for r in fast.answer(items[:count], requests)]
    assert sorted(rows for rows, _ in graph.engine._buckets) == [2, 4, 8]
    assert len({length for _, length in graph.engine._buckets}) == 1
    graph.answer(items[:3], requests_for(1, shipped_cards, 3))
    assert len(graph.engine._buckets) == 3  # replayed, not rebuilt

    graph.engine.max_length = 64  # as if the model's sliding window were shorter than the prompt
    requests = requests_for(2, shipped_cards, 2)
    got = graph.answer(items[:2], requests)
    assert graph.engine.fallbacks == 1
    for g, f in zip(got, fast.answer(items[:2], requests)):
        assert [c.text for c in g.candidates] == [c.text for c in f.candidates]
        assert [c.sequence_logprob for c in g.candidates] == pytest.approx([c.sequence_logprob for c in f.candidates],
                                                                             abs=LOGP_TOL)


COMPILED_ROUTE = """
import json, sys
sys.path.insert(0, "tests")
from onevlm.cards.repository import CardRepository, default_cards_dir
from onevlm.inputs import load_input
from onevlm.vlm.backend import EngineSettings, TransformersBackend
from onevlm.vlm.loading import LoadOptions, load_model
from conftest import SAMPLES
from test_vlm import requests_for
from test_vlm_subword import IMAGES
cards = CardRepository.load(default_cards_dir())
backend = TransformersBackend(load_model(sys.argv[1], LoadOptions(device="cpu")),
                              EngineSettings(engine="graph", graph_compile="default"))
items = [load_input(SAMPLES / name) for name in IMAGES]
answers = {stage: [[[c.text, c.p, c.sequence_logprob] for c in r.candidates]
                   for r in backend.answer(items, requests_for(stage, cards, len(items)))] for stage in (1, 3)}
print(json.dumps({"answers": answers, "mode": backend.engine.compile_mode,
                  "capture_failures": backend.engine.capture_failures, "fallbacks": backend.engine.fallbacks}))
"""


@pytest.mark.slow
def test_compiled_graph_engine_matches_the_fast_engine(subword_dir, loaded, shipped_cards, tmp_path):
    """torch.compile (inductor, on the CPU) of the static decode step: same answers, same numbers.

    Compiled in a process of its own, as a service compiles: inductor imports setuptools, which
    refuses to load in a process that has looked up pip before (as this test session does).
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    run = subprocess.run([sys.executable, "-c", COMPILED_ROUTE, str(subword_dir)], capture_output=True, text=True,
                         env=env, cwd=Path(__file__).resolve().parents[1], timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    compiled = json.loads(run.stdout.strip().splitlines()[-1])
    assert compiled["mode"] == "default" and compiled["capture_failures"] == 0 and compiled["fallbacks"] == 0
    items = [load_input(SAMPLES / name) for name in IMAGES]
    fast = backend(loaded, "fast")
    for stage in (1, 3):
        for got, ref in zip(compiled["answers"][str(stage)], fast.answer(items, requests_for(stage, shipped_cards, len(items)))):
            assert [text for text, _, _ in got] == [c.text for c in ref.candidates]
            for (_, p, logprob), cr in zip(got, ref.candidates):
                assert p == pytest.approx(cr.p, abs=P_TOL)
                assert logprob == pytest.approx(cr.sequence_logprob, abs=LOGP_TOL)


def test_a_compiler_failure_runs_the_bucket_eagerly(loaded, shipped_cards, monkeypatch, caplog):
    import torch

    def broken_compile(fn, **kwargs):
        def fail():
            raise torch._dynamo.exc.BackendCompilerFailed(lambda *a: None, RuntimeError("no C++ compiler"), None)
        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    items = [load_input(SAMPLES / name) for name in IMAGES]
    requests = requests_for(1, shipped_cards, len(items))
    graph = TransformersBackend(loaded, EngineSettings(engine="graph", graph_compile="default"))
    with caplog.at_level(logging.WARNING, logger="onevlm.vlm.graph_engine"):
        got = graph.answer(items, requests)
    assert graph.engine.capture_failures == 1 and "torch.compile failed" in caplog.text
    for g, f in zip(got, backend(loaded, "fast").answer(items, requests)):
        assert [c.text for c in g.candidates] == [c.text for c in f.candidates]


def test_a_calibration_fitted_on_first_token_scores_is_refused(loaded, shipped_cards):
    """Free-text stage probabilities are answer-sequence probabilities now; a VLM calibration
    fitted before (identity without ``answer_score``) would rescale other numbers: refused."""
    from onevlm.calibration.site import CalibrationError, SiteCalibration, StageCalibration

    router = Router(shipped_cards, backend(loaded, "fast"))
    assert router.identity["answer_score"] == "answer-sequence-probability"
    assert "answer_score" not in Router(shipped_cards, backend(loaded, "fast", "options")).identity
    older = {k: v for k, v in router.identity.items() if k != "answer_score"}
    stale = SiteCalibration(stages={1: StageCalibration(1)}, risk=0.1, identity=older)
    with pytest.raises(CalibrationError, match="answer_score"):
        Router(shipped_cards, backend(loaded, "fast"), calibration=stale)
