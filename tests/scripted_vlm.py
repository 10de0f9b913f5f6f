"""Test-only control of a synthetic VLM's answers: a known distribution over scripted answers.

A random model rarely writes an admissible answer, let alone a messy one ("The modality is
brain CT scan.", "**MODEL_07**: …"). :class:`ScriptedAnswers` patches one loaded model so that,
after the model turn opens (``<start_of_turn>model\\n``), its next-token distribution follows a
weighted set of answers: the tokens of every answer (end of turn included) form a trie, and at a
node the probability of a child is ``(1 - LEAK) × weight(child's answers) / weight(node)``; at the
root it is the answers' weights themselves (they must sum to at most 1). The rest of the mass is
spread evenly over all other tokens, so every engine reads a proper distribution. Prefixes off the
script keep the model's own logits.

The override sits on the model's ``forward`` (so ``generate`` and the engines' direct calls both
go through it); the token history of each row travels on the KV cache object, repeated when an
engine repeats the cache rows for its branches or options; the graph engine's static cache takes
its rows from the last prefill in that engine's layout. Never shipped: tests only.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Mapping

import torch

from onevlm.vlm.backend import MODEL_TURN_OPENING

LEAK = 0.01


@dataclass
class _Node:
    weight: float = 0.0
    children: dict[int, "_Node"] = field(default_factory=dict)


class ScriptedAnswers:
    """Make ``loaded.model`` answer with the weighted ``answers`` (text → probability of the whole).

    Parameters
    ----------
    loaded:
        A :class:`onevlm.vlm.loading.LoadedModel` (its model is patched in place; call
        :meth:`remove` to restore it).
    answers:
        Answer text → its probability as a whole (sum ≤ 1). Texts are tokenised as they follow
        the model-turn opening, and end with ``<end_of_turn>``.
    """

    def __init__(self, loaded, answers: Mapping[str, float]) -> None:
        if sum(answers.values()) > 1.0 + 1e-9 or any(w <= 0 for w in answers.values()):
            raise ValueError("answer weights must be positive and sum to at most 1")
        self.model = loaded.model
        tokenizer = loaded.processor.tokenizer
        self.opening = tuple(tokenizer(MODEL_TURN_OPENING, add_special_tokens=False)["input_ids"])
        self.end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
        self.vocab = self.model.get_input_embeddings().num_embeddings
        self.root = _Node()
        self.tokens: dict[str, tuple[int, ...]] = {}
        for text, weight in answers.items():
            ids = tokenizer(MODEL_TURN_OPENING + text, add_special_tokens=False)["input_ids"]
            assert tuple(ids[: len(self.opening)]) == self.opening
            tokens = (*ids[len(self.opening):], self.end_of_turn)
            self.tokens[text] = tokens
            node = self.root
            node.weight += weight
            for token in tokens:
                node = node.children.setdefault(token, _Node())
                node.weight += weight
        self._install()

    # -- what the scripted model says -----------------------------------------------------------

    def next_token_logprobs(self, prefix: tuple[int, ...]) -> dict[int, float] | None:
        """The scripted log-probabilities after ``prefix`` (answer tokens so far), or None off-script."""
        node = self.root
        for token in prefix:
            node = node.children.get(token)
            if node is None:
                return None
        if not node.children:
            return None
        at_root = node is self.root
        return {token: math.log(child.weight if at_root else (1 - LEAK) * child.weight / node.weight)
                for token, child in node.children.items()}

    def answer_logprob(self, text: str) -> float:
        """Log-probability of a scripted answer's whole token sequence (end of turn included)."""
        tokens, total = self.tokens[text], 0.0
        for i, token in enumerate(tokens):
            total += self.next_token_logprobs(tokens[:i])[token]
        return total

    def first_token_p(self, text: str) -> float:
        return math.exp(self.next_token_logprobs(())[self.tokens[text][0]])

    # -- the patch ------------------------------------------------------------------------------

    def _install(self) -> None:
        embed = self.model.get_input_embeddings()
        original_embed = embed.forward
        original_forward = self.model.forward
        recorded: dict[str, torch.Tensor] = {}

        @functools.wraps(original_embed)
        def embed_forward(input_ids, *args, **kwargs):
            recorded["ids"] = input_ids  # the engines embed their prompt ids just before prefill
            return original_embed(input_ids, *args, **kwargs)

        @functools.wraps(original_forward)  # generate and the engines read the signature
        def forward(*args, **kwargs):
            ids = kwargs.get("input_ids")
            if ids is None:
                ids = recorded.pop("ids")
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            history = getattr(cache, "_scripted_rows", None) if cache is not None else None
            slot = getattr(cache, "slot", None)
            if slot is not None and int(slot) == len(recorded["prefill"][0]):
                # The graph engine's static cache at its first step, loaded from the last prefill:
                # rows 2i and 2i+1 continue prompt i, padding rows repeat prompt 0.
                prefill = recorded["prefill"]
                history = [list(prefill[r // 2] if r // 2 < len(prefill) else prefill[0]) for r in range(ids.shape[0])]
            if history is None:
                history = [[] for _ in range(ids.shape[0])]
            elif len(history) != ids.shape[0]:
                repeats = ids.shape[0] // len(history)
                history = [list(row) for row in history for _ in range(repeats)]
            out = original_forward(*args, **kwargs)
            logits = out.logits.float().clone()
            kept = logits.shape[1]
            width = ids.shape[1]
            rows = ids.tolist()
            for r, row in enumerate(rows):
                for j in range(width - kept, width):
                    prefix = self._answer_prefix(history[r] + row[: j + 1])
                    scripted = None if prefix is None else self.next_token_logprobs(prefix)
                    if scripted is not None:
                        logits[r, j - (width - kept)] = self._row(scripted, logits.device)
            out.logits = logits
            new_cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            if new_cache is not None:
                new_cache._scripted_rows = [h + row for h, row in zip(history, rows)]
                if width > 1:
                    recorded["prefill"] = new_cache._scripted_rows
            return out

        embed.forward = embed_forward
        self.model.forward = forward
        self._restore = (embed, original_embed, original_forward)

    def remove(self) -> None:
        embed, original_embed, original_forward = self._restore
        embed.forward = original_embed
        self.model.forward = original_forward

    def _answer_prefix(self, tokens: list[int]) -> tuple[int, ...] | None:
        n = len(self.opening)
        for start in range(len(tokens) - n, -1, -1):
            if tuple(tokens[start:start + n]) == self.opening:
                return tuple(tokens[start + n:])
        return None

    def _row(self, scripted: dict[int, float], device) -> torch.Tensor:
        rest = 1.0 - sum(math.exp(v) for v in scripted.values())
        row = torch.full((self.vocab,), math.log(max(rest, 1e-12) / (self.vocab - len(scripted))),
                         dtype=torch.float32, device=device)
        for token, value in scripted.items():
            row[token] = value
        return row


@contextlib.contextmanager
def scripted_router_calls(answers: Mapping[str, float]):
    """While open, the specialty model's shared base answers the router from ``answers`` (its adapters' calls do not).

    :class:`~onevlm.specialty.shared_base.SharedBaseRouterBackend` is the router's VLM when one model
    plays both roles; the script is installed around each of its router calls and removed after, so
    the specialty tasks keep the model's own answers.
    """
    from onevlm.specialty.shared_base import SharedBaseRouterBackend

    original = SharedBaseRouterBackend.answer

    def answer(self, items, requests):
        script = ScriptedAnswers(self.inner.loaded, answers)
        try:
            return original(self, items, requests)
        finally:
            script.remove()

    SharedBaseRouterBackend.answer = answer
    try:
        yield
    finally:
        SharedBaseRouterBackend.answer = original
