"""transformers' ``Trainer`` fitted to specialty fine-tuning: our data order, our loss, our checkpoint rule.

:func:`onevlm.specialty.training.finetune` drives the run; this module holds the pieces that plug
into ``Trainer``:

- :class:`AnswerTrainer` computes the loss with :func:`~onevlm.specialty.answer_loss.answer_loss_sum`
  divided by the answer tokens of the whole accumulated step (``num_items_in_batch``, which
  ``Trainer`` counts over the step's micro-batches and, by default, over all processes), and stops
  on a non-finite loss instead of filtering it out of the log;
- :class:`RunOrder` is the run's whole sequence of examples, micro-batch after micro-batch, drawn
  from a deterministic stream, so a resumed run (``Trainer`` skips the micro-batches already
  trained) sees exactly the examples the uninterrupted run would have seen;
- :class:`CheckpointInfo` writes ``checkpoint.json`` (step, training-set size, trajectory
  settings) into each checkpoint ``Trainer`` saved, last, so its presence marks a complete one;
- :class:`ProgressLog` replaces ``Trainer``'s printing callbacks with a tqdm bar and ``logging``.

Research use only.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from transformers import Trainer, TrainerCallback

from onevlm.specialty.answer_loss import answer_loss_sum
from onevlm.specialty.encoding import compute_dtype

logger = logging.getLogger(__name__)

#: Written last into every checkpoint: a checkpoint without it is incomplete.
CHECKPOINT_INFO = "checkpoint.json"


class ExampleList(torch.utils.data.Dataset):
    """The training examples as a map-style dataset (the collator encodes them)."""

    def __init__(self, examples: Sequence[Any]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Any:
        return self.examples[index]


class RunOrder(torch.utils.data.Sampler):
    """Every example index of a run in order: micro-batch ``k`` is ``batch_of(k)``, for ``k < batches``.

    Parameters
    ----------
    batch_of:
        Micro-batch ``k`` (over all processes) → its example indices; deterministic.
    batches:
        Micro-batches in the run (steps × accumulation × processes); ``Trainer`` shards them over
        the processes (process ``r`` takes every ``r``-th).
    """

    def __init__(self, batch_of: Callable[[int], list[int]], batches: int) -> None:
        self.batch_of, self.batches = batch_of, batches
        self.batch_size = len(batch_of(0))

    def __iter__(self) -> Iterator[int]:
        for k in range(self.batches):
            yield from self.batch_of(k)

    def __len__(self) -> int:
        return self.batches * self.batch_size


class AnswerTrainer(Trainer):
    """``Trainer`` with the answer-token loss and a data order of our own.

    Parameters
    ----------
    order:
        The run's :class:`RunOrder`.
    *args, **kwargs:
        As ``Trainer``.
    """

    def __init__(self, *args, order: RunOrder, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.order = order
        # The loss below is already divided by the whole step's answer tokens: Trainer must count
        # them (num_items_in_batch) and must not divide by the accumulation steps again.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True

    def _get_train_sampler(self, *args, **kwargs) -> RunOrder:
        return self.order

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        dtype = compute_dtype(model)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        total, count = answer_loss_sum(model, inputs, labels)
        if num_items_in_batch is None:
            return total / max(count, 1)
        loss = total / num_items_in_batch.to(total.device) if torch.is_tensor(num_items_in_batch) \
            else total / num_items_in_batch
        if self.args.average_tokens_across_devices:
            # the count is over every process and DDP averages the gradients: undo the average
            loss = loss * self.accelerator.num_processes
        return loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        value = float(loss)
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss is {value} at step {self.state.global_step + 1}; "
                                     "lower the learning rate")
        return loss


class CheckpointInfo(TrainerCallback):
    """Writes ``checkpoint.json`` into the checkpoint ``Trainer`` has just saved (main process)."""

    def __init__(self, n_train: int, trajectory: dict[str, Any]) -> None:
        self.n_train, self.trajectory = n_train, trajectory

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            tmp = folder / f".{CHECKPOINT_INFO}.tmp"
            tmp.write_text(json.dumps({"step": state.global_step, "n_train": self.n_train,
                                       "trajectory": self.trajectory}, indent=2))
            os.replace(tmp, folder / CHECKPOINT_INFO)
            logger.info("checkpoint at step %d", state.global_step)
        return control


class ProgressLog(TrainerCallback):
    """A tqdm bar of optimizer steps (optional) and one log line per logged step."""

    def __init__(self, description: str, show_bar: bool) -> None:
        self.description, self.show_bar = description, show_bar
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.show_bar and state.is_local_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.description, unit="step")
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_local_process_zero and logs and "loss" in logs:
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0.0):.2e}")
            logger.info("step %d/%d loss %.4f lr %.2e", state.global_step, state.max_steps, logs["loss"],
                        logs.get("learning_rate", 0.0))
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        return control
