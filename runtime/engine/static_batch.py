"""A static-cache batch: the KV cache preallocated for (batch, context), prefill kept separate, and a
per-token decode step whose tensors never change shape, so it can be captured in a CUDA graph
(torch.compile "reduce-overhead") on GPUs. On CPU it runs eagerly: the same arithmetic, no graphs.

Same interface as RunningBatch, with one difference: a static batch runs to its end; rows join only
when it is empty (finished rows stay in place, masked, until then).
"""
from __future__ import annotations

import torch
from transformers import StaticCache


class StaticBatch:
    joins_while_running = False

    def __init__(self, model, pad_id: int = 0, max_len: int = 2048, compile_decode: bool | None = None):
        self.model, self.pad_id, self.max_len = model, pad_id, max_len
        device = next(model.parameters()).device
        self.device = device
        if compile_decode is None:
            compile_decode = device.type == "cuda"
        # "reduce-overhead" = CUDA graphs: the decode step's kernels launch as one graph per shape.
        self._decode = (torch.compile(self._forward_decode, mode="reduce-overhead", fullgraph=False)
                        if compile_decode else self._forward_decode)
        self._reset()

    def _reset(self) -> None:
        self.rows, self.active = [], []
        self.cache = self.mask = self.positions = self.length = None
        self._all_logits = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def logits(self) -> torch.Tensor:
        return self._all_logits[self.active]

    def join(self, rows) -> None:
        assert not self.rows, "a static batch takes new rows only when empty"
        longest = max(len(r.input_ids) for r in rows)
        if longest + max(r.max_tokens for r in rows) > self.max_len:
            raise ValueError(f"prompt + max_tokens exceeds the static cache ({self.max_len} tokens)")
        n = len(rows)
        ids = torch.full((n, longest), self.pad_id, dtype=torch.long, device=self.device)
        self.mask = torch.zeros((n, self.max_len), dtype=torch.long, device=self.device)
        for i, row in enumerate(rows):
            ids[i, longest - len(row.input_ids):] = torch.tensor(row.input_ids, device=self.device)
            self.mask[i, longest - len(row.input_ids):longest] = 1
        positions = (self.mask[:, :longest].cumsum(-1) - 1).clamp(min=0)
        self.cache = StaticCache(config=self.model.config, max_cache_len=self.max_len)
        out = self.model(input_ids=ids, attention_mask=self.mask[:, :longest], position_ids=positions,
                         cache=self.cache, use_cache=True, logits_to_keep=1)
        self._all_logits = out.logits[:, -1, :]
        self.positions = positions[:, -1:]
        self.length = longest
        self.rows, self.active = list(rows), list(range(n))

    def keep(self, indices: list[int]) -> None:
        """Rows that finished stay in the batch (fixed shapes); they are only hidden from sampling."""
        self.active = [self.active[i] for i in indices]
        self.rows = [self.rows[i] for i in indices]
        if not self.rows:
            self._reset()

    def _forward_decode(self, tokens, mask, positions):
        return self.model(input_ids=tokens, attention_mask=mask, position_ids=positions, cache=self.cache,
                          use_cache=True).logits[:, -1, :]

    def step(self, tokens: list[int]) -> None:
        n = self.mask.shape[0]
        full = torch.full((n, 1), self.pad_id, dtype=torch.long, device=self.device)
        full[self.active, 0] = torch.tensor(tokens, device=self.device)
        self.mask[:, self.length] = 1
        self.length += 1
        self.positions = self.positions + 1
        self._all_logits = self._decode(full, self.mask, self.positions)
