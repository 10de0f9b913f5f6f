"""Greedy answers of a (fine-tuned or base) specialty model, parsed by their task, and loading an adapter.

Research use only.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import torch

from onevlm.specialty.encoding import ExampleEncoder, compute_dtype, image_token_id, move_batch
from onevlm.specialty.manifest import read_manifest
from onevlm.specialty.samples import DatasetInfo
from onevlm.specialty.tasks import Prediction, TaskExample, is_correct, parse_answer
from onevlm.vlm.loading import LoadedModel, LoadOptions, ModelLoadError, check_model_dir, fingerprint, load_model

#: Answer-length bound per task when none is given (tokens, end of turn included).
DEFAULT_MAX_NEW_TOKENS = {"classification": 8, "grading": 8, "region-classification": 8,
                          "multilabel": 96, "detection": 256}


def _eos_ids(model, tokenizer) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id and end_of_turn not in ids:
        ids.append(end_of_turn)
    return ids


@torch.no_grad()
def generate_answers(model, processor, examples: Sequence[TaskExample], max_new_tokens: int,
                     batch_size: int = 8) -> list[str]:
    """Greedy answers (special tokens removed, stripped) to the examples' prompts.

    The model is put in eval mode. On the CPU, a 4-bit model used here cannot be trained
    afterwards (bitsandbytes); load a fresh one for training.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError("max_new_tokens and batch_size must be >= 1")
    if not examples:
        return []
    model.eval()
    encoder = ExampleEncoder(processor, image_token_id(model))
    tokenizer = processor.tokenizer
    eos = _eos_ids(model, tokenizer)
    device, dtype = model.get_input_embeddings().weight.device, compute_dtype(model)
    texts: list[str] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = move_batch(encoder.generation_batch(chunk), device, dtype)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                             eos_token_id=eos, pad_token_id=encoder.pad_token_id)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        for row in sequences[:, batch["input_ids"].shape[1]:].tolist():
            end = next((i for i, t in enumerate(row) if t in eos), len(row))
            texts.append(tokenizer.decode(row[:end], skip_special_tokens=True).strip())
    return texts


def predict(model, processor, info: DatasetInfo | None, examples: Sequence[TaskExample],
            max_new_tokens: int | None = None, batch_size: int = 8) -> list[Prediction]:
    """Greedy predictions for ``examples``, parsed by their task.

    Parameters
    ----------
    model, processor:
        A (fine-tuned or base) Gemma 3-style VLM and its processor.
    info:
        The dataset the examples belong to (checked), or ``None`` to parse each example with
        its own dataset (mixed datasets).
    examples:
        Rendered examples (their prompts are used; their answers are not shown to the model).
    max_new_tokens:
        Answer-length bound; ``None``: :data:`DEFAULT_MAX_NEW_TOKENS` of the task (the largest
        over the examples' tasks).
    batch_size:
        Prompts generated together.

    Returns
    -------
    list of Prediction
        Class index, grade, ``frozenset`` of findings, tuple of boxes, or
        :class:`~onevlm.specialty.tasks.Unparseable`, per example.
    """
    if info is not None:
        wrong = [ex.dataset for ex in examples if ex.dataset != info.name]
        if wrong:
            raise ValueError(f"predict for {info.name!r} got examples of dataset {wrong[0]!r}")
    if max_new_tokens is None:
        max_new_tokens = max((DEFAULT_MAX_NEW_TOKENS[ex.task] for ex in examples), default=8)
    texts = generate_answers(model, processor, examples, max_new_tokens, batch_size)
    return [parse_answer(info or ex.info, text, ex.markers) for ex, text in zip(examples, texts)]


def accuracy(examples: Sequence[TaskExample], predictions: Sequence[Prediction]) -> float:
    """Share of examples whose prediction is correct (:func:`~onevlm.specialty.tasks.is_correct`)."""
    if len(examples) != len(predictions):
        raise ValueError("examples and predictions differ in length")
    if not examples:
        raise ValueError("no examples")
    return sum(is_correct(ex.task, ex.target, p) for ex, p in zip(examples, predictions)) / len(examples)



def load_finetuned(adapter_dir: str | Path, base_dir: str | Path | None = None,
                   options: LoadOptions | None = None) -> LoadedModel:
    """Load a base model with a fine-tuned adapter on top, checking the base's fingerprint.

    Parameters
    ----------
    adapter_dir:
        A folder written by :func:`finetune` (adapter + ``onevlm_adapter.json``).
    base_dir:
        The base model folder; default: the one recorded in the manifest.
    options:
        How to load the base (device, dtype, quantisation).

    Raises
    ------
    ModelLoadError
        If the base model is not the one the adapter was trained on.
    """
    from peft import PeftModel

    manifest = read_manifest(adapter_dir)
    base = check_model_dir(base_dir if base_dir is not None else manifest.base_model.get("model_dir", ""))
    expected = manifest.base_model["fingerprint"]
    if fingerprint(base) != expected:
        raise ModelLoadError(f"{base}: not the base model the adapter in {adapter_dir} was trained on "
                             f"(fingerprint {fingerprint(base)} != {expected})")
    loaded = load_model(base, options)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = PeftModel.from_pretrained(loaded.model, str(adapter_dir))
    model.eval()
    identity = {**loaded.identity, "adapter": {"dir": str(adapter_dir), "specialty": manifest.specialty,
                                               "prompt_version": manifest.prompt_version}}
    return LoadedModel(model=model, processor=loaded.processor, identity=identity)
