"""The lockstep decode loop every rank runs on the same batch.

Left-padded prefill, then one token per step with a KV cache, like `generate`; tokens are chosen on
the driver rank only and shared with the others each step, so sampling state (seeds, stop decisions,
cancellations) lives in one place and every rank feeds the model identical inputs, which tensor
parallelism requires.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from runtime.engine.sampling import choose, make_generator

# Why a row stopped (the codes travel between ranks as integers).
RUNNING, STOP, LENGTH, CANCELLED = 0, 1, 2, 3
FINISH_REASONS = {STOP: "stop", LENGTH: "length", CANCELLED: "stop"}


@dataclass
class Row:
    """One sequence of a batch; the same on every rank."""
    id: str
    input_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)


# share(payload) broadcasts the driver's payload in place to every rank (identity when alone).
Share = Callable[[torch.Tensor], None]
# on_step(events) is called on the driver after each step with (row index, new token or None, state)
# for every row that produced or stopped this step; it returns the ids cancelled meanwhile.
OnStep = Callable[[list[tuple[int, int | None, int]]], set[str]]


def _left_pad(rows: list[Row], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, longest - len(row.input_ids):] = torch.tensor(row.input_ids)
        mask[i, longest - len(row.input_ids):] = 1
    return ids, mask


@torch.inference_mode()
def decode_batch(model, rows: list[Row], *, is_driver: bool, share: Share,
                 on_step: OnStep | None = None, pad_id: int = 0) -> list[list[int]]:
    """Generate for every row until each has stopped; returns the generated ids (driver's view)."""
    n = len(rows)
    ids, mask = _left_pad(rows, pad_id)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    generators = [make_generator(r.seed) for r in rows] if is_driver else []
    states = [RUNNING] * n
    produced: list[list[int]] = [[] for _ in rows]
    cancelled: set[str] = set()

    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1, :]
    while True:
        payload = torch.zeros(2 * n, dtype=torch.long)  # next token per row, then its state
        events = []
        if is_driver:
            for i, row in enumerate(rows):
                if states[i] != RUNNING:
                    payload[i], payload[n + i] = pad_id, states[i]
                    continue
                if row.id in cancelled:  # decided on the driver, learnt by all through the payload
                    states[i] = CANCELLED
                    payload[i], payload[n + i] = pad_id, CANCELLED
                    events.append((i, None, CANCELLED))
                    continue
                token = choose(logits[i], row.temperature, row.top_p, generators[i])
                produced[i].append(token)
                if token in row.stop_token_ids:
                    states[i] = STOP
                elif len(produced[i]) >= row.max_tokens:
                    states[i] = LENGTH
                payload[i], payload[n + i] = token, states[i]
                events.append((i, token, states[i]))
        share(payload)
        tokens, states = payload[:n].tolist(), payload[n:].tolist()
        if is_driver and on_step is not None:
            cancelled = on_step(events)
        if all(s != RUNNING for s in states):
            return produced
        mask = torch.cat([mask, torch.ones((n, 1), dtype=torch.long)], dim=-1)
        positions = positions[:, -1:] + 1
        logits = model(input_ids=torch.tensor(tokens).unsqueeze(-1), attention_mask=mask,
                       position_ids=positions, cache=cache, use_cache=True).logits[:, -1, :]
