"""The transformers backend on synthetic Gemma 3 models built offline: engines, options, NF4, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from onevlm.inputs import load_input
from onevlm.router import Router
from onevlm.router.backend import StageRequest
from onevlm.router.prompts import stage1_prompt, stage2_prompt, stage3_prompt
from onevlm.vlm.backend import EngineSettings, TransformersBackend
from onevlm.vlm.loading import LoadOptions, ModelLoadError, load_model
from onevlm.vlm.synthetic import build_synthetic_model

from conftest import SAMPLES

IMAGES = ["ct_head_512_j2k.dcm", "cr_chest_j2k.dcm", "us_obstetric_rle.dcm", "mr_head_enhanced_10frames.dcm"]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, shipped_cards) -> Path:
    return build_synthetic_model("tiny", tmp_path_factory.mktemp("tiny"), cards=shipped_cards)


@pytest.fixture(scope="session")
def loaded(tiny_dir):
    return load_model(tiny_dir, LoadOptions(device="cpu"))


def backend(loaded, engine="fast", answer_mode="free") -> TransformersBackend:
    return TransformersBackend(loaded, EngineSettings(engine=engine, answer_mode=answer_mode))


def requests_for(stage, shipped_cards, n):
    if stage == 1:
        prompt, extra = stage1_prompt(shipped_cards.modalities), {}
        allowed = (*shipped_cards.modalities, "None", "Other")
    elif stage == 2:
        prompt, extra, allowed = stage2_prompt(), {}, (*shipped_cards.findings, "Normal")
    else:
        cards = shipped_cards.by_modality("brain CT scan")
        prompt = stage3_prompt("brain CT scan", "Normal", [(c.id, c.task_caption) for c in cards])
        extra = {"cards": cards, "modality": "brain CT scan", "finding": "Normal"}
        allowed = (*(c.id for c in cards), "None")
    return [StageRequest(stage=stage, prompt=prompt, allowed=allowed, **extra) for _ in range(n)]


def test_synthetic_tiny_model(tiny_dir, loaded):
    weights = sum(p.stat().st_size for p in tiny_dir.glob("*.safetensors"))
    assert weights < 1_000_000
    assert loaded.identity["model_class"] == "Gemma3ForConditionalGeneration"
    assert loaded.identity["device"] == "cpu" and loaded.identity["dtype"] == "float32"
    assert loaded.identity["synthetic"]["size"] == "tiny"
    tok = loaded.processor.tokenizer
    for phrase in ["brain CT scan", "breast histopathology (H&E) scan", "MODEL_07", "None", "Other", "Normal",
                   "intracranial hemorrhage"]:
        ids = tok(phrase, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.decode(ids) == phrase  # whole answers are tokens of their own


def test_prompts_use_the_chat_template_and_stage3_masks_the_image(loaded, shipped_cards):
    b = backend(loaded)
    s1 = b.prompts.tokens(requests_for(1, shipped_cards, 1)[0].prompt)
    s3_request = requests_for(3, shipped_cards, 1)[0]
    s3 = b.prompts.tokens(s3_request.prompt)
    image_tokens = loaded.model.config.mm_tokens_per_image
    assert sum(s1.image_mask) == image_tokens
    assert not s3.has_image and not s3_request.prompt.uses_image
    text = b.prompts.text(s3_request.prompt)
    # Gemma 3 folds the system turn into the first user turn; no image in stage 3
    assert text.startswith("<bos><start_of_turn>user\n" + s3_request.prompt.system)
    assert "<start_of_image>" not in text and text.endswith("<start_of_turn>model\n")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_fast_and_naive_agree(loaded, shipped_cards, stage):
    items = [load_input(SAMPLES / name) for name in IMAGES]
    requests = requests_for(stage, shipped_cards, len(items))
    fast = backend(loaded, "fast").answer(items, requests)
    naive = backend(loaded, "naive").answer(items, requests)
    for f, n in zip(fast, naive):
        assert [c.text for c in f.candidates] == [c.text for c in n.candidates]
        for cf, cn in zip(f.candidates, n.candidates):
            assert cf.p == pytest.approx(cn.p, abs=1e-5)
            assert cf.sequence_logprob == pytest.approx(cn.sequence_logprob, abs=1e-3)
        assert len(f.candidates) == 2 and f.candidates[0].p >= f.candidates[1].p


def test_batched_prefill_matches_one_at_a_time(loaded, shipped_cards):
    items = [load_input(SAMPLES / name) for name in IMAGES]
    b = backend(loaded, "fast")
    together = b.answer(items, requests_for(1, shipped_cards, len(items)))
    alone = [b.answer([i], requests_for(1, shipped_cards, 1))[0] for i in items]
    for t, a in zip(together, alone):
        assert [c.text for c in t.candidates] == [c.text for c in a.candidates]
        assert [c.p for c in t.candidates] == pytest.approx([c.p for c in a.candidates], abs=1e-5)


def test_image_features_reach_the_model(loaded, shipped_cards):
    b = backend(loaded, "fast")
    prompt = b.prompts.tokens(requests_for(1, shipped_cards, 1)[0].prompt)
    features = b._image_features([load_input(SAMPLES / "ct_head_512_j2k.dcm")])[0]
    a = b.adapter
    ids = torch.tensor([prompt.input_ids])
    mask = torch.tensor([prompt.image_mask])
    with torch.inference_mode():
        real = a.forward(inputs_embeds=a.embed(ids, mask, features), token_type_ids=mask.long())[0][0, -1]
        blank = a.forward(inputs_embeds=a.embed(ids, mask, torch.zeros_like(features)), token_type_ids=mask.long())[0][0, -1]
    assert not torch.allclose(real, blank)


def test_fast_engine_encodes_each_image_once(loaded, shipped_cards):
    items = [load_input(SAMPLES / name) for name in IMAGES[:2]]
    encoded = {}
    tower = loaded.model.model.vision_tower
    for engine in ("fast", "naive"):
        b = backend(loaded, engine)
        seen = []
        hook = tower.register_forward_hook(lambda module, args, kwargs_out: seen.append(1))
        try:
            b.answer(items, requests_for(1, shipped_cards, 2))
            b.answer(items, requests_for(2, shipped_cards, 2))
        finally:
            hook.remove()
        encoded[engine] = len(seen)
    # fast: one vision-tower pass for both images, reused by stages 1 and 2; naive: per image
    # and stage at least the first-token pass, plus one per generate call.
    assert encoded["fast"] == 1
    assert encoded["naive"] >= 2 * 2


def test_options_mode_is_a_distribution_over_the_allowed_set(loaded, shipped_cards):
    b = backend(loaded, "fast", "options")
    item = load_input(SAMPLES / "ct_head_512_j2k.dcm")
    request = requests_for(1, shipped_cards, 1)[0]
    prompt = b.prompts.tokens(request.prompt)
    features = b._image_features([item])[0]
    scored = b.engine.score_options(prompt, features, [b.prompts.option_tokens(o) for o in request.allowed])
    assert sum(s.p for s in scored) == pytest.approx(1.0, abs=1e-5)
    response = b.answer([item], [request])[0]
    assert all(c.text in request.allowed for c in response.candidates)
    assert response.evidence["method"] == "vlm-options-likelihood"
    # the same scores, computed one option at a time with plain forward passes
    a = b.adapter
    ids = torch.tensor([prompt.input_ids])
    mask = torch.tensor([prompt.image_mask])
    for option in (0, len(request.allowed) - 1):
        tokens = b.prompts.option_tokens(request.allowed[option])
        full = torch.cat([ids, torch.tensor([tokens])], dim=1)
        full_mask = torch.cat([mask, torch.zeros((1, len(tokens)), dtype=torch.bool)], dim=1)
        with torch.inference_mode():
            logits = a.forward(inputs_embeds=a.embed(full, full_mask, features), token_type_ids=full_mask.long())[0][0]
        lp = torch.log_softmax(logits.float(), -1)
        start = ids.shape[1]
        expected = sum(float(lp[start - 1 + j, t]) for j, t in enumerate(tokens))
        assert scored[option].sequence_logprob == pytest.approx(expected, abs=1e-3)


def test_router_runs_all_three_stages_in_options_mode(loaded, shipped_cards):
    router = Router(shipped_cards, backend(loaded, "fast", "options"))
    decisions = router.route_many([load_input(SAMPLES / n) for n in ("ct_head_512_j2k.dcm", "rt_plan.dcm")])
    head, plan = decisions
    assert [s.stage for s in head.stages] == [1, 2, 3]
    assert all(len(s.candidates) == 2 for s in head.stages)
    assert head.stages[0].evidence["pixels_read"] and head.stages[2].evidence["image_masked"]
    assert head.backend["backend"] == "transformers" and head.backend["engine"] == "fast"
    assert plan.modality == "None" and plan.stages[0].evidence["model_called"] is False


def test_nf4_on_cpu(tiny_dir, shipped_cards):
    import bitsandbytes as bnb

    loaded_nf4 = load_model(tiny_dir, LoadOptions(device="cpu", quantize="nf4"))
    layers = [m for m in loaded_nf4.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.quant_type == "nf4" for m in layers)
    assert loaded_nf4.identity["quantize"] == "nf4"
    response = backend(loaded_nf4, "fast", "options").answer(
        [load_input(SAMPLES / "ct_head_512_j2k.dcm")], requests_for(1, shipped_cards, 1))[0]
    assert len(response.candidates) == 2


def test_bad_model_folders(tmp_path, tiny_dir):
    with pytest.raises(ModelLoadError, match="model folder not found"):
        load_model(tmp_path / "nope")
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a folder"):
        load_model(tmp_path / "file.bin")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match=r"no model here \(config.json missing\)"):
        load_model(empty)
    no_processor = tmp_path / "no_processor"
    no_processor.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (no_processor / name).write_bytes((tiny_dir / name).read_bytes())
    with pytest.raises(ModelLoadError, match="processor missing"):
        load_model(no_processor)
    text_only = tmp_path / "text_only"
    text_only.mkdir()
    for name in ("processor_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (text_only / name).write_bytes((tiny_dir / name).read_bytes())
    (text_only / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 64}))
    with pytest.raises(ModelLoadError, match="not an image-text-to-text model"):
        load_model(text_only)


def run_side_by_side(commands: dict[str, list[str]], **kwargs) -> dict[str, subprocess.CompletedProcess]:
    """``subprocess.run`` of independent commands at the same time (their start-up is mostly one core's work)."""
    with ThreadPoolExecutor(len(commands)) as pool:
        runs = {name: pool.submit(subprocess.run, argv, capture_output=True, text=True, **kwargs)
                for name, argv in commands.items()}
        return {name: run.result() for name, run in runs.items()}


@pytest.mark.slow
def test_cli_synth_model_then_route(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    exe = os.path.join(os.path.dirname(sys.executable), "onevlm")
    model = tmp_path / "tiny"
    inputs = [str(SAMPLES / "ct_head_512_j2k.dcm"), str(SAMPLES / "sr_simple_image_report.dcm")]
    first = run_side_by_side({  # the missing-model run needs no model: it runs while the model is made
        "made": [exe, "synth-model", "tiny", str(model), "--tokenizer", "subword"],
        "bad": [exe, "route", "--backend", "transformers", "--model", str(tmp_path / "missing"), inputs[0]],
    }, env=env, timeout=300)
    made = first["made"]
    assert made.returncode == 0, made.stderr
    assert json.loads((model / "onevlm_synthetic.json").read_text())["tokenizer"] == "subword"
    modes = (("options", "fast"), ("free", "graph"))
    routes = run_side_by_side({mode: [exe, "route", "--backend", "transformers", "--model", str(model), "--answer-mode",
                                      mode, "--engine", engine, "--json", "--log", str(tmp_path / f"{mode}.jsonl"),
                                      *inputs] for mode, engine in modes}, env=env, timeout=300)
    for mode, engine in modes:
        run = routes[mode]
        assert run.returncode == 0, run.stderr
        head, sr = [json.loads(line) for line in run.stdout.splitlines()]
        assert sr["stages"][0]["chosen"] == "None" and sr["stopped_early"]
        assert head["backend"]["engine"] == engine
        for stage in head["stages"]:
            assert len(stage["candidates"]) == 2
            assert {"answer", "p", "raw", "sequence_logprob"} <= set(stage["candidates"][0])
        if mode == "options":  # every answer is admissible: a modality runs all stages, None/Other stop
            stage1 = head["stages"][0]
            assert stage1["in_allowed_set"]
            if stage1["chosen"] in ("None", "Other"):
                assert head["stopped_early"] and len(head["stages"]) == 1
            else:
                assert [s["stage"] for s in head["stages"]] == [1, 2, 3]
            assert head["model_card_id"] is None or head["model_card_id"].startswith("MODEL_")
        else:
            assert head["stopped_early"] or len(head["stages"]) == 3
    bad = first["bad"]
    assert bad.returncode == 2 and "model folder not found" in bad.stderr


def test_medgemma_4b_shape_config(shipped_cards):
    """The GPU benchmark's model has MedGemma-4B-it's architecture (checked on the meta device)."""
    from transformers import Gemma3ForConditionalGeneration

    from onevlm.vlm.synthetic import SIZES, answer_phrases, build_tokenizer, corpus, synthetic_config

    spec = SIZES["medgemma-4b-shape"]
    config = synthetic_config(spec, build_tokenizer(corpus(shipped_cards), answer_phrases(shipped_cards)), spec.vocab_size)
    with torch.device("meta"):
        model = Gemma3ForConditionalGeneration(config)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(4.30e9, rel=0.01)
    assert config.mm_tokens_per_image == 256 and config.vision_config.image_size == 896
    assert config.text_config.num_hidden_layers == 34 and config.text_config.hidden_size == 2560
