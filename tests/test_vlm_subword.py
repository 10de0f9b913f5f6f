"""The transformers backend on subword vocabularies (a synthetic BPE and Gemma 3's real one), with messy answers.

A real MedGemma never answers in one token: answers span several pieces, start alike ("brain CT
scan" / "brain MRI scan" share "brain"), card IDs split into pieces with every digit its own
("MODEL", "_", "0", "7" on Gemma 3's vocabulary; "MODEL_", "0", "7" on the synthetic BPE), and
come capitalised, with punctuation, markdown or a lead-in. These tests drive Algorithm 1, the
options scorer and the normaliser through exactly those shapes, on every engine, with answers
scripted by ``tests/scripted_vlm.ScriptedAnswers`` (a known distribution, so expected values are
computed from the tokenizer, not copied).

Both tokenizers are covered: the tokenizer-independent tests run on the tiny random model with
the synthetic subword (BPE, Gemma 3-shaped) tokenizer and on the tiny random model with Gemma 3's
real tokenizer (262,144 pieces, byte fallback, the real ``Gemma3Processor`` and chat template,
262,208-row output layer; ``conftest.gemma3_tiny``). The tests of the synthetic tokenizer's
shape and of the graph engine's own machinery run on the subword model only.

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
#: The tokenizers the tokenizer-independent tests run on (the synthetic BPE; Gemma 3's real vocabulary).
TOKENIZERS = ["subword", "gemma3"]
P_TOL, LOGP_TOL = 1e-5, 1e-3


@pytest.fixture(scope="module")
def subword_dir(tmp_path_factory, shipped_cards) -> Path:
    return build_synthetic_model("tiny", tmp_path_factory.mktemp("tiny-subword"), cards=shipped_cards,
                                 tokenizer="subword")


@pytest.fixture(scope="module")
def loaded(subword_dir):
    """The subword model (the synthetic tokenizer's and the graph engine's own tests)."""
    return load_model(subword_dir, LoadOptions(device="cpu"))


@pytest.fixture(scope="module", params=TOKENIZERS)
def vlm(request):
    """The tiny model on each tokenizer, loaded once (scripts are removed after each test)."""
    if request.param == "subword":
        return request.getfixturevalue("loaded")
    return request.getfixturevalue("gemma3_tiny")


@pytest.fixture()
def script(vlm):
    """``script(answers)`` makes ``vlm`` answer from ``answers`` for this test; the patch is removed after it."""
    installed: list[ScriptedAnswers] = []

    def install(answers) -> ScriptedAnswers:
        installed.append(ScriptedAnswers(vlm, answers))
        return installed[-1]

    yield install
    for scripted in reversed(installed):
        scripted.remove()


def pieces(loaded, text: str) -> list[int]:
    return loaded.processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def backend(loaded, engine="fast", answer_mode="free") -> TransformersBackend:
    return TransformersBackend(loaded, EngineSettings(engine=engine, answer_mode=answer_mode))


def test_subword_tokenizer_is_shaped_like_a_real_one(loaded, subword_dir, shipped_cards):
    tok = loaded.processor.tokenizer
    assert loaded.identity["synthetic"]["tokenizer"] == "subword"
    assert 1000 <= len(tok) <= 8000

    for phrase in answer_phrases(shipped_cards):
        ids = pieces(loaded, phrase)
        assert tok.decode(ids) == phrase  # lossless, no <unk>
        assert tok.unk_token_id not in ids
    assert pieces(loaded, "brain CT scan")[0] == pieces(loaded, "brain MRI scan")[0]
    assert len(pieces(loaded, "brain CT scan")) >= 3 and len(pieces(loaded, "MODEL_19")) >= 3
    assert pieces(loaded, "MODEL_19")[:-2] == pieces(loaded, "MODEL_07")[:-2]  # the ID's digits are pieces of their own
    multi = [p for p in shipped_cards.modalities if len(pieces(loaded, p)) > 1]
    assert len(multi) == len(shipped_cards.modalities)
    # the chat template's special tokens stay whole
    assert len(pieces(loaded, "<start_of_turn>model\n")) == 3


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_engines_agree_on_the_random_model(vlm, shipped_cards, stage):
    items = [load_input(SAMPLES / name) for name in IMAGES]
    requests = requests_for(stage, shipped_cards, len(items))
    answers = {engine: backend(vlm, engine).answer(items, requests) for engine in ENGINES}
    for engine in ("fast", "graph"):
        for got, ref in zip(answers[engine], answers["naive"]):
            assert [c.text for c in got.candidates] == [c.text for c in ref.candidates]
            for cg, cr in zip(got.candidates, ref.candidates):
                assert cg.p == pytest.approx(cr.p, abs=P_TOL)
                assert cg.sequence_logprob == pytest.approx(cr.sequence_logprob, abs=LOGP_TOL)


@pytest.mark.parametrize("stage", [1, 3])
def test_options_scores_are_sums_of_token_logprobs(vlm, script, shipped_cards, stage):
    """Batched option scoring (one shared prefill, right padding) gives the scripted options their
    known log-probabilities, and the reference engine (one pass per option) the same distribution."""
    request = requests_for(stage, shipped_cards, 1)[0]
    scripted = ({"brain CT scan": 0.5, "brain MRI scan": 0.2, "chest X-ray scan": 0.1} if stage == 1
                else {"MODEL_02": 0.4, "MODEL_03": 0.3, "None": 0.1})
    answers = script(scripted)
    item = load_input(SAMPLES / "ct_head_512_j2k.dcm")
    fast, naive = backend(vlm, "fast", "options"), backend(vlm, "naive", "options")
    prompt = fast.prompts.tokens(request.prompt)
    options = [fast.prompts.option_tokens(o) for o in request.allowed]
    assert len({len(o) for o in options}) > 1  # candidates of different lengths
    for text in scripted:  # the options are tokenised as the model writes them after the prompt
        assert options[list(request.allowed).index(text)] == answers.tokens[text]
    features = fast._image_features([item])[0] if request.prompt.uses_image else None
    batched = fast.engine.score_options(prompt, features, options)
    for text in scripted:
        index = list(request.allowed).index(text)
        assert batched[index].sequence_logprob == pytest.approx(answers.answer_logprob(text), abs=LOGP_TOL)
    # through the backend, either engine: the two best options as candidates, one distribution over all
    best = sorted(scripted, key=scripted.get, reverse=True)[:2]
    got, ref = (b.answer([item], [request])[0] for b in (fast, naive))
    for response in (got, ref):
        assert [c.text for c in response.candidates] == best
        assert response.distribution[best[0]] > response.distribution[best[1]]
    assert got.distribution.keys() == ref.distribution.keys() == set(request.allowed)
    for option, p in ref.distribution.items():
        assert got.distribution[option] == pytest.approx(p, abs=P_TOL)
    for cg, cr in zip(got.candidates, ref.candidates):
        assert cg.p == pytest.approx(cr.p, abs=P_TOL)
        assert cg.sequence_logprob == pytest.approx(cr.sequence_logprob, abs=LOGP_TOL)


@pytest.mark.parametrize("engine", ENGINES)
def test_shared_first_token_the_continuation_decides(vlm, script, shipped_cards, engine):
    # "brain" starts two admissible answers; its continuation picks the more likely one
    weights = {"brain MRI scan": 0.4, "brain CT scan": 0.2, "chest X-ray scan": 0.3}
    answers = script(weights)
    assert answers.tokens["brain MRI scan"][0] == answers.tokens["brain CT scan"][0]  # one first piece, "brain"
    assert answers.tokens["brain MRI scan"][0] != answers.tokens["chest X-ray scan"][0]
    request = requests_for(1, shipped_cards, 1)[0]
    b = backend(vlm, engine)
    response = b.answer([load_input(SAMPLES / "ct_head_512_j2k.dcm")], [request])[0]
    first, second = response.candidates
    brain = weights["brain MRI scan"] + weights["brain CT scan"]
    assert (first.text, second.text) == ("brain MRI scan", "chest X-ray scan")
    assert first.p == pytest.approx(brain, abs=P_TOL)  # the first token's probability: "brain"
    assert second.p == pytest.approx(weights["chest X-ray scan"], abs=P_TOL)
    assert first.sequence_logprob == pytest.approx(answers.answer_logprob("brain MRI scan"), abs=LOGP_TOL)
    assert second.sequence_logprob == pytest.approx(answers.answer_logprob("chest X-ray scan"), abs=LOGP_TOL)
    # the answer's own probability is below its first token's: the decision log keeps both, and
    # what a person is shown as this answer's probability is the answer's own, not its first token's
    assert math.exp(first.sequence_logprob) < first.p
    decision = Router(shipped_cards, backend(vlm, engine)).route_many([load_input(SAMPLES / "ct_head_512_j2k.dcm")])[0]
    shown = stage_scores(decision.stages[0]).probs
    assert shown["brain MRI scan"] == pytest.approx(math.exp(answers.answer_logprob("brain MRI scan")), abs=1e-4)
    # P(brain) × P(MRI | brain) is the scripted 0.4 less the leak, and each later piece leaks again
    assert shown["brain MRI scan"] < weights["brain MRI scan"]
    assert decision.stages[0].candidates[0].p == pytest.approx(brain, abs=P_TOL)  # Algorithm 1 keeps p_i
    if engine != "naive":  # early exit: no decode step after both branches ended
        longest = max(len(answers.tokens["brain MRI scan"]), len(answers.tokens["chest X-ray scan"]))
        assert b.engine.stats.decode_steps == longest - 1


MESSY = ["The modality is brain CT scan.", "**brain CT scan**", "Brain CT Scan", "brain CT scan!", "Answer: brain CT scan"]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("messy", MESSY)
def test_messy_answers_normalise(vlm, script, shipped_cards, engine, messy):
    script({messy: 0.55, "chest X-ray scan": 0.35})
    router = Router(shipped_cards, backend(vlm, engine))
    stage1 = router.route_many([load_input(SAMPLES / "ct_head_512_j2k.dcm")])[0].stages[0]
    first, second = stage1.candidates
    assert first.raw == messy and first.answer == "brain CT scan" and first.in_allowed_set
    assert second.answer == "chest X-ray scan" and second.match == "exact"
    assert stage1.chosen == "brain CT scan" and stage1.index == Index.FIRST


@pytest.mark.parametrize("engine", ENGINES)
def test_two_branches_with_the_same_normalised_answer_do_not_switch(vlm, script, shipped_cards, engine):
    script({"The modality is brain CT scan.": 0.5, "brain CT scan": 0.3})
    router = Router(shipped_cards, backend(vlm, engine), cutoffs=Cutoffs(stage1=0.1))
    stage1 = router.route_many([load_input(SAMPLES / "ct_head_512_j2k.dcm")])[0].stages[0]
    first, second = stage1.candidates
    assert second.p >= 0.1  # the runner-up clears the cutoff...
    assert first.answer == second.answer == "brain CT scan"
    assert (first.match, second.match) == ("contained", "exact")
    assert stage1.index == Index.FIRST  # ...but says the same thing: no switch


@pytest.mark.parametrize("engine", ENGINES)
def test_stage3_card_ids_in_pieces(vlm, script, shipped_cards, engine):
    script({"**MODEL_03**: the scan shows the head": 0.5, "MODEL_2 - fits": 0.3})
    # the ID spans pieces, every digit one of its own: IDs differ only in their last pieces
    ids = {card: pieces(vlm, card) for card in ("MODEL_03", "MODEL_02", "MODEL_19")}
    assert len(ids["MODEL_03"]) >= 3 and ids["MODEL_03"][:-1] == ids["MODEL_02"][:-1]
    assert ids["MODEL_03"][:-2] == ids["MODEL_19"][:-2]
    assert [vlm.processor.tokenizer.decode([i]) for i in ids["MODEL_19"][-2:]] == ["1", "9"]
    request = requests_for(3, shipped_cards, 1)[0]
    router = Router(shipped_cards, backend(vlm, engine))
    response = router.backend.answer([load_input(SAMPLES / "ct_head_512_j2k.dcm")], [request])[0]
    decision = router._decide(request, response, 0.0)
    first, second = decision.candidates
    assert (first.answer, first.in_allowed_set, first.justification) == ("MODEL_03", True, "the scan shows the head")
    assert (second.answer, second.in_allowed_set, second.match) == ("MODEL_02", True, "close")
    assert decision.chosen == "MODEL_03"


def test_card_ids_share_their_first_piece_so_the_free_runner_up_is_not_a_card(vlm, script, shipped_cards):
    """Every card ID starts with the same piece ("MODEL"): Algorithm 1's top-2 first tokens hold one
    branch for all IDs together (decoded greedily to the likeliest), and the runner-up is whatever
    else comes second. The options mode scores every ID on its own."""
    weights = {"MODEL_03": 0.5, "MODEL_02": 0.3, "None": 0.1}
    answers = script(weights)
    assert answers.tokens["MODEL_03"][0] == answers.tokens["MODEL_02"][0]
    request = requests_for(3, shipped_cards, 1)[0]
    item = load_input(SAMPLES / "ct_head_512_j2k.dcm")
    first, second = backend(vlm, "fast").answer([item], [request])[0].candidates
    assert (first.text, second.text) == ("MODEL_03", "None")
    assert first.p == pytest.approx(weights["MODEL_03"] + weights["MODEL_02"], abs=P_TOL)
    options = backend(vlm, "fast", "options").answer([item], [request])[0]
    assert [c.text for c in options.candidates] == ["MODEL_03", "MODEL_02"]


@pytest.mark.parametrize("engine", ENGINES)
def test_an_answer_outside_the_set_is_logged_as_such(vlm, script, shipped_cards, engine, caplog):
    script({"dental panoramic radiograph": 0.7, "Other.": 0.2})
    router = Router(shipped_cards, backend(vlm, engine))
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
