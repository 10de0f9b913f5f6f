"""The training loss: cross-entropy summed over answer tokens, logits computed only where it needs them.

Two choices, both about the answer tokens being few:

- **Weighting.** A fine-tuning step's loss is the mean over every answer token of the step (all
  micro-batches of a gradient-accumulation step, all processes), not the mean of each micro-batch's
  mean: otherwise a micro-batch of one-token classification answers weighs as much as one of long
  box answers. This module returns the *sum* and the token count; the trainer divides the sum by the
  step's count (transformers' ``num_items_in_batch``).
- **Cost.** Gemma 3's output layer has 262,208 rows: the logits of a whole 300-token prompt are
  about 80 M floats per example, and the loss needs only the few positions that predict an answer
  token. The model is asked for those positions only (``logits_to_keep``, the union over the batch's
  rows), which transformers slices *before* the output layer.

Research use only.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from onevlm.specialty.encoding import IGNORE_INDEX


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Sequence positions whose next token is an answer token in any row (1-D, sorted).

    The logit at position ``t`` predicts token ``t + 1``: these are the positions whose logits the
    loss reads.
    """
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)


def answer_loss_sum(model, inputs: Mapping[str, Any], labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of the answer tokens, and how many there are.

    Parameters
    ----------
    model:
        A Gemma 3-style causal VLM (PEFT-wrapped or not) whose forward accepts ``logits_to_keep``.
    inputs:
        The batch without ``labels`` (ids, masks, token types, pixels).
    labels:
        ``(batch, length)`` targets, :data:`~onevlm.specialty.encoding.IGNORE_INDEX` off the answers.

    Returns
    -------
    (torch.Tensor, int)
        The float32 sum of the answer tokens' negative log-likelihoods (differentiable) and the
        number of answer tokens.
    """
    keep = answer_positions(labels)
    outputs = model(**inputs, use_cache=False, logits_to_keep=keep)
    logits = outputs.logits.float()
    targets = labels[:, 1:][:, keep].to(logits.device)
    total = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                              ignore_index=IGNORE_INDEX, reduction="sum")
    return total, int((targets != IGNORE_INDEX).sum())
