"""QLoRA fine-tuning of the specialty model, and greedy prediction for evaluation.

:func:`finetune` follows the MedGemma fine-tuning notebook's recipe in a plain PyTorch loop:

- the base model is loaded 4-bit (NF4, double quantisation, bitsandbytes) and prepared with
  ``peft.prepare_model_for_kbit_training``; ``quantize="none"`` trains plain LoRA over the
  unquantised base;
- LoRA adapters (r 16, alpha 16, dropout 0.05) on every linear layer (``"all-linear"``);
- the loss is on the answer tokens only: prompt, image tokens and padding are labelled -100;
- ``token_type_ids`` (Gemma 3's image-token mask, which drives its bidirectional image
  attention) is extended with zeros over the appended answer tokens;
- bf16 on GPU, fp32 on CPU; AdamW, linear warm-up and decay, gradient clipping; a tqdm bar;
- a checkpoint every ``checkpoint_every`` steps under ``out_dir/checkpoints`` (adapter,
  optimizer, scheduler, RNG state); ``resume=True`` continues from the latest one;
- at the end the adapter (``model.save_pretrained(out_dir)``) and ``onevlm_adapter.json``
  (:mod:`onevlm.specialty.manifest`) are written, with the final losses and validation accuracy.

Multi-GPU
---------
The loop runs through ``accelerate.Accelerator``; on one GPU or the CPU nothing needs setting
up. For data-parallel training over several GPUs, launch the same entry point with
``accelerate launch --num_processes N -m onevlm finetune ...`` (the CLI calls :func:`finetune`): each
process loads its own 4-bit copy on its own GPU, takes every N-th micro-batch of the shared
data stream and gradients are all-reduced; the main process alone writes checkpoints, the
adapter and the manifest, and runs the final validation. The effective batch is
``batch_size * gradient_accumulation_steps * N``.

CPU caveat (bitsandbytes): a 4-bit model that has run a no-grad inference pass on the CPU can
no longer be trained, so validation runs only after training, and a baseline measured before
fine-tuning must use a separately loaded model (``finetune`` always loads its own).

Research use only.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import shutil
import time
import warnings
from collections import OrderedDict, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from onevlm.router.prompts import StagePrompt
from onevlm.specialty.manifest import (
    AdapterManifest,
    base_model_entry,
    data_summary,
    read_manifest,
    task_entries,
    write_manifest,
)
from onevlm.specialty.samples import DatasetInfo
from onevlm.specialty.tasks import (
    TASK_PROMPT_VERSION,
    Prediction,
    TaskExample,
    is_correct,
    is_unparseable,
    parse_answer,
)
from onevlm.vlm.backend import PromptBuilder
from onevlm.vlm.engine import PromptTokens
from onevlm.vlm.loading import (
    DTYPES,
    LoadedModel,
    LoadOptions,
    ModelLoadError,
    check_model_dir,
    fingerprint,
    load_model,
)

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step-"
CHECKPOINT_STATE = "trainer_state.pt"
CHECKPOINT_INFO = "checkpoint.json"
SCHEDULERS = ("linear", "constant")
#: Answer-length bound per task when none is given (tokens, end of turn included).
DEFAULT_MAX_NEW_TOKENS = {"classification": 8, "grading": 8, "region-classification": 8,
                          "multilabel": 96, "detection": 256}
#: Settings that shape the training trajectory: a checkpoint resumes only if they are unchanged.
TRAJECTORY_FIELDS = ("specialty", "quantize", "dtype", "lora_r", "lora_alpha", "lora_dropout", "target_modules",
                     "modules_to_save", "learning_rate", "weight_decay", "batch_size",
                     "gradient_accumulation_steps", "warmup_ratio", "lr_scheduler", "max_grad_norm", "seed",
                     "dataset_weights", "gradient_checkpointing")


@dataclass(frozen=True)
class TrainingSettings:
    """How to fine-tune (defaults: the MedGemma notebook's QLoRA recipe).

    Attributes
    ----------
    specialty:
        The specialty the adapter serves (goes into the manifest).
    quantize:
        ``nf4`` (QLoRA: 4-bit NF4 base with double quantisation) or ``none`` (plain LoRA).
    device:
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (under ``accelerate launch`` each process uses
        its own GPU whatever this says, unless it is ``cpu``).
    dtype:
        Compute dtype: ``auto`` (bf16 on GPU, fp32 on CPU), ``bf16``, ``fp16`` or ``fp32``.
    lora_r, lora_alpha, lora_dropout, target_modules, modules_to_save:
        LoRA configuration; ``target_modules="all-linear"`` adapts every linear layer but the
        output head. (The notebook also saves ``lm_head`` and ``embed_tokens`` in full; that is
        ``modules_to_save=("lm_head", "embed_tokens")``, off by default: it stores ~2 GB.)
    learning_rate, weight_decay, warmup_ratio, lr_scheduler, max_grad_norm:
        AdamW with a linear warm-up over ``warmup_ratio`` of the steps, then ``linear`` decay
        to zero or ``constant``; gradient-norm clipping (0 disables it).
    batch_size, gradient_accumulation_steps:
        Examples per micro-batch (per process) and micro-batches per optimizer step.
    epochs, max_steps:
        Training length: ``max_steps`` optimizer steps if given, else ``epochs`` passes.
    dataset_weights:
        Optional per-dataset sampling weight of each example (the specialty mixture's weights):
        with unequal weights each epoch draws as many examples as there are, with replacement,
        example ``i`` with probability proportional to its dataset's weight; without (or all
        equal) each epoch is a shuffled pass.
    checkpoint_every, keep_checkpoints:
        Checkpoint period in optimizer steps (0: no checkpoints; otherwise one is also written
        at the final step) and how many of the latest to keep (0: all).
    gradient_checkpointing:
        Recompute activations in the backward pass (saves GPU memory; slower).
    seed:
        Seeds LoRA initialisation, dropout and the data order.
    eval_batch_size, eval_max_new_tokens, max_val_examples:
        Final validation: generation batch size, answer-length bound (``None``: the longest
        validation answer plus 4 tokens), and an optional cap on examples predicted.
    log_every, progress:
        Log the mean loss every ``log_every`` steps; show a tqdm progress bar.
    """

    specialty: str
    quantize: str = "nf4"
    device: str = "auto"
    dtype: str = "auto"
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: str | tuple[str, ...] = "all-linear"
    modules_to_save: tuple[str, ...] = ()
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_scheduler: str = "linear"
    max_grad_norm: float = 0.3
    batch_size: int = 4
    gradient_accumulation_steps: int = 4
    epochs: float = 1.0
    max_steps: int | None = None
    dataset_weights: Mapping[str, float] | None = None
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    gradient_checkpointing: bool = True
    attn_implementation: str = "sdpa"
    seed: int = 0
    eval_batch_size: int = 8
    eval_max_new_tokens: int | None = None
    max_val_examples: int | None = None
    log_every: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        def positive_int(name: str, value: Any, allow_zero: bool = False) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if allow_zero else 1):
                raise ValueError(f"{name} must be an integer >= {0 if allow_zero else 1}, got {value!r}")

        if not isinstance(self.specialty, str) or not self.specialty.strip():
            raise ValueError("specialty must be a non-empty string")
        if self.quantize not in ("nf4", "none"):
            raise ValueError(f"quantize must be 'nf4' or 'none', got {self.quantize!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.lr_scheduler not in SCHEDULERS:
            raise ValueError(f"lr_scheduler must be one of {', '.join(SCHEDULERS)}, got {self.lr_scheduler!r}")
        for name in ("lora_r", "lora_alpha", "batch_size", "gradient_accumulation_steps", "eval_batch_size", "log_every"):
            positive_int(name, getattr(self, name))
        for name in ("checkpoint_every", "keep_checkpoints"):
            positive_int(name, getattr(self, name), allow_zero=True)
        for name in ("max_steps", "eval_max_new_tokens", "max_val_examples"):
            if getattr(self, name) is not None:
                positive_int(name, getattr(self, name))
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if not (self.weight_decay >= 0 and self.max_grad_norm >= 0 and 0.0 <= self.warmup_ratio < 1.0):
            raise ValueError("weight_decay and max_grad_norm must be >= 0 and warmup_ratio in [0, 1)")
        if self.max_steps is None and not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ValueError(f"epochs must be > 0 when max_steps is not given, got {self.epochs!r}")
        if not (self.target_modules == "all-linear" or (isinstance(self.target_modules, tuple) and self.target_modules
                                                          and all(isinstance(m, str) for m in self.target_modules))):
            raise ValueError("target_modules must be 'all-linear' or a non-empty tuple of module names")
        if not isinstance(self.modules_to_save, tuple) or not all(isinstance(m, str) for m in self.modules_to_save):
            raise ValueError("modules_to_save must be a tuple of module names")
        if self.dataset_weights is not None:
            for name, weight in self.dataset_weights.items():
                if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight) or weight <= 0:
                    raise ValueError(f"dataset_weights[{name!r}] must be a positive number, got {weight!r}")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready settings (tuples as lists, weights as a plain dict)."""
        out = asdict(self)
        out["target_modules"] = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        out["modules_to_save"] = list(self.modules_to_save)
        out["dataset_weights"] = dict(self.dataset_weights) if self.dataset_weights is not None else None
        return out


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns.

    Attributes
    ----------
    adapter_dir:
        Where the adapter and ``onevlm_adapter.json`` were written.
    manifest:
        The written manifest (final losses, validation accuracy, …).
    model, processor:
        The fine-tuned (PEFT) model, in eval mode, and its processor: ready for :func:`predict`
        on the main process (``None`` on the other processes of a multi-GPU run).
    """

    adapter_dir: Path
    manifest: AdapterManifest
    model: Any = field(repr=False, default=None)
    processor: Any = field(repr=False, default=None)


# -- encoding ---------------------------------------------------------------------------------


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


def _check_answers(tokenizer, examples: Sequence[TaskExample]) -> None:
    bad = unrepresentable_answers(tokenizer, examples)
    if bad:
        dataset, answers = next(iter(bad.items()))
        raise ValueError(f"{sum(len(a) for a in bad.values())} distinct answers cannot be written exactly by this "
                         f"tokenizer (dataset {dataset!r}, e.g. {answers[0]!r}); choose option markers the tokenizer "
                         "has (markers='numbers') or class names it can spell")


# -- data order -------------------------------------------------------------------------------


class _DataStream:
    """An endless, deterministic stream of example indices: epoch after epoch.

    Micro-batch ``k`` (counted over all processes) takes positions ``k*b .. k*b+b-1`` of the
    concatenated epochs, so a resumed run continues exactly where the checkpoint left off.
    """

    def __init__(self, n: int, batch_size: int, seed: int, weights: Sequence[float] | None) -> None:
        if n < 1:
            raise ValueError("no training examples")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        uniform = weights is None or len(set(weights)) <= 1
        self.weights = None if uniform else torch.tensor(list(weights), dtype=torch.double)
        self._epochs: OrderedDict[int, list[int]] = OrderedDict()

    def _epoch(self, e: int) -> list[int]:
        if e not in self._epochs:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
            if self.weights is None:
                order = torch.randperm(self.n, generator=g)
            else:
                order = torch.multinomial(self.weights, self.n, replacement=True, generator=g)
            self._epochs[e] = order.tolist()
            while len(self._epochs) > 2:
                self._epochs.popitem(last=False)
        return self._epochs[e]

    def batch(self, k: int) -> list[int]:
        start = k * self.batch_size
        return [self._epoch(p // self.n)[p % self.n] for p in range(start, start + self.batch_size)]


def total_steps(settings: TrainingSettings, n_train: int, world_size: int = 1) -> int:
    """Optimizer steps of a run: ``max_steps``, or enough for ``epochs`` passes over the data."""
    if settings.max_steps is not None:
        return settings.max_steps
    per_step = settings.batch_size * settings.gradient_accumulation_steps * world_size
    return max(1, math.ceil(settings.epochs * n_train / per_step))


def _lr_lambda(settings: TrainingSettings, total: int):
    warmup = math.ceil(settings.warmup_ratio * total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if settings.lr_scheduler == "constant":
            return 1.0
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


# -- checkpoints ------------------------------------------------------------------------------


def _checkpoint_dirs(out_dir: Path) -> list[tuple[int, Path]]:
    root = out_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        name = path.name
        if path.is_dir() and name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX):].isdigit() \
                and (path / CHECKPOINT_INFO).is_file():
            found.append((int(name[len(CHECKPOINT_PREFIX):]), path))
    return sorted(found)


def latest_checkpoint(out_dir: str | Path) -> tuple[int, Path] | None:
    """The step and folder of the latest complete checkpoint under ``out_dir/checkpoints``."""
    found = _checkpoint_dirs(Path(out_dir))
    return found[-1] if found else None


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _trajectory(settings: TrainingSettings) -> dict[str, Any]:
    full = settings.as_dict()
    return {k: full[k] for k in TRAJECTORY_FIELDS}


def _save_checkpoint(out_dir: Path, step: int, model, optimizer, scheduler, history: list, settings: TrainingSettings,
                     n_train: int, keep: int) -> Path:
    import json

    root = out_dir / CHECKPOINTS_DIR
    final = root / f"{CHECKPOINT_PREFIX}{step:07d}"
    tmp = root / f".tmp-{CHECKPOINT_PREFIX}{step:07d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state(),
                "history": history, "step": step}, tmp / CHECKPOINT_STATE)
    (tmp / CHECKPOINT_INFO).write_text(json.dumps({"step": step, "n_train": n_train,
                                                   "trajectory": _trajectory(settings)}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for _, old in _checkpoint_dirs(out_dir)[:-keep] if keep else []:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("checkpoint at step %d", step)
    return final


def _load_checkpoint(path: Path, model, settings: TrainingSettings, n_train: int) -> dict[str, Any]:
    import json

    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    info = json.loads((path / CHECKPOINT_INFO).read_text())
    if info["trajectory"] != _trajectory(settings):
        changed = sorted(k for k in TRAJECTORY_FIELDS if info["trajectory"].get(k) != _trajectory(settings)[k])
        raise ValueError(f"cannot resume from {path.name}: settings changed since the checkpoint ({', '.join(changed)})")
    if info["n_train"] != n_train:
        raise ValueError(f"cannot resume from {path.name}: it was trained on {info['n_train']} examples, not {n_train}")
    weights = path / "adapter_model.safetensors"
    if weights.is_file():
        state = load_file(str(weights))
    else:
        state = torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"checkpoint {path.name} does not fit this model ({len(unexpected)} unexpected weights)")
    return torch.load(path / CHECKPOINT_STATE, map_location="cpu", weights_only=False)


# -- model ------------------------------------------------------------------------------------


def _prepare_model(loaded: LoadedModel, settings: TrainingSettings):
    with warnings.catch_warnings():
        # peft asks transformers for the deprecated ``is_gradient_checkpointing`` (harmless)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return _prepare_model_quietly(loaded, settings)


def _prepare_model_quietly(loaded: LoadedModel, settings: TrainingSettings):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = loaded.model
    model.config.use_cache = False
    if hasattr(model.config, "text_config"):
        model.config.text_config.use_cache = False
    ckpt_kwargs = {"use_reentrant": False}
    if settings.quantize == "nf4":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=ckpt_kwargs)
    elif settings.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
        model.enable_input_require_grads()
    target = settings.target_modules if isinstance(settings.target_modules, str) else list(settings.target_modules)
    config = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                        bias="none", target_modules=target, task_type="CAUSAL_LM",
                        modules_to_save=list(settings.modules_to_save) or None)
    model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("LoRA r=%d alpha=%d on %s: %d trainable of %d parameters", settings.lora_r, settings.lora_alpha,
                target, trainable, total)
    return model


def _image_token_id(model) -> int:
    image_token_id = getattr(model.config, "image_token_id", None)
    if image_token_id is None:
        raise ModelLoadError("fine-tuning needs a Gemma 3-style VLM (config.image_token_id)")
    return image_token_id


def _to(batch: Mapping[str, torch.Tensor], device, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in batch.items():
        v = v.to(device)
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v
    return out


def _compute_dtype(model) -> torch.dtype:
    return model.get_input_embeddings().weight.dtype


# -- evaluation -------------------------------------------------------------------------------


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
    encoder = ExampleEncoder(processor, _image_token_id(model))
    tokenizer = processor.tokenizer
    eos = _eos_ids(model, tokenizer)
    device, dtype = model.get_input_embeddings().weight.device, _compute_dtype(model)
    texts: list[str] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = _to(encoder.generation_batch(chunk), device, dtype)
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


@torch.no_grad()
def _validation_loss(model, encoder: ExampleEncoder, examples: Sequence[TaskExample], batch_size: int) -> float:
    model.eval()
    device, dtype = model.get_input_embeddings().weight.device, _compute_dtype(model)
    total, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = _to(encoder.training_batch(examples[start:start + batch_size]), device, dtype)
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        loss = model(**batch, use_cache=False).loss
        total += float(loss) * n
        tokens += n
    return total / max(tokens, 1)


def _evaluate(model, processor, encoder: ExampleEncoder, val: Sequence[TaskExample],
              settings: TrainingSettings) -> dict[str, Any]:
    if not val:
        return {"val_loss": None, "val_accuracy": None, "val_accuracy_per_dataset": {}, "val_unparseable": 0,
                "val_examples": 0}
    val_loss = _validation_loss(model, encoder, val, settings.eval_batch_size)
    subset = list(val[:settings.max_val_examples]) if settings.max_val_examples else list(val)
    by_dataset: dict[str, list[TaskExample]] = defaultdict(list)
    for ex in subset:
        by_dataset[ex.dataset].append(ex)
    per_dataset, correct, unparseable = {}, 0, 0
    for name, group in by_dataset.items():
        budget = settings.eval_max_new_tokens or max(len(encoder.answer_ids(ex.answer)) for ex in group) + 4
        preds = predict(model, processor, group[0].info, group, budget, settings.eval_batch_size)
        hits = sum(is_correct(ex.task, ex.target, p) for ex, p in zip(group, preds))
        per_dataset[name] = hits / len(group)
        correct += hits
        unparseable += sum(is_unparseable(p) for p in preds)
    return {"val_loss": val_loss, "val_accuracy": correct / len(subset), "val_accuracy_per_dataset": per_dataset,
            "val_unparseable": unparseable, "val_examples": len(subset)}


# -- fine-tuning ------------------------------------------------------------------------------


def _check_examples(train: Sequence[TaskExample], val: Sequence[TaskExample]) -> None:
    if not train:
        raise ValueError("examples_train is empty")
    for name, examples in (("examples_train", train), ("examples_val", val)):
        for ex in examples:
            if not isinstance(ex, TaskExample):
                raise TypeError(f"{name} must hold TaskExample objects, got {type(ex).__name__}")


def finetune(base_dir: str | Path, examples_train: Sequence[TaskExample], examples_val: Sequence[TaskExample],
             out_dir: str | Path, settings: TrainingSettings, resume: bool = False) -> FinetuneResult:
    """Fine-tune a LoRA adapter (QLoRA by default) of ``base_dir`` on the examples.

    Parameters
    ----------
    base_dir:
        The base model folder (MedGemma-4B-it or a synthetic model); loaded offline.
    examples_train, examples_val:
        Rendered examples (:func:`onevlm.specialty.tasks.build_example`); several datasets
        and task kinds may be mixed. The validation set gives the final loss and accuracy
        (may be empty).
    out_dir:
        Where the adapter, ``onevlm_adapter.json`` and ``checkpoints/`` go.
    settings:
        :class:`TrainingSettings`.
    resume:
        Continue from the latest checkpoint under ``out_dir/checkpoints`` (its trajectory
        settings and training-set size must match); without one, start afresh.

    Returns
    -------
    FinetuneResult
        Adapter folder, manifest, and the trained model and processor (eval mode).

    Raises
    ------
    ValueError
        On empty training data, an answer the tokenizer cannot write, or a checkpoint that does
        not fit the settings.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    _check_examples(examples_train, examples_val)
    out = Path(out_dir)
    started = time.monotonic()
    cpu = settings.device == "cpu" or (settings.device == "auto" and not torch.cuda.is_available())
    if not cpu and not torch.cuda.is_available():
        raise ModelLoadError(f"device {settings.device!r} requested but CUDA is not available")
    load_dtype = settings.dtype
    mixed = "no"
    if not cpu and settings.dtype in ("auto", "bf16"):
        mixed = "bf16"
    elif not cpu and settings.dtype == "fp16":
        mixed = "fp16"
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed)
    device = accelerator.device
    if accelerator.num_processes == 1 and settings.device.startswith("cuda:"):
        device = torch.device(settings.device)  # the model is placed here; prepare() does not move it
    torch.manual_seed(settings.seed)
    random.seed(settings.seed)

    loaded = load_model(base_dir, LoadOptions(device=str(device), dtype=load_dtype, quantize=settings.quantize,
                                              attn_implementation=settings.attn_implementation))
    encoder = ExampleEncoder(loaded.processor, _image_token_id(loaded.model))
    _check_answers(loaded.processor.tokenizer, [*examples_train, *examples_val])
    model = _prepare_model(loaded, settings)

    world, rank = accelerator.num_processes, accelerator.process_index
    n_train = len(examples_train)
    steps = total_steps(settings, n_train, world)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(settings, steps))

    start_step, history = 0, []
    checkpoint = latest_checkpoint(out) if resume else None
    state = None
    if checkpoint is not None:
        start_step, path = checkpoint
        if start_step > steps:
            raise ValueError(f"cannot resume: the latest checkpoint is at step {start_step}, past this run's {steps} steps")
        state = _load_checkpoint(path, model, settings, n_train)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = list(state["history"])
        logger.info("resuming from the checkpoint at step %d of %d", start_step, steps)
    elif resume:
        logger.info("resume requested but no checkpoint under %s: starting afresh", out / CHECKPOINTS_DIR)
    model, optimizer = accelerator.prepare(model, optimizer, device_placement=[False, False])
    if state is not None:
        _set_rng_state(state["rng"])

    weights = None
    if settings.dataset_weights:
        missing = sorted({ex.dataset for ex in examples_train} - set(settings.dataset_weights))
        if missing:
            raise ValueError(f"dataset_weights has no weight for dataset {missing[0]!r}")
        weights = [float(settings.dataset_weights[ex.dataset]) for ex in examples_train]
    stream = _DataStream(n_train, settings.batch_size, settings.seed, weights)
    accum = settings.gradient_accumulation_steps
    compute_dtype = _compute_dtype(accelerator.unwrap_model(model))
    logger.info("fine-tuning %s: %d training and %d validation examples, %d steps (batch %d x %d x %d processes)",
                settings.specialty, n_train, len(examples_val), steps, settings.batch_size, accum, world)

    model.train()
    window: list[float] = []
    bar = tqdm(total=steps, initial=start_step, desc=f"fine-tuning {settings.specialty}", unit="step",
               disable=not (settings.progress and accelerator.is_local_main_process))
    for step in range(start_step, steps):
        step_loss = torch.zeros((), device=device)
        for micro in range(accum):
            k = (step * accum + micro) * world + rank
            batch = _to(encoder.training_batch([examples_train[i] for i in stream.batch(k)]), device, compute_dtype)
            sync = contextlib.nullcontext() if micro == accum - 1 else accelerator.no_sync(model)
            with sync, accelerator.autocast():
                loss = model(**batch).loss / accum
            accelerator.backward(loss)
            step_loss += loss.detach().float()
        if settings.max_grad_norm > 0:
            accelerator.clip_grad_norm_(trainable, settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(accelerator.reduce(step_loss, reduction="mean"))
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss is {value} at step {step + 1}; lower the learning rate")
        window.append(value)
        bar.update(1)
        bar.set_postfix(loss=f"{value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        done = step + 1
        if done % settings.log_every == 0 or done == steps:
            mean = sum(window) / len(window)
            history.append([done, mean])
            logger.info("step %d/%d loss %.4f lr %.2e", done, steps, mean, scheduler.get_last_lr()[0])
            window = []
        if settings.checkpoint_every and (done % settings.checkpoint_every == 0 or done == steps):
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                _save_checkpoint(out, done, accelerator.unwrap_model(model), optimizer, scheduler, history, settings,
                                 n_train, settings.keep_checkpoints)
    bar.close()
    accelerator.wait_for_everyone()

    unwrapped = accelerator.unwrap_model(model)
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return FinetuneResult(adapter_dir=out, manifest=read_manifest(out))
    unwrapped.save_pretrained(out)
    evaluation = _evaluate(unwrapped, loaded.processor, encoder, examples_val, settings)
    train_loss = history[-1][1] if history else None
    results = {"steps": steps, "train_loss": train_loss, **evaluation, "resumed_from": start_step if state else None,
               "seconds": round(time.monotonic() - started, 3), "loss_history": history}
    manifest = AdapterManifest(
        specialty=settings.specialty,
        base_model={**base_model_entry(loaded.identity), "fingerprint": fingerprint(Path(base_dir))},
        tasks=task_entries([*examples_train, *examples_val]),
        prompt_version=TASK_PROMPT_VERSION,
        data=data_summary([*examples_train, *examples_val]),
        training={**settings.as_dict(), "world_size": world, "total_steps": steps},
        results=results,
    )
    write_manifest(out, manifest)
    logger.info("fine-tuned %s in %.1f s: train loss %s, val loss %s, val accuracy %s", settings.specialty,
                results["seconds"], _fmt(train_loss), _fmt(evaluation["val_loss"]), _fmt(evaluation["val_accuracy"]))
    accelerator.wait_for_everyone()
    return FinetuneResult(adapter_dir=out, manifest=manifest, model=unwrapped, processor=loaded.processor)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


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
