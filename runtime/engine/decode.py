"""The lockstep decode loop every rank runs: continuous batching over a KV cache.

A running batch decodes one token per step. Between steps, rows that finished leave it and waiting
requests join it: they are prefilled on their own, then merged into the batch's cache (left-padded to
a common length, with the attention mask saying which positions are real), so nobody waits for a
whole batch to end. Tokens are chosen on the driver rank only and shared with the others each step:
sampling state (seeds, stop decisions, cancellations) lives in one place, and every rank feeds the
model identical inputs, which tensor parallelism requires.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from runtime.engine.request import Row
from runtime.engine.sampling import logprobs as row_logprobs
from runtime.engine.sampling import make_generator, sample

# Why a row stopped (the codes travel between ranks as integers).
RUNNING, STOP, LENGTH, CANCELLED = 0, 1, 2, 3
FINISH_REASONS = {STOP: "stop", LENGTH: "length", CANCELLED: "stop"}
# The flag after the tokens in each step's shared payload.
NO_JOINS, JOINS, SHUTDOWN = 0, 1, 2


# (row id, new token or None, state, (logprob, [(id, logprob)...]) or None)
Event = tuple[int, "int | None", int, "tuple[float, list[tuple[int, float]]] | None"]
# Driver side: take(limit, block) -> rows to join ([] for none, None to shut down).
Take = Callable[[int, bool], "list[Row] | None"]
# Driver side: on_step(events) -> ids cancelled meanwhile.
OnStep = Callable[[list[Event]], set[str]]
# All ranks: share(tensor) broadcasts the driver's tensor in place; share_object(obj) returns the
# driver's object. Identity functions when there is one rank.
Share = Callable[[torch.Tensor], None]
ShareObject = Callable[[object], object]


def _pad_left(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [missing, 0]
    return F.pad(t, pad)


class RunningBatch:
    """Rows being decoded together, their KV cache, attention mask, positions and last logits."""
    joins_while_running = True

    def __init__(self, model, pad_id: int = 0):
        self.model, self.pad_id = model, pad_id
        self.device = model.device
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.mask = self.positions = self.logits = None

    def __len__(self) -> int:
        return len(self.rows)

    def _prefill(self, rows: list[Row]):
        longest = max(len(r.input_ids) for r in rows)
        ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, longest - len(row.input_ids):] = torch.tensor(row.input_ids)
            mask[i, longest - len(row.input_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                            use_cache=True, logits_to_keep=1).logits[:, -1, :]
        return cache, mask, positions[:, -1:], logits

    def join(self, rows: list[Row]) -> None:
        cache, mask, positions, logits = self._prefill(rows)
        if not self.rows:
            self.rows, self.cache, self.mask, self.positions, self.logits = list(rows), cache, mask, positions, logits
            return
        length = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, length, -2), _pad_left(theirs.keys, length, -2)])
            mine.values = torch.cat([_pad_left(mine.values, length, -2), _pad_left(theirs.values, length, -2)])
        self.mask = torch.cat([_pad_left(self.mask, length, 1), _pad_left(mask, length, 1)])
        self.positions = torch.cat([self.positions, positions])
        self.logits = torch.cat([self.logits, logits])
        self.rows += rows

    def keep(self, indices: list[int]) -> None:
        if len(indices) == len(self.rows):
            return
        if not indices:
            self.__init__(self.model, self.pad_id)
            return
        index = torch.tensor(indices, device=self.device)
        self.rows = [self.rows[i] for i in indices]
        self.cache.batch_select_indices(index)
        self.mask, self.positions, self.logits = self.mask[index], self.positions[index], self.logits[index]
        # Columns that are padding for every remaining row cost attention work for nothing.
        unused = int((self.mask.cumsum(-1) == 0).all(0).sum())
        if unused:
            self.mask = self.mask[:, unused:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]

    def step(self, tokens: list[int]) -> None:
        self.mask = torch.cat([self.mask, torch.ones((len(tokens), 1), dtype=torch.long, device=self.device)], dim=-1)
        self.positions = self.positions + 1
        self.logits = self.model(input_ids=torch.tensor(tokens, device=self.device).unsqueeze(-1), attention_mask=self.mask,
                                 position_ids=self.positions, cache=self.cache, use_cache=True).logits[:, -1, :]


class DriverState:
    """Per-row sampling state that only the driver keeps, for the rows in the batch."""

    def __init__(self):
        self.generators: dict[str, torch.Generator] = {}
        self.counts: dict[str, int] = {}
        self.cancelled: set[str] = set()

    def admit(self, rows: list[Row], device: torch.device | str = "cpu") -> None:
        for row in rows:
            self.generators[row.id] = make_generator(row.seed, device)
            self.counts[row.id] = 0

    def choose(self, batch: RunningBatch) -> tuple[list[int], list[int], list[Event]]:
        """Every row's next token in one pass on the logits' device; the ids (and any logprobs) reach
        the host in one transfer per step."""
        rows, logits = batch.rows, batch.logits
        picked = sample(logits, [r.temperature for r in rows], [r.top_p for r in rows],
                        [self.generators[r.id] for r in rows])
        wanting = [i for i, r in enumerate(rows) if r.logprobs is not None and r.id not in self.cancelled]
        lps = None
        if wanting:
            index = torch.tensor(wanting, device=logits.device)
            lps = row_logprobs(logits.index_select(0, index), picked.index_select(0, index),
                               max(rows[i].logprobs for i in wanting))
        chosen = picked.tolist()
        if lps is not None:
            lp_picked, lp_values, lp_ids = (t.tolist() for t in lps)
            lps = {i: (lp_picked[k], list(zip(lp_ids[k][:rows[i].logprobs], lp_values[k][:rows[i].logprobs])))
                   for k, i in enumerate(wanting)}
        tokens, states, events = [], [], []
        for i, row in enumerate(rows):
            if row.id in self.cancelled:  # decided here, learnt by every rank through the payload
                tokens.append(batch.pad_id)
                states.append(CANCELLED)
                events.append((row.id, None, CANCELLED, None))
                continue
            token = chosen[i]
            self.counts[row.id] += 1
            state = (STOP if token in row.stop_token_ids
                     else LENGTH if self.counts[row.id] >= row.max_tokens else RUNNING)
            tokens.append(token)
            states.append(state)
            events.append((row.id, token, state, lps.get(i) if lps else None))
        return tokens, states, events

    def forget(self, row_id: str) -> None:
        self.generators.pop(row_id, None)
        self.counts.pop(row_id, None)
        self.cancelled.discard(row_id)


@torch.inference_mode()
def run_engine(model, *, is_driver: bool, share: Share, share_object: ShareObject, max_batch: int,
               take: Take | None = None, on_step: OnStep | None = None, pad_id: int = 0,
               batch=None) -> DriverState | None:
    """Decode until the driver's `take` says shut down. Every rank runs this with the same model shard.
    `batch` is the batching strategy: continuous (RunningBatch, the default) or static (StaticBatch)."""
    batch = batch if batch is not None else RunningBatch(model, pad_id)
    driver = DriverState() if is_driver else None
    while True:
        n = len(batch)
        payload = torch.zeros(2 * n + 1, dtype=torch.long)  # tokens, states, then the joins flag
        joins: list[Row] | None = []
        if is_driver:
            if n:
                tokens, states, events = driver.choose(batch)
                payload[:n], payload[n:2 * n] = torch.tensor(tokens), torch.tensor(states)
            finishing = sum(1 for s in payload[n:2 * n].tolist() if s != RUNNING)
            room = max_batch - n + finishing if batch.joins_while_running else (
                max_batch if n == finishing else 0)
            joins = take(room, n == 0)
            payload[2 * n] = SHUTDOWN if joins is None else JOINS if joins else NO_JOINS
        share(payload)
        tokens, states, flag = payload[:n].tolist(), payload[n:2 * n].tolist(), int(payload[2 * n])
        if is_driver and n and on_step is not None:
            driver.cancelled |= on_step(events)
        if flag == SHUTDOWN:
            return driver
        if flag == JOINS:
            joins = share_object(joins)
        kept = [i for i, s in enumerate(states) if s == RUNNING]
        if is_driver:
            for i, s in enumerate(states):
                if s != RUNNING:
                    driver.forget(batch.rows[i].id)
        batch.keep(kept)
        if kept:
            batch.step([tokens[i] for i in kept])
        if flag == JOINS:
            if is_driver:
                driver.admit(joins, batch.device)
            batch.join(joins)


def decode_batch(model, rows: list[Row], *, on_step: OnStep | None = None, pad_id: int = 0,
                 arrivals: dict[int, list[Row]] | None = None, batch=None,
                 share: Share = lambda t: None, share_object: ShareObject = lambda o: o) -> dict[str, list[int]]:
    """The driver's side of a fixed workload: `rows` start together, `arrivals` join after the given
    step. Returns the tokens generated per row id. The engine's simplest use (tests, benchmarks); under
    tensor parallelism the other ranks run `run_engine` with the same `share` functions."""
    arrivals = dict(arrivals or {})
    produced: dict[str, list[int]] = {r.id: [] for r in [*rows, *(r for rs in arrivals.values() for r in rs)]}
    step = 0
    pending = [list(rows)]

    def take(limit: int, block: bool):
        nonlocal step
        step += 1
        if pending:
            return pending.pop()
        due = sorted(k for k in arrivals if k <= step - 1)
        if due and limit > 0:  # a static batch offers no room until it is empty
            return [row for k in due for row in arrivals.pop(k)]
        return None if block and not arrivals else []

    def collect(events):
        for row_id, token, _, _ in events:
            if token is not None:
                produced[row_id].append(token)
        return on_step(events) if on_step else set()

    run_engine(model, is_driver=True, share=share, share_object=share_object,
               max_batch=len(produced), take=take, on_step=collect, pad_id=pad_id, batch=batch)
    return produced
