"""QLoRA fine-tuning of the specialty model on transformers' ``Trainer``.

:func:`finetune` follows the MedGemma fine-tuning notebook's recipe (TRL's ``SFTTrainer`` is
``Trainer`` underneath; we use ``Trainer`` itself):

- the base model is loaded 4-bit (NF4, double quantisation, bitsandbytes) and prepared with
  ``peft.prepare_model_for_kbit_training``; ``quantize="none"`` trains plain LoRA over the
  unquantised base;
- LoRA adapters (r 16, alpha 16, dropout 0.05) on every linear layer (``"all-linear"``);
- the loss is on the answer tokens only (:mod:`onevlm.specialty.encoding` labels the prompt,
  image tokens and padding -100), **weighted by answer tokens across the accumulated batch**:
  a step's loss is the mean over every answer token of its micro-batches, as ``Trainer`` does
  since transformers 4.46 (:mod:`onevlm.specialty.answer_loss`; logits only at the answer
  positions);
- ``token_type_ids`` (Gemma 3's image-token mask, which drives its bidirectional image
  attention) is extended with zeros over the appended answer tokens;
- bf16 on GPU, fp32 on CPU; AdamW, linear warm-up and decay, gradient clipping; a tqdm bar;
  TensorBoard events behind a flag;
- a checkpoint every ``checkpoint_every`` steps under ``out_dir/checkpoints/checkpoint-N``
  (``Trainer``'s: adapter, optimizer, scheduler, RNG states, trainer state) plus our
  ``checkpoint.json`` (training-set size and the settings that shape the trajectory), written
  last; ``resume=True`` continues exactly from the latest complete one, refusing one whose
  settings or data differ;
- at the end the adapter (``model.save_pretrained(out_dir)``) and ``onevlm_adapter.json``
  (:mod:`onevlm.specialty.manifest`) are written, with the final losses and validation accuracy.

The data order is ours (:class:`_DataStream`: seeded epochs, weighted sampling for mixtures), so
a resumed run replays exactly the examples the uninterrupted run would have seen.

Multi-GPU
---------
Launch the same entry point with ``accelerate launch --num_processes N -m onevlm finetune ...``
(``Trainer`` runs under accelerate): each process loads its own 4-bit copy on its own GPU, takes
every N-th micro-batch of the shared data stream, gradients are all-reduced and the answer
tokens counted over all processes; the main process alone writes checkpoints, the adapter and
the manifest, and runs the final validation. The effective batch is
``batch_size * gradient_accumulation_steps * N``. One process on a machine with several GPUs
uses one (no ``DataParallel``); pick it with ``CUDA_VISIBLE_DEVICES``.

CPU caveat (bitsandbytes): a 4-bit model that has run a no-grad inference pass on the CPU can
no longer be trained, so validation runs only after training, and a baseline measured before
fine-tuning must use a separately loaded model (``finetune`` always loads its own).

Research use only.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
import warnings
from collections import OrderedDict, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from onevlm.specialty.answer_loss import answer_loss_sum
from onevlm.specialty.encoding import (
    ExampleEncoder,
    check_answers,
    compute_dtype,
    image_token_id,
    move_batch,
)
from onevlm.specialty.manifest import (
    AdapterManifest,
    base_model_entry,
    data_summary,
    read_manifest,
    task_entries,
    write_manifest,
)
from onevlm.specialty.prediction import predict
from onevlm.specialty.tasks import TASK_PROMPT_VERSION, TaskExample, is_correct, is_unparseable
from onevlm.vlm.loading import DTYPES, LoadedModel, LoadOptions, ModelLoadError, fingerprint, load_model

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
#: ``Trainer``'s checkpoint folder prefix (``checkpoint-N``).
CHECKPOINT_PREFIX = "checkpoint-"
SCHEDULERS = ("linear", "constant")
#: Our scheduler names → transformers' (both warm up linearly over ``warmup_ratio`` of the steps).
_HF_SCHEDULERS = {"linear": "linear", "constant": "constant_with_warmup"}
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
        AdamW with a linear warm-up over ``warmup_ratio`` of the steps (rounded up), then
        ``linear`` decay to zero or ``constant`` (transformers' ``linear`` and
        ``constant_with_warmup`` schedules); gradient-norm clipping (0 disables it).
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
    tensorboard:
        Also write the logged losses and learning rate as TensorBoard events under
        ``out_dir/runs`` (needs the ``tensorboard`` package: ``pip install onevlm[tensorboard]``).
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
    tensorboard: bool = False

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


# -- checkpoints ------------------------------------------------------------------------------


def _checkpoint_dirs(out_dir: Path) -> list[tuple[int, Path]]:
    from onevlm.specialty.trainer import CHECKPOINT_INFO

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


def _trajectory(settings: TrainingSettings) -> dict[str, Any]:
    full = settings.as_dict()
    return {k: full[k] for k in TRAJECTORY_FIELDS}

def _check_checkpoint(path: Path, settings: TrainingSettings, n_train: int) -> None:
    """Refuse to resume from a checkpoint whose trajectory settings or training-set size differ."""
    from onevlm.specialty.trainer import CHECKPOINT_INFO

    info = json.loads((path / CHECKPOINT_INFO).read_text())
    if info["trajectory"] != _trajectory(settings):
        changed = sorted(k for k in TRAJECTORY_FIELDS if info["trajectory"].get(k) != _trajectory(settings)[k])
        raise ValueError(f"cannot resume from {path.name}: settings changed since the checkpoint ({', '.join(changed)})")
    if info["n_train"] != n_train:
        raise ValueError(f"cannot resume from {path.name}: it was trained on {info['n_train']} examples, not {n_train}")


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


# -- validation -------------------------------------------------------------------------------


@torch.no_grad()
def _validation_loss(model, encoder: ExampleEncoder, examples: Sequence[TaskExample], batch_size: int) -> float:
    """Mean negative log-likelihood per answer token over ``examples`` (the training loss's definition)."""
    model.eval()
    device, dtype = model.get_input_embeddings().weight.device, compute_dtype(model)
    total, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = move_batch(encoder.training_batch(examples[start:start + batch_size]), device, dtype)
        labels = batch.pop("labels")
        summed, count = answer_loss_sum(model, batch, labels)
        total += float(summed)
        tokens += count
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
        Continue from the latest complete checkpoint under ``out_dir/checkpoints`` (its
        trajectory settings and training-set size must match); without one, start afresh.

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
    from onevlm.specialty.trainer import AnswerTrainer, CheckpointInfo, ExampleList, ProgressLog, RunOrder

    _check_examples(examples_train, examples_val)
    out = Path(out_dir)
    started = time.monotonic()
    cpu = settings.device == "cpu" or (settings.device == "auto" and not torch.cuda.is_available())
    if not cpu and not torch.cuda.is_available():
        raise ModelLoadError(f"device {settings.device!r} requested but CUDA is not available")
    if settings.tensorboard:
        _require_tensorboard()
    args = _training_arguments(settings, out, cpu)
    world, rank = args.world_size, args.process_index
    device = args.device if not cpu else torch.device("cpu")
    if world == 1 and settings.device.startswith("cuda:"):
        device = torch.device(settings.device)  # the quantised model stays where it is loaded
    torch.manual_seed(settings.seed)
    random.seed(settings.seed)

    loaded = load_model(base_dir, LoadOptions(device=str(device), dtype=settings.dtype, quantize=settings.quantize,
                                              attn_implementation=settings.attn_implementation))
    encoder = ExampleEncoder(loaded.processor, image_token_id(loaded.model))
    check_answers(loaded.processor.tokenizer, [*examples_train, *examples_val])
    model = _prepare_model(loaded, settings)

    n_train = len(examples_train)
    steps = total_steps(settings, n_train, world)
    args.max_steps = steps
    checkpoint = latest_checkpoint(out) if resume else None
    if checkpoint is not None:
        start_step, path = checkpoint
        if start_step > steps:
            raise ValueError(f"cannot resume: the latest checkpoint is at step {start_step}, past this run's {steps} steps")
        _check_checkpoint(path, settings, n_train)
        logger.info("resuming from the checkpoint at step %d of %d", start_step, steps)
    elif resume:
        logger.info("resume requested but no checkpoint under %s: starting afresh", out / CHECKPOINTS_DIR)

    weights = None
    if settings.dataset_weights:
        missing = sorted({ex.dataset for ex in examples_train} - set(settings.dataset_weights))
        if missing:
            raise ValueError(f"dataset_weights has no weight for dataset {missing[0]!r}")
        weights = [float(settings.dataset_weights[ex.dataset]) for ex in examples_train]
    stream = _DataStream(n_train, settings.batch_size, settings.seed, weights)
    accum = settings.gradient_accumulation_steps
    logger.info("fine-tuning %s: %d training and %d validation examples, %d steps (batch %d x %d x %d processes)",
                settings.specialty, n_train, len(examples_val), steps, settings.batch_size, accum, world)

    trainer = AnswerTrainer(model=model, args=args, train_dataset=ExampleList(examples_train),
                            data_collator=encoder.training_batch, order=RunOrder(stream.batch, steps * accum * world),
                            callbacks=[CheckpointInfo(n_train, _trajectory(settings)),
                                       ProgressLog(f"fine-tuning {settings.specialty}",
                                                   settings.progress and rank == 0)])
    _quiet_printing_callbacks(trainer)
    if settings.tensorboard and rank == 0:
        trainer.add_callback(_tensorboard(out / "runs"))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        output = trainer.train(resume_from_checkpoint=str(checkpoint[1]) if checkpoint is not None else None)
    trained = (steps - (checkpoint[0] if checkpoint is not None else 0)) * settings.batch_size * accum * world
    train_seconds = float(output.metrics.get("train_runtime", 0.0))
    history = [[entry["step"], entry["loss"]] for entry in trainer.state.log_history if "loss" in entry]

    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    if not trainer.is_world_process_zero():
        trainer.accelerator.wait_for_everyone()
        return FinetuneResult(adapter_dir=out, manifest=read_manifest(out))
    unwrapped.save_pretrained(out)
    evaluation = _evaluate(unwrapped, loaded.processor, encoder, examples_val, settings)
    train_loss = history[-1][1] if history else None
    results = {"steps": steps, "train_loss": train_loss, **evaluation,
               "resumed_from": checkpoint[0] if checkpoint is not None else None,
               "seconds": round(time.monotonic() - started, 3), "train_seconds": round(train_seconds, 3),
               "train_samples_per_second": round(trained / train_seconds, 3) if train_seconds > 0 else None,
               "loss_history": history}
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
    trainer.accelerator.wait_for_everyone()
    return FinetuneResult(adapter_dir=out, manifest=manifest, model=unwrapped, processor=loaded.processor)


def _training_arguments(settings: TrainingSettings, out: Path, cpu: bool):
    """``TrainingArguments`` for ``settings`` (the run's length is set once the data is known)."""
    from transformers import TrainingArguments

    mixed = not cpu and settings.dtype in ("auto", "bf16")
    args = TrainingArguments(
        output_dir=str(out / CHECKPOINTS_DIR),
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        max_steps=1,
        learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay,
        lr_scheduler_type=_HF_SCHEDULERS[settings.lr_scheduler],
        warmup_steps=settings.warmup_ratio,  # below 1: a share of the steps (rounded up)
        max_grad_norm=settings.max_grad_norm,
        optim="adamw_torch",
        bf16=mixed,
        fp16=not cpu and settings.dtype == "fp16",
        use_cpu=cpu,
        seed=settings.seed,
        data_seed=settings.seed,
        logging_steps=settings.log_every,
        logging_nan_inf_filter=False,
        save_strategy="steps" if settings.checkpoint_every else "no",
        save_steps=settings.checkpoint_every or 1,
        save_total_limit=settings.keep_checkpoints or None,
        save_only_model=False,
        report_to="none",  # TensorBoard, when asked, by a callback with a fixed folder (_tensorboard)
        remove_unused_columns=False,
        dataloader_pin_memory=not cpu,
        disable_tqdm=True,  # gradient checkpointing: set on the model by _prepare_model, not here
    )
    if args.world_size == 1 and args.n_gpu > 1:
        args._n_gpu = 1  # one process trains on one GPU; several GPUs go through accelerate launch
    return args


def _quiet_printing_callbacks(trainer) -> None:
    """``Trainer`` prints each log dict to stdout; :class:`ProgressLog` logs instead."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)


def _tensorboard(folder: Path):
    """transformers' TensorBoard callback writing to ``folder`` (whatever the version's defaults)."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(folder)))


def _require_tensorboard() -> None:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ValueError("TensorBoard logging needs the tensorboard package: pip install 'onevlm[tensorboard]'") from None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
