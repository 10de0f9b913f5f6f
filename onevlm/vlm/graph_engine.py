"""The ``graph`` engine: the fast engine's decode loop without per-step framework overhead.

On a GPU a Hugging Face decode step at batch 1–2 costs tens of milliseconds of Python and kernel
launches against a memory-bandwidth floor of about two. This engine keeps everything the fast
engine does (batched prefill, image features reused, both top-2 branches of every input decoded
together, early exit when every row has ended) and changes only the decode loop:

- **Static KV cache.** Keys and values live in preallocated tensors of a fixed shape
  ``(rows, kv_heads, length, head_dim)``; a decode step writes one slot, chosen by a device
  tensor, so every step has the same shapes and the same tensor addresses.
- **Buckets.** Rows (two per prompt) are padded up to a power of two and the cache length up to a
  multiple of :data:`LENGTH_BUCKET`, so a handful of shapes serve every batch and prompt length.
- **Captured step.** The step (model forward, log-softmax, argmax) is captured once per bucket
  and replayed, so a step is one graph launch:

  ``cuda-graph`` (the default on CUDA)
      the eager step recorded with ``torch.cuda.graph``: seconds to capture, no compiler;
  ``reduce-overhead``
      ``torch.compile`` (inductor kernels) recorded as CUDA graphs: faster kernels, minutes of
      compilation per bucket on a 4B model;
  ``default``
      ``torch.compile`` without CUDA graphs (runs on the CPU: the equivalence tests use it);
  ``none``
      the same static loop, eager (the CPU default: there is no launch overhead to remove).

  A capture or compilation that fails (an operation that cannot be recorded, e.g. in a quantised
  kernel; a compiler that cannot build) is logged as a warning and that bucket runs eagerly; ``fallbacks`` and ``capture_failures``
  count what did not run as asked.

The attention masks are passed to the model ready-made (4-D, one per layer type), so nothing in
the step depends on Python-side lengths. A prompt whose bucketed length exceeds the model's
sliding window (longer than any router prompt) is decoded by the fast engine's loop instead.

Tests assert the same answers and probabilities as :class:`~onevlm.vlm.engine.FastEngine` on the
CPU, eager and compiled.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from onevlm.vlm.engine import FastEngine, ModelAdapter, log_probs

logger = logging.getLogger(__name__)

LENGTH_BUCKET = 64
COMPILE_MODES = ("auto", "none", "default", "reduce-overhead", "cuda-graph")


def row_bucket(rows: int) -> int:
    """The decode batch a number of rows runs at: the next power of two (at least 2)."""
    if rows < 1:
        raise ValueError(f"rows must be positive, got {rows}")
    return max(2, 1 << (rows - 1).bit_length())


def length_bucket(length: int) -> int:
    """The cache length a sequence of ``length`` tokens runs at: the next multiple of 64."""
    return -(-length // LENGTH_BUCKET) * LENGTH_BUCKET


class StaticKVCache:
    """Preallocated keys and values of every layer; each update writes the slot ``self.slot``.

    Only ``update`` is called by the attention layers (masks and positions are given to the model
    ready-made), so this small class is the whole cache interface the step needs.
    """

    def __init__(self, shapes: list[tuple[torch.Size, torch.Size]], dtype: torch.dtype, device: torch.device) -> None:
        self.keys = [torch.zeros(k, dtype=dtype, device=device) for k, _ in shapes]
        self.values = [torch.zeros(v, dtype=dtype, device=device) for _, v in shapes]
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        for tensor in (*self.keys, *self.values, self.slot):
            # fixed addresses: a captured graph reads and writes these very tensors
            torch._dynamo.mark_static_address(tensor)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.keys[layer_idx].index_copy_(2, self.slot, key_states)
        self.values[layer_idx].index_copy_(2, self.slot, value_states)
        return self.keys[layer_idx], self.values[layer_idx]


@dataclass
class _Bucket:
    """Everything one (rows, length) shape needs: cache, masks, input buffers, the step."""

    rows: int
    length: int
    cache: StaticKVCache
    mask: torch.Tensor  # (rows, 1, 1, length) additive: 0 where a row may attend, -inf-ish elsewhere
    tokens: torch.Tensor  # (rows, 1)
    positions: torch.Tensor  # (rows, 1)
    step: Callable[[], tuple[torch.Tensor, torch.Tensor]]


class GraphEngine(FastEngine):
    """:class:`FastEngine` with a static-cache decode step, bucketed and captured once.

    Parameters
    ----------
    adapter:
        The model operations (:class:`~onevlm.vlm.engine.ModelAdapter`).
    compile_mode:
        ``auto`` (``cuda-graph`` on CUDA, ``none`` elsewhere), ``none`` (static loop, eager),
        ``cuda-graph`` (eager step recorded as a CUDA graph), ``default`` (``torch.compile``
        without CUDA graphs) or ``reduce-overhead`` (``torch.compile`` with CUDA graphs).
    """

    name = "graph"

    def __init__(self, adapter: ModelAdapter, compile_mode: str = "auto") -> None:
        super().__init__(adapter)
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {compile_mode!r}")
        if compile_mode == "auto":
            compile_mode = "cuda-graph" if adapter.device.type == "cuda" else "none"
        if compile_mode in ("cuda-graph", "reduce-overhead") and adapter.device.type != "cuda":
            raise ValueError(f"compile_mode {compile_mode!r} needs a CUDA device, the model is on {adapter.device}")
        self.compile_mode = compile_mode
        text = adapter.model.config.get_text_config()
        layer_types = getattr(text, "layer_types", None) or []
        self.layer_types: list[str] = list(layer_types)
        window = getattr(text, "sliding_window", None)
        self.max_length = window if window and "sliding_attention" in self.layer_types else None
        self._buckets: dict[tuple[int, int], _Bucket] = {}
        self.fallbacks = 0
        self.capture_failures = 0
        if compile_mode in ("default", "reduce-overhead"):
            # one compiled step per bucket: allow as many recompilations as there are buckets
            config = torch._dynamo.config
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(config, name):
                    setattr(config, name, max(getattr(config, name), 64))

    def _decode(self, cache, mask, positions, tokens, scores, max_new_tokens):
        a = self.adapter
        prompts, width = mask.shape
        rows = 2 * prompts
        length = length_bucket(width + max_new_tokens)
        layers = a.cache_tensors(cache)
        if (self.max_length is not None and length > self.max_length) or any(k.shape[2] != width for k, _ in layers):
            self.fallbacks += 1
            logger.info("graph engine: %d prompt tokens + %d new exceed the static window; fast loop used",
                        width, max_new_tokens)
            return super()._decode(cache, mask, positions, tokens, scores, max_new_tokens)
        bucket = self._bucket(row_bucket(rows), length, layers)

        # Rows 2i and 2i+1 continue prompt i; padding rows repeat prompt 0 (finite, ignored).
        source = torch.arange(prompts, device=a.device).repeat_interleave(2)
        source = torch.cat([source, source.new_zeros(bucket.rows - rows)])
        for layer, (k, v) in enumerate(layers):
            bucket.cache.keys[layer][:, :, :width].copy_(k.index_select(0, source))
            bucket.cache.values[layer][:, :, :width].copy_(v.index_select(0, source))
        blocked = torch.finfo(bucket.mask.dtype).min
        bucket.mask.fill_(blocked)
        bucket.mask[:, 0, 0, :width].masked_fill_(mask.index_select(0, source).bool(), 0.0)

        eos = torch.tensor(a.eos_token_ids, device=a.device)
        current = torch.cat([tokens, tokens.new_full((bucket.rows - rows,), a.pad_token_id)])
        position = positions[:, -1:].index_select(0, source) + 1
        done = torch.isin(current, eos)
        done[rows:] = True
        scores = torch.cat([scores, scores.new_zeros(bucket.rows - rows)])
        steps_out = torch.full((bucket.rows, max_new_tokens), -1, dtype=torch.long, device=a.device)
        steps_out[:, 0] = current
        steps = 0
        for t in range(max_new_tokens - 1):
            if bool(done.all()):
                break
            steps += 1
            slot = width + t
            bucket.cache.slot.fill_(slot)
            bucket.mask[:, 0, 0, slot] = 0.0  # each row attends to the token it writes now
            bucket.tokens.copy_(current.unsqueeze(-1))
            bucket.positions.copy_(position)
            if self.compile_mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()
            nxt, step_logprob = bucket.step()
            nxt, step_logprob = nxt.clone(), step_logprob.clone()
            live = ~done
            scores = scores + torch.where(live, step_logprob, torch.zeros_like(scores))
            steps_out[:, t + 1] = torch.where(live, nxt, torch.full_like(nxt, -1))
            done = done | torch.isin(nxt, eos)
            current = torch.where(live, nxt, torch.full_like(nxt, a.pad_token_id))
            position = position + 1
        generated = [[t for t in row if t >= 0] for row in steps_out[:rows].tolist()]
        return generated, scores[:rows], steps

    def _bucket(self, rows: int, length: int, layers) -> _Bucket:
        key = (rows, length)
        if key in self._buckets:
            return self._buckets[key]
        a = self.adapter
        shapes = [(torch.Size((rows, k.shape[1], length, k.shape[3])), torch.Size((rows, v.shape[1], length, v.shape[3])))
                  for k, v in layers]
        cache = StaticKVCache(shapes, layers[0][0].dtype, a.device)
        mask = torch.zeros((rows, 1, 1, length), dtype=a.dtype, device=a.device)
        tokens = torch.zeros((rows, 1), dtype=torch.long, device=a.device)
        positions = torch.zeros((rows, 1), dtype=torch.long, device=a.device)
        for tensor in (mask, tokens, positions):
            torch._dynamo.mark_static_address(tensor)
        masks = {layer_type: mask for layer_type in (set(self.layer_types) or {"full_attention"})}

        def step() -> tuple[torch.Tensor, torch.Tensor]:
            logits, _ = a.forward(input_ids=tokens, attention_mask=masks, position_ids=positions, cache=cache,
                                  logits_to_keep=1)
            logprobs = log_probs(logits[:, -1])
            nxt = logprobs.argmax(dim=-1)
            return nxt, logprobs.gather(1, nxt.unsqueeze(-1)).squeeze(-1)

        if self.compile_mode in ("default", "reduce-overhead"):
            step = self._compiled(step, rows, length)
        elif self.compile_mode == "cuda-graph":
            step = self._capture(step, rows, length)
        bucket = _Bucket(rows, length, cache, mask, tokens, positions, step)
        self._buckets[key] = bucket
        logger.info("graph engine: new bucket rows=%d length=%d (compile %s)", rows, length, self.compile_mode)
        return bucket

    def _compiled(self, step: Callable[[], tuple[torch.Tensor, torch.Tensor]], rows: int, length: int):
        """``torch.compile`` of ``step``; a compiler failure (on its first call) runs this bucket eagerly.

        Only the compiler's own errors are caught: a failing step (out of memory, bad input) still
        fails the call.
        """
        compiled = torch.compile(step, mode=self.compile_mode, dynamic=False)
        current = [compiled]

        def run() -> tuple[torch.Tensor, torch.Tensor]:
            try:
                return current[0]()
            except torch._dynamo.exc.TorchDynamoException as exc:
                if current[0] is step:
                    raise
                self.capture_failures += 1
                logger.warning("graph engine: torch.compile failed for rows=%d length=%d (%s); eager steps used",
                               rows, length, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                current[0] = step
                return step()

        return run

    def _capture(self, step: Callable[[], tuple[torch.Tensor, torch.Tensor]], rows: int, length: int):
        """Record ``step`` as a CUDA graph; its replay returns the same output tensors, refilled.

        Runs before the bucket's cache is loaded: the warm-up and recording steps write one slot
        of an empty cache, which the decode loop overwrites before any row attends to it.
        """
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # allocator and library workspaces settle before recording
                    step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs = step()
        except Exception as exc:  # noqa: BLE001 - any capture failure: run this bucket eagerly
            self.capture_failures += 1
            logger.warning("graph engine: CUDA graph capture failed for rows=%d length=%d (%s); eager steps used",
                           rows, length, exc)
            return step

        def replay() -> tuple[torch.Tensor, torch.Tensor]:
            graph.replay()
            return outputs

        return replay
