"""Top-2 answer decoding for one router stage, in two engines that must agree.

For each prompt the paper needs the first-token distribution, its top-2 tokens, and the greedy
continuation of each. Both engines compute exactly that:

``NaiveEngine``
    The reference: one forward pass for the first-token distribution, then one ``generate``
    call per branch, the image re-encoded by every call, one input at a time.
``FastEngine``
    Each image is encoded once (the caller passes features, reused for stages 1 and 2); all
    prompts of a batch are prefilled together (left padding, explicit positions); the prompt
    cache is repeated for the two branches and both branches of every input decode together
    as one batch.

With greedy decoding both give the same answers, and probabilities equal within float
tolerance (tests assert it on synthetic models). ``score_options`` scores a fixed answer set by
full-sequence likelihood from one shared prefill (the ``--answer-mode options`` variant).
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass(frozen=True)
class PromptTokens:
    """A tokenised prompt: ids, and which positions hold image tokens."""

    input_ids: tuple[int, ...]
    image_mask: tuple[bool, ...]

    @property
    def has_image(self) -> bool:
        return any(self.image_mask)


@dataclass(frozen=True)
class Branch:
    """One decoded answer: its first token's probability and the whole answer's log-probability."""

    token_ids: tuple[int, ...]
    first_token_p: float
    sequence_logprob: float


@dataclass(frozen=True)
class ScoredOption:
    """An admissible answer with its normalised probability and raw sequence log-likelihood."""

    index: int
    p: float
    sequence_logprob: float


@dataclass
class EngineStats:
    """Where the fast engine's time goes (for benchmarks): prefill versus decode steps."""

    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    prompts: int = 0
    calls: int = field(default=0)

    def as_dict(self) -> dict[str, float]:
        per_step = self.decode_seconds / self.decode_steps if self.decode_steps else 0.0
        return {"prefill_seconds": self.prefill_seconds, "decode_seconds": self.decode_seconds,
                "decode_steps": self.decode_steps, "seconds_per_decode_step": per_step,
                "prompts": self.prompts, "calls": self.calls}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ModelAdapter:
    """The few model operations the engines use, independent of the transformers version.

    transformers 5.x renamed ``past_key_values`` to ``cache`` (forward argument and output);
    Gemma 3's ``get_image_features`` returns a tensor in some releases and an output object with
    ``pooler_output`` in others. Everything version-specific stays here.
    """

    def __init__(self, model, eos_token_ids: Sequence[int], pad_token_id: int, image_token_id: int | None) -> None:
        self.model = model
        self.eos_token_ids = tuple(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.image_token_id = image_token_id
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._embed = model.get_input_embeddings()
        self.vocab_size = self._embed.num_embeddings

    @property
    def device(self) -> torch.device:
        return self._embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        # The embedding dtype is the compute dtype even when linear layers are 4-bit.
        return self._embed.weight.dtype

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected image features ``(n_images, tokens_per_image, hidden)``."""
        out = self.model.get_image_features(pixel_values.to(self.device, self.dtype))
        return getattr(out, "pooler_output", out)

    def embed(self, input_ids: torch.Tensor, image_mask: torch.Tensor | None, features: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the image placeholders replaced by ``features`` (in order)."""
        ids = input_ids
        if self.image_token_id is not None and self.image_token_id >= self.vocab_size:
            ids = ids.masked_fill(ids == self.image_token_id, 0)  # OOV placeholder: embed as 0
        embeds = self._embed(ids)
        if features is not None and image_mask is not None and image_mask.any():
            flat = features.reshape(-1, features.shape[-1]).to(embeds.dtype)
            if int(image_mask.sum()) != flat.shape[0]:
                raise ValueError(f"{int(image_mask.sum())} image tokens but {flat.shape[0]} image feature vectors")
            embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), flat)
        return embeds

    def forward(self, cache=None, **kwargs):
        """One forward pass; returns ``(logits, cache)``."""
        if cache is not None:
            kwargs[self._cache_arg] = cache
        out = self.model(use_cache=True, return_dict=True, **kwargs)
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = getattr(out, "past_key_values", None)
        return out.logits, new_cache

    def generate(self, **kwargs):
        return self.model.generate(**kwargs)

    @staticmethod
    def cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's ``(keys, values)`` of a dynamic cache, ``(batch, kv_heads, length, head_dim)``."""
        layers = getattr(cache, "layers", None)
        if layers is not None:  # transformers >= 4.56
            return [(layer.keys, layer.values) for layer in layers]
        return list(zip(cache.key_cache, cache.value_cache))


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities over the last dimension (the vocabulary), in float32: ``logits - logsumexp(logits)``.

    Not ``torch.log_softmax``: on the CPU its float32 sum of the exponentials drops much of the tail
    of a 262,208-entry vocabulary (Gemma 3's): a token of probability 0.99 whose remaining 0.01 is
    spread thin reads as 0.9912, and every decoded answer's sequence probability comes out high by
    up to about 1e-3 per token. ``torch.logsumexp`` sums within float32 rounding.
    """
    logits = logits.float()
    return logits - torch.logsumexp(logits, dim=-1, keepdim=True)


def _left_pad(prompts: Sequence[PromptTokens], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    width = max(len(p.input_ids) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    image = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        n = len(prompt.input_ids)
        ids[row, width - n:] = torch.tensor(prompt.input_ids)
        mask[row, width - n:] = 1
        image[row, width - n:] = torch.tensor(prompt.image_mask)
    return ids.to(device), mask.to(device), image.to(device)


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


class FastEngine:
    """Batched prefill, image features reused, both branches decoded together from one cache."""

    name = "fast"

    def __init__(self, adapter: ModelAdapter) -> None:
        self.adapter = adapter
        self.stats = EngineStats()

    @torch.inference_mode()
    def top2(
        self,
        prompts: Sequence[PromptTokens],
        features: Sequence[torch.Tensor | None],
        max_new_tokens: int,
    ) -> list[list[Branch]]:
        """Top-2 first tokens of each prompt and the greedy answer from each.

        ``features[i]`` are the image features of prompt ``i`` (``None`` for text-only prompts).
        """
        a = self.adapter
        started = time.perf_counter()
        ids, mask, image_mask = _left_pad(prompts, a.pad_token_id, a.device)
        feats = [f for f in features if f is not None]
        all_features = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats]) if feats else None
        embeds = a.embed(ids, image_mask, all_features)
        positions = _positions(mask)
        extra = {"token_type_ids": image_mask.long()} if image_mask.any() else {}
        logits, cache = a.forward(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                  logits_to_keep=1, **extra)
        logprobs = log_probs(logits[:, -1])
        top = torch.topk(logprobs, 2, dim=-1)  # (B, 2)

        batch = len(prompts)
        _sync(a.device)
        prefilled = time.perf_counter()
        tokens = top.indices.reshape(-1)  # (2B,): item 0 first, item 0 second, item 1 first…
        generated, scores, steps = self._decode(cache, mask, positions, tokens, top.values.reshape(-1), max_new_tokens)
        _sync(a.device)
        finished = time.perf_counter()
        self.stats.prefill_seconds += prefilled - started
        self.stats.decode_seconds += finished - prefilled
        self.stats.decode_steps += steps
        self.stats.prompts += batch
        self.stats.calls += 1
        first_p = top.values.exp()
        results = []
        for item in range(batch):
            results.append([
                Branch(tuple(generated[2 * item + k]), float(first_p[item, k]), float(scores[2 * item + k]))
                for k in (0, 1)
            ])
        return results

    def _decode(self, cache, mask: torch.Tensor, positions: torch.Tensor, tokens: torch.Tensor,
                scores: torch.Tensor, max_new_tokens: int) -> tuple[list[list[int]], torch.Tensor, int]:
        """Greedy continuation of every branch: ``(tokens per row, summed log-probs, steps)``.

        ``cache`` holds the prompts (one row each); rows ``2i`` and ``2i + 1`` continue prompt
        ``i`` from ``tokens`` (its top-2 first tokens), whose log-probabilities are ``scores``.
        """
        a = self.adapter
        cache.batch_repeat_interleave(2)
        scores = scores.clone()
        mask = mask.repeat_interleave(2, dim=0)
        next_pos = positions[:, -1:].repeat_interleave(2, dim=0) + 1
        generated = [[int(t)] for t in tokens]
        done = torch.tensor([int(t) in a.eos_token_ids for t in tokens], device=a.device)
        current = tokens
        steps = 0
        for _ in range(max_new_tokens - 1):
            if bool(done.all()):
                break
            steps += 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits, cache = a.forward(input_ids=current.unsqueeze(-1), attention_mask=mask, position_ids=next_pos,
                                      cache=cache)
            step = log_probs(logits[:, -1])
            nxt = step.argmax(dim=-1)
            live = ~done
            scores = scores + torch.where(live, step.gather(1, nxt.unsqueeze(-1)).squeeze(-1), torch.zeros_like(scores))
            for row in torch.nonzero(live).flatten().tolist():
                generated[row].append(int(nxt[row]))
            done = done | torch.tensor([int(t) in a.eos_token_ids for t in nxt], device=a.device)
            current = torch.where(live, nxt, torch.full_like(nxt, a.pad_token_id))
            next_pos = next_pos + 1
        return generated, scores, steps

    @torch.inference_mode()
    def score_options(self, prompt: PromptTokens, features: torch.Tensor | None, options: Sequence[Sequence[int]]) -> list[ScoredOption]:
        """Score every option (token ids, end token included) by its full-sequence log-likelihood.

        One prefill of the prompt; its cache is repeated once per option and all options are
        scored in one forward pass (right padding). Probabilities are normalised over the options.
        """
        a = self.adapter
        ids, mask, image_mask = _left_pad([prompt], a.pad_token_id, a.device)
        embeds = a.embed(ids, image_mask, features)
        positions = _positions(mask)
        extra = {"token_type_ids": image_mask.long()} if image_mask.any() else {}
        logits, cache = a.forward(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                  logits_to_keep=1, **extra)
        first = log_probs(logits[:, -1])[0]
        count = len(options)
        width = max(len(o) for o in options)
        cand = torch.full((count, width), a.pad_token_id, dtype=torch.long, device=a.device)
        cand_mask = torch.zeros((count, width), dtype=torch.long, device=a.device)
        for row, option in enumerate(options):
            cand[row, : len(option)] = torch.tensor(option, device=a.device)
            cand_mask[row, : len(option)] = 1
        totals = first[cand[:, 0]].clone()
        if width > 1:
            cache.batch_repeat_interleave(count)
            full_mask = torch.cat([mask.repeat(count, 1), cand_mask[:, :-1]], dim=1)
            pos = positions[:, -1:] + 1 + torch.arange(width - 1, device=a.device).unsqueeze(0)
            logits, _ = a.forward(input_ids=cand[:, :-1], attention_mask=full_mask, position_ids=pos.repeat(count, 1),
                                  cache=cache)
            step = log_probs(logits)  # (K, W-1, V): predicts tokens 1..W-1
            token_lp = step.gather(2, cand[:, 1:].unsqueeze(-1)).squeeze(-1)
            totals = totals + (token_lp * cand_mask[:, 1:]).sum(dim=1)
        probs = torch.softmax(totals, dim=0)
        return [ScoredOption(i, float(probs[i]), float(totals[i])) for i in range(count)]


class NaiveEngine:
    """The reference: a forward pass for the first token, then one ``generate`` per branch.

    Every call re-encodes the image from ``pixel_values``; inputs are processed one at a time.
    """

    name = "naive"

    def __init__(self, adapter: ModelAdapter) -> None:
        self.adapter = adapter

    @torch.inference_mode()
    def top2(
        self,
        prompts: Sequence[PromptTokens],
        pixel_values: Sequence[torch.Tensor | None],
        max_new_tokens: int,
    ) -> list[list[Branch]]:
        return [self._one(p, px, max_new_tokens) for p, px in zip(prompts, pixel_values)]

    @torch.inference_mode()
    def score_options(self, prompt: PromptTokens, pixel_values: torch.Tensor | None,
                      options: Sequence[Sequence[int]]) -> list[ScoredOption]:
        """The reference scorer: one full forward pass of prompt + option per option, no cache.

        Each option's log-likelihood is the sum of its tokens' log-probabilities read from the
        logits of that option's own pass; probabilities are normalised over the options.
        """
        a = self.adapter
        totals = []
        for option in options:
            ids = torch.tensor([list(prompt.input_ids) + list(option)], device=a.device)
            types = torch.tensor([list(prompt.image_mask) + [False] * len(option)], device=a.device).long()
            vision = {}
            if pixel_values is not None:
                vision = {"pixel_values": pixel_values.to(a.device, a.dtype), "token_type_ids": types}
            # Only the positions that predict the option's tokens: the whole prompt's logits would be
            # prompt length x vocabulary floats per option (about 400 MB on Gemma 3's 262,208 rows).
            logits, _ = a.forward(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=len(option) + 1,
                                  **vision)
            logprobs = log_probs(logits[0])  # row j predicts the option's token j (the last row: past its end)
            totals.append(sum(float(logprobs[j, token]) for j, token in enumerate(option)))
        probs = torch.softmax(torch.tensor(totals, dtype=torch.float64), dim=0)
        return [ScoredOption(i, float(probs[i]), totals[i]) for i in range(len(options))]

    def _one(self, prompt: PromptTokens, pixel_values: torch.Tensor | None, max_new_tokens: int) -> list[Branch]:
        a = self.adapter
        ids = torch.tensor([prompt.input_ids], device=a.device)
        types = torch.tensor([prompt.image_mask], device=a.device).long()
        vision = {}
        if pixel_values is not None:
            vision = {"pixel_values": pixel_values.to(a.device, a.dtype), "token_type_ids": types}
        logits, _ = a.forward(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1, **vision)
        logprobs = log_probs(logits[:, -1])[0]
        top = torch.topk(logprobs, 2)
        branches = []
        for k in range(2):
            first = int(top.indices[k])
            score = float(top.values[k])
            tokens = [first]
            if first not in a.eos_token_ids and max_new_tokens > 1:
                ext = torch.cat([ids, torch.tensor([[first]], device=a.device)], dim=1)
                kwargs = dict(vision)
                if pixel_values is not None:
                    # token_type_ids must cover the appended token, or the image mask is misaligned
                    kwargs["token_type_ids"] = torch.cat([types, torch.zeros_like(types[:, :1])], dim=1)
                out = a.generate(
                    input_ids=ext, attention_mask=torch.ones_like(ext), max_new_tokens=max_new_tokens - 1,
                    do_sample=False, eos_token_id=list(a.eos_token_ids), pad_token_id=a.pad_token_id,
                    output_logits=True, return_dict_in_generate=True, **kwargs,
                )
                new = out.sequences[0, ext.shape[1]:].tolist()
                for step_logits, token in zip(out.logits, new):
                    score += float(log_probs(step_logits[0])[token])
                    tokens.append(token)
                    if token in a.eos_token_ids:
                        break
            branches.append(Branch(tuple(tokens), float(math.exp(top.values[k])), score))
        return branches
