"""Specialty examples as model inputs: prompt + answer sequences with answer-only labels.

The prompt goes through the model's chat template (:class:`onevlm.vlm.backend.PromptBuilder`, the
router's own), the image placeholder expanded to the processor's image tokens; the answer is the
task's text followed by ``<end_of_turn>``. Labels are ``-100`` everywhere but on the answer, so a
loss over them is a loss on what the model must write.

Research use only.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from onevlm.router.prompts import StagePrompt
from onevlm.specialty.tasks import TaskExample, parse_answer
from onevlm.vlm.backend import PromptBuilder
from onevlm.vlm.engine import PromptTokens
from onevlm.vlm.loading import ModelLoadError

#: The label of every position that is not an answer token (PyTorch's cross-entropy ignore index).
IGNORE_INDEX = -100


@dataclass(frozen=True)
class EncodedExample:
    """One training sequence: prompt (image expanded) + answer + end of turn.

    ``labels`` is ``-100`` on every prompt position (text and image tokens), the answer ids on
    the answer positions; ``token_type_ids`` is 1 on image tokens and 0 elsewhere, over the
    whole sequence (answer included).
    """

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    token_type_ids: tuple[int, ...]
    prompt_length: int

    def __post_init__(self) -> None:
        if not (len(self.input_ids) == len(self.labels) == len(self.token_type_ids)):
            raise ValueError("input_ids, labels and token_type_ids must have equal lengths")


class ExampleEncoder:
    """Turns :class:`TaskExample` objects into model inputs through the model's chat template.

    Parameters
    ----------
    processor:
        A Gemma 3-style processor (the prompt goes through :class:`onevlm.vlm.backend.PromptBuilder`).
    image_token_id:
        The model's image placeholder id (``model.config.image_token_id``).
    """

    def __init__(self, processor, image_token_id: int) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.builder = PromptBuilder(processor, image_token_id)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id

    def prompt(self, example: TaskExample) -> PromptTokens:
        """The prompt tokens (generation prompt included, image placeholder expanded)."""
        prompt = StagePrompt(example.prompt_id, example.system, example.user, uses_image=True)
        return self.builder.tokens(prompt)

    def answer_ids(self, answer: str) -> tuple[int, ...]:
        """The answer's ids followed by ``<end_of_turn>``, as the model must write them."""
        return self.builder.option_tokens(answer)

    def encode(self, example: TaskExample) -> EncodedExample:
        """Prompt + answer with answer-only labels and extended ``token_type_ids``."""
        prompt = self.prompt(example)
        answer = self.answer_ids(example.answer)
        n = len(prompt.input_ids)
        return EncodedExample(
            input_ids=prompt.input_ids + answer,
            labels=(IGNORE_INDEX,) * n + answer,
            token_type_ids=tuple(int(m) for m in prompt.image_mask) + (0,) * len(answer),
            prompt_length=n,
        )

    def pixel_values(self, examples: Sequence[TaskExample]) -> torch.Tensor:
        """Preprocessed images ``(n, 3, H, W)`` (loaded now, not kept)."""
        images = [ex.load_image() for ex in examples]
        return self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]

    def training_batch(self, examples: Sequence[TaskExample]) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids``, ``attention_mask``, ``token_type_ids``, ``labels``, ``pixel_values``."""
        encoded = [self.encode(ex) for ex in examples]
        width = max(len(e.input_ids) for e in encoded)
        ids = torch.full((len(encoded), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
        types = torch.zeros((len(encoded), width), dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, e in enumerate(encoded):
            n = len(e.input_ids)
            ids[row, :n] = torch.tensor(e.input_ids)
            labels[row, :n] = torch.tensor(e.labels)
            types[row, :n] = torch.tensor(e.token_type_ids)
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels,
                "pixel_values": self.pixel_values(examples)}

    def generation_batch(self, examples: Sequence[TaskExample]) -> dict[str, torch.Tensor]:
        """Left-padded prompts (no answer) for ``generate``."""
        prompts = [self.prompt(ex) for ex in examples]
        width = max(len(p.input_ids) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        types = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            n = len(p.input_ids)
            ids[row, width - n:] = torch.tensor(p.input_ids)
            types[row, width - n:] = torch.tensor([int(m) for m in p.image_mask])
            mask[row, width - n:] = 1
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
                "pixel_values": self.pixel_values(examples)}


def unrepresentable_answers(tokenizer, examples: Sequence[TaskExample]) -> dict[str, list[str]]:
    """Answers the tokenizer cannot write exactly, per dataset.

    An answer is representable when its ids contain no unknown token and decoding them parses
    back to the example's target; a model can neither learn nor be credited for the others
    (the synthetic test tokenizer has no ``C``, for instance: use ``markers="numbers"``).
    """
    unk = tokenizer.unk_token_id
    bad: dict[str, list[str]] = defaultdict(list)
    seen: set[tuple[str, str]] = set()
    for ex in examples:
        key = (ex.dataset, ex.answer)
        if key in seen:
            continue
        seen.add(key)
        ids = tokenizer(ex.answer, add_special_tokens=False)["input_ids"]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if (unk is not None and unk in ids) or parse_answer(ex.info, text, ex.markers) != ex.target:
            bad[ex.dataset].append(ex.answer)
    return dict(bad)


def check_answers(tokenizer, examples: Sequence[TaskExample]) -> None:
    """Refuse examples whose answers the tokenizer cannot write exactly (:func:`unrepresentable_answers`)."""
    bad = unrepresentable_answers(tokenizer, examples)
    if bad:
        dataset, answers = next(iter(bad.items()))
        raise ValueError(f"{sum(len(a) for a in bad.values())} distinct answers cannot be written exactly by this "
                         f"tokenizer (dataset {dataset!r}, e.g. {answers[0]!r}); choose option markers the tokenizer "
                         "has (markers='numbers') or class names it can spell")


def image_token_id(model) -> int:
    """The model's image placeholder id; refuses a model that is not a Gemma 3-style VLM."""
    token_id = getattr(model.config, "image_token_id", None)
    if token_id is None:
        raise ModelLoadError("fine-tuning needs a Gemma 3-style VLM (config.image_token_id)")
    return token_id


def move_batch(batch: Mapping[str, torch.Tensor], device, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The batch on ``device``, floating-point tensors (pixels) cast to ``dtype`` when given."""
    out = {}
    for k, v in batch.items():
        v = v.to(device)
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v
    return out


def compute_dtype(model) -> torch.dtype:
    """The dtype the model computes in (its input embeddings')."""
    return model.get_input_embeddings().weight.dtype
