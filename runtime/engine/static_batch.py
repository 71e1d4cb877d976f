"""A static-cache batch: the KV cache preallocated for (batch, context), prefill kept separate, and a
per-token decode step whose tensors never change shape, so it can be captured in a CUDA graph
(torch.compile "reduce-overhead") on GPUs. On CPU it runs eagerly: the same arithmetic, no graphs.

Same interface as RunningBatch, with one difference: a static batch runs to its end; rows join only
when it is empty (finished rows stay in place, masked, until then).

Shapes are bucketed: a batch of n rows runs at the next power of two (filler rows hold one pad token
and are never sampled), and each bucket keeps its cache object for good. Compiled graphs are guarded
on the cache they were traced with, so a fresh cache per batch would recompile (tens of seconds on an
8B model) every time; a kept one is reset (zeroed in place) and its graph replays.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import StaticCache

from runtime.engine.request import Row


def bucket(n: int) -> int:
    """The batch width a static batch of n rows runs at: the next power of two."""
    return 1 << max(0, n - 1).bit_length()


class StaticBatch:
    joins_while_running = False

    def __init__(self, model, pad_id: int = 0, max_len: int = 2048, compile_decode: bool | None = None):
        self.model, self.pad_id, self.max_len = model, pad_id, max_len
        self.device = model.device
        if compile_decode is None:
            compile_decode = self.device.type == "cuda"
        self.compiled = compile_decode
        # With graphs on a GPU the host's per-step work runs while the next step computes (run_engine's
        # overlap): the step takes its tokens straight from the device.
        self.overlaps_host = compile_decode
        if compile_decode and getattr(model.config, "_attn_implementation", None) == "sdpa":
            from runtime.engine.attention import use_grouped_decode_attention
            use_grouped_decode_attention(model)   # compiled SDPA would repeat every KV head per step
        # "reduce-overhead" = CUDA graphs: the decode step's kernels launch as one graph per bucket.
        # dynamic=False: one specialised graph per bucket rather than a shape-generic one.
        self._decode = (torch.compile(self._forward_decode, mode="reduce-overhead", dynamic=False)
                        if compile_decode else self._forward_decode)
        self._caches: dict[int, StaticCache] = {}
        self.cache = None
        self._reset()

    def _reset(self) -> None:
        self.rows, self.active = [], []
        self.mask = self.positions = self.length = None
        self._all_logits = None
        self._active_index = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def logits(self) -> torch.Tensor:
        if self._all_logits is None:
            raise RuntimeError("the batch has no rows")
        return self._all_logits[self.active]

    def fits(self, row: Row) -> bool:
        return len(row.input_ids) + row.max_tokens <= self.max_len

    def fits_together(self, rows: list[Row]) -> tuple[list[Row], list[Row]]:
        """(rows that share one batch, rows that wait for the next). Prompts are left-padded to the
        longest, so a batch needs the longest prompt plus the largest max_tokens; two rows that each
        fit alone may not fit together. Taken in arrival order; the first row always fits alone."""
        now, later, longest, most = [], [], 0, 0
        for row in rows:
            if max(longest, len(row.input_ids)) + max(most, row.max_tokens) <= self.max_len:
                now.append(row)
                longest, most = max(longest, len(row.input_ids)), max(most, row.max_tokens)
            else:
                later.append(row)
        return now, later

    def _cache_for(self, width: int) -> StaticCache:
        cache = self._caches.get(width)
        if cache is None:
            cache = self._caches[width] = StaticCache(config=self.model.config, max_cache_len=self.max_len)
        else:
            cache.reset()
        return cache

    def join(self, rows: list[Row]) -> None:
        assert not self.rows, "a static batch takes new rows only when empty"
        longest = max(len(r.input_ids) for r in rows)
        if longest + max(r.max_tokens for r in rows) > self.max_len:
            raise ValueError(f"prompt + max_tokens exceeds the static cache ({self.max_len} tokens)")
        width = bucket(len(rows))
        prompts = [r.input_ids for r in rows] + [[self.pad_id]] * (width - len(rows))
        ids = torch.full((width, longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((width, self.max_len), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, longest - len(prompt):] = torch.tensor(prompt)
            mask[i, longest - len(prompt):longest] = 1
        ids, self.mask = ids.to(self.device), mask.to(self.device)
        positions = (self.mask[:, :longest].cumsum(-1) - 1).clamp(min=0)
        self.cache = self._cache_for(width)
        out = self.model(input_ids=ids, attention_mask=self.mask[:, :longest], position_ids=positions,
                         cache=self.cache, use_cache=True, logits_to_keep=1)
        self._all_logits = out.logits[:, -1, :]
        self.positions = positions[:, -1:]
        self.length = longest
        self.rows, self.active = list(rows), list(range(len(rows)))

    def keep(self, indices: list[int]) -> None:
        """Rows that finished stay in the batch (fixed shapes); they are only hidden from sampling."""
        if len(indices) != len(self.rows):
            self._active_index = None
        self.active = [self.active[i] for i in indices]
        self.rows = [self.rows[i] for i in indices]
        if not self.rows:
            self._reset()

    def _forward_decode(self, tokens, mask, positions, cache):
        return self.model(input_ids=tokens, attention_mask=mask, position_ids=positions, cache=cache,
                          use_cache=True).logits[:, -1, :]

    def step(self, tokens: list[int]) -> None:
        """The next step, the active rows fed `tokens` (host ids)."""
        if self.mask is None:
            raise RuntimeError("the batch has no rows")
        full = torch.full((self.mask.shape[0], 1), self.pad_id, dtype=torch.long)
        full[self.active, 0] = torch.tensor(tokens)
        self._advance(full.to(self.device))

    def step_ahead(self, device_tokens: torch.Tensor) -> None:
        """The next step, the active rows fed the ids chosen on the device (one per active row), queued
        before the host has read them."""
        if self.mask is None:
            raise RuntimeError("the batch has no rows")
        if self._active_index is None:   # kept until a row leaves
            self._active_index = torch.tensor(self.active, device=self.device)
        full = torch.full((self.mask.shape[0], 1), self.pad_id, dtype=torch.long, device=self.device)
        full[self._active_index, 0] = device_tokens
        self._advance(full)

    def _advance(self, full: torch.Tensor) -> None:
        mask, positions, length = self.mask, self.positions, self.length   # set by join, None while empty
        if mask is None or positions is None or length is None:
            raise RuntimeError("the batch has no rows")
        mask[:, length] = 1
        self.length = length + 1
        self.positions = positions + 1
        if self.compiled:
            # A new step: the previous step's outputs (in the graph's memory pool) may be overwritten.
            torch.compiler.cudagraph_mark_step_begin()
        self._all_logits = self._decode(full, self.mask, self.positions, self.cache)
