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
from typing import Protocol, TypeVar

import torch
import torch.nn.functional as F
from transformers.cache_utils import DummyLayer, DynamicCache, DynamicLayer

from runtime.engine.kv_slots import SlotLayer, slot_cache

from runtime.engine.request import Row
from runtime.engine.sampling import logprobs as row_logprobs
from runtime.engine.sampling import make_generator, sample

# Why a row stopped (the codes travel between ranks as integers). ERROR: this row alone failed (it
# could not be admitted, or its prefill raised); the batch and the group go on.
RUNNING, STOP, LENGTH, CANCELLED, ERROR = 0, 1, 2, 3, 4
FINISH_REASONS = {STOP: "stop", LENGTH: "length", CANCELLED: "stop", ERROR: "error"}
# The flag after the tokens in each step's shared payload.
NO_JOINS, JOINS, SHUTDOWN = 0, 1, 2


# (row id, new token or None, state, (logprob, [(id, logprob)...]) or None); for state ERROR the last
# item is the reason (a string) instead.
Event = tuple[str, "int | None", int, "tuple[float, list[tuple[int, float]]] | str | None"]
# Driver side: take(limit, block) -> rows to join ([] for none, None to shut down).
Take = Callable[[int, bool], "list[Row] | None"]
# Driver side: on_step(events) -> ids cancelled meanwhile.
OnStep = Callable[[list[Event]], set[str]]
# All ranks: share(tensor) broadcasts the driver's tensor in place; share_object(obj) returns the
# driver's object. Identity functions when there is one rank.
Share = Callable[[torch.Tensor], None]
T = TypeVar("T")


class ShareObject(Protocol):
    def __call__(self, obj: T, /) -> T: ...


def _unbatchable(layer) -> TypeError:
    return TypeError(f"{type(layer).__name__}: continuous batching merges and cuts key/value caches only "
                     "(a linear-attention layer's recurrent state cannot take rows of another batch)")


def _kv(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """A prefilled cache layer's keys and values: DynamicLayer's and its sliding-window and quantized
    kinds' (SlotLayer's too)."""
    if isinstance(layer, DynamicLayer) and layer.keys is not None and layer.values is not None:
        return layer.keys, layer.values
    raise _unbatchable(layer)


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

    def _state(self) -> tuple[DynamicCache, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cache, mask, positions, logits): set by the first join, None while the batch is empty."""
        if self.cache is None or self.mask is None or self.positions is None or self.logits is None:
            raise RuntimeError("the batch has no rows")
        return self.cache, self.mask, self.positions, self.logits

    def _prefill(self, rows: list[Row], cache=None):
        longest = max(len(r.input_ids) for r in rows)
        ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, longest - len(row.input_ids):] = torch.tensor(row.input_ids)
            mask[i, longest - len(row.input_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = cache if cache is not None else DynamicCache(config=self.model.config)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                            use_cache=True, logits_to_keep=1).logits[:, -1, :]
        return cache, mask, positions[:, -1:], logits

    def _new_cache(self):
        """Slot layers (no copy per step or join) for models whose layers are all plain attention."""
        cache = DynamicCache(config=self.model.config)
        if all(type(layer) is DynamicLayer for layer in cache.layers):
            cache = slot_cache(self.model.config)
        return cache

    def join(self, rows: list[Row]) -> None:
        if not self.rows:
            cache, mask, positions, logits = self._prefill(rows, self._new_cache())
            self.rows, self.cache, self.mask, self.positions, self.logits = list(rows), cache, mask, positions, logits
            return
        running, running_mask, running_positions, running_logits = self._state()
        cache, mask, positions, logits = self._prefill(rows)
        length = max(running_mask.shape[1], mask.shape[1])
        for mine, theirs in zip(running.layers, cache.layers):
            if isinstance(mine, SlotLayer):    # new rows go into free slots; nothing already there moves
                mine.join(*_kv(theirs))
            elif isinstance(mine, DynamicLayer):
                (keys, values), (new_keys, new_values) = _kv(mine), _kv(theirs)
                mine.keys = torch.cat([_pad_left(keys, length, -2), _pad_left(new_keys, length, -2)])
                mine.values = torch.cat([_pad_left(values, length, -2), _pad_left(new_values, length, -2)])
            elif not isinstance(mine, DummyLayer):   # a DummyLayer holds no cache: nothing to merge
                raise _unbatchable(mine)
        self.mask = torch.cat([_pad_left(running_mask, length, 1), _pad_left(mask, length, 1)])
        self.positions = torch.cat([running_positions, positions])
        self.logits = torch.cat([running_logits, logits])
        self.rows += rows

    def keep(self, indices: list[int]) -> None:
        if len(indices) == len(self.rows):
            return
        if not indices:
            self.__init__(self.model, self.pad_id)
            return
        cache, mask, positions, logits = self._state()
        index = torch.tensor(indices, device=self.device)
        self.rows = [self.rows[i] for i in indices]
        for layer in cache.layers:
            if isinstance(layer, SlotLayer):
                layer.keep_rows(index)
            elif isinstance(layer, (DynamicLayer, DummyLayer)):
                layer.batch_select_indices(index)
            else:
                raise _unbatchable(layer)
        mask = mask[index]
        self.mask, self.positions, self.logits = mask, positions[index], logits[index]
        # Columns that are padding for every remaining row cost attention work for nothing.
        unused = int((mask.cumsum(-1) == 0).all(0).sum())
        if unused:
            self.mask = mask[:, unused:]
            for layer in cache.layers:
                if isinstance(layer, SlotLayer):
                    layer.drop_left(unused)
                elif isinstance(layer, DynamicLayer):
                    keys, values = _kv(layer)
                    layer.keys, layer.values = keys[:, :, unused:], values[:, :, unused:]

    def step(self, tokens: list[int]) -> None:
        cache, mask, positions, _ = self._state()
        self.mask = torch.cat([mask, torch.ones((len(tokens), 1), dtype=torch.long, device=self.device)], dim=-1)
        self.positions = positions + 1
        self.logits = self.model(input_ids=torch.tensor(tokens, device=self.device).unsqueeze(-1), attention_mask=self.mask,
                                 position_ids=self.positions, cache=cache, use_cache=True).logits[:, -1, :]


class Picked:
    """One step's choice: the rows it was for, the chosen ids (a device tensor; `tokens` once `on_host`
    has read them), the rows that want logprobs and their logprob tensors."""

    def __init__(self, rows, device_tokens: torch.Tensor, wanting: list[int], lps):
        self.rows, self.device_tokens, self.wanting, self.lps = rows, device_tokens, wanting, lps
        self.tokens: list[int] = []
        self._host: list[torch.Tensor] | None = None
        self._ready: torch.cuda.Event | None = None

    def start_copy(self) -> "Picked":
        """Queue the ids' (and logprobs') copy to pinned host memory now, so that what the device is
        given next does not delay it."""
        tensors = [self.device_tokens, *(self.lps or ())]
        if self.device_tokens.device.type != "cuda":
            self._host = tensors
            return self
        self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        for host, t in zip(self._host, tensors):
            host.copy_(t, non_blocking=True)
        self._ready = torch.cuda.Event()
        self._ready.record()
        return self

    def on_host(self) -> "Picked":
        """Wait for the copy (started now if it was not) and read the ids."""
        if self._host is None:
            self.start_copy()
        if self._ready is not None:
            self._ready.synchronize()
        host = self._host or []
        self.tokens = host[0].tolist()
        if self.lps is not None:
            self.lps = tuple(host[1:])
        return self


class DriverState:
    """Per-row sampling state that only the driver keeps, for the rows in the batch."""

    def __init__(self):
        self.generators: dict[str, torch.Generator] = {}
        self.counts: dict[str, int] = {}
        self.cancelled: set[str] = set()
        self.seen: dict[str, torch.Tensor] = {}      # rows with penalties: generated-token counts per id
        self.biases: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}   # rows with logit_bias: ids, values

    def admit(self, rows: list[Row], device: torch.device | str = "cpu") -> None:
        for row in rows:
            self.generators[row.id] = make_generator(row.seed, device)
            self.counts[row.id] = 0
            if row.logit_bias:
                self.biases[row.id] = (torch.tensor([t for t, _ in row.logit_bias], device=device),
                                       torch.tensor([b for _, b in row.logit_bias], device=device))

    def _adjusted(self, rows: list[Row], logits: torch.Tensor) -> torch.Tensor:
        """The logits sampling sees: OpenAI's logit_bias and presence/frequency penalties applied per
        row, on the device (logprobs still report the model's own distribution)."""
        touched = [i for i, r in enumerate(rows) if r.adjusts_logits]
        if not touched:
            return logits
        logits = logits.float().clone()
        for i in touched:
            row = rows[i]
            if row.id in self.biases:
                ids, values = self.biases[row.id]
                logits[i].index_add_(0, ids, values)
            if row.presence_penalty or row.frequency_penalty:
                seen = self.seen.setdefault(row.id, torch.zeros(logits.shape[-1], device=logits.device))
                logits[i] -= seen * row.frequency_penalty + (seen > 0).float() * row.presence_penalty
        return logits

    def _remember(self, rows: list[Row], picked: torch.Tensor) -> None:
        for i, row in enumerate(rows):
            if row.id in self.seen:
                self.seen[row.id].index_add_(0, picked[i:i + 1], torch.ones(1, device=picked.device))

    def pick(self, batch) -> "Picked":
        """Every row's next token, chosen on the logits' device; nothing waits for the device here."""
        rows, logits = batch.rows, batch.logits
        if logits is None:
            raise RuntimeError("pick() needs a batch with rows")
        picked = sample(self._adjusted(rows, logits), [r.temperature for r in rows], [r.top_p for r in rows],
                        [self.generators[r.id] for r in rows])
        self._remember(rows, picked)
        wanting = [i for i, r in enumerate(rows) if r.logprobs is not None and r.id not in self.cancelled]
        lps = None
        if wanting:
            index = torch.tensor(wanting, device=logits.device)
            lps = row_logprobs(logits.index_select(0, index), picked.index_select(0, index),
                               max(rows[i].logprobs or 0 for i in wanting))
        return Picked(list(rows), picked, wanting, lps)

    def choose(self, batch: RunningBatch) -> tuple[list[int], list[int], list[Event]]:
        """Every row's next token in one pass on the logits' device; the ids (and any logprobs) reach
        the host in one transfer per step."""
        return self.decide(batch.pad_id, self.pick(batch).on_host())

    def decide(self, pad_id: int, picked: "Picked") -> tuple[list[int], list[int], list[Event]]:
        """The host's half of a step, once the chosen ids are there: stop decisions and events."""
        rows, chosen, wanting, lps = picked.rows, picked.tokens, picked.wanting, picked.lps
        if lps is not None:
            lp_picked, lp_values, lp_ids = (t.tolist() for t in lps)
            lps = {i: (lp_picked[k], list(zip(lp_ids[k][:rows[i].logprobs], lp_values[k][:rows[i].logprobs])))
                   for k, i in enumerate(wanting)}
        tokens, states, events = [], [], []
        for i, row in enumerate(rows):
            if row.id in self.cancelled:  # decided here, learnt by every rank through the payload
                tokens.append(pad_id)
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
        self.seen.pop(row_id, None)
        self.biases.pop(row_id, None)
        self.cancelled.discard(row_id)


def refusal(row: Row, vocab: int) -> str | None:
    """Why the engine cannot run this row at all (the front validates first; this guards the group
    against a request that slipped past it: an out-of-range id would fault the device)."""
    if not row.input_ids:
        return "empty prompt"
    if row.max_tokens < 1:
        return f"max_tokens {row.max_tokens} < 1"
    if any(not 0 <= t < vocab for t in row.input_ids):
        return f"prompt token id outside 0..{vocab - 1}"
    if any(not 0 <= t < vocab for t, _ in row.logit_bias):
        return f"logit_bias token id outside 0..{vocab - 1}"
    return None


def _vocab(model) -> int:
    out = model.get_output_embeddings()
    return int(getattr(out, "out_features", 0) or model.config.vocab_size)


@torch.inference_mode()
def run_engine(model, *, is_driver: bool, share: Share, share_object: ShareObject, max_batch: int,
               take: Take | None = None, on_step: OnStep | None = None, pad_id: int = 0,
               batch=None, overlap: bool = False) -> DriverState | None:
    """Decode until the driver's `take` says shut down. Every rank runs this with the same model shard.
    `batch` is the batching strategy: continuous (RunningBatch, the default) or static (StaticBatch).

    A row's own fault stays that row's: rows the engine cannot run are refused before any rank sees
    them, rows that do not fit a static batch yet wait for the next one, and a prefill that raises
    fails the rows it was for (on every rank alike, as they run the same inputs); the batch goes on.

    `overlap` (one rank, a batch with `step_ahead`: the static batch): the next step is queued on the
    device with the chosen ids still there, before the host reads them, so the host's work (stop
    decisions, streaming, admission) runs while the device computes. A row that finished is computed
    one step further for nothing; a static batch keeps finished rows in place anyway."""
    step_ahead = getattr(batch, "step_ahead", None) if overlap else None
    if overlap and step_ahead is None:
        raise TypeError("run_engine: overlap needs a batch that can step ahead (StaticBatch)")
    batch = batch if batch is not None else RunningBatch(model, pad_id)
    driver = DriverState() if is_driver else None
    if driver is not None and take is None:
        raise TypeError("run_engine: the driver rank needs `take`")
    vocab = _vocab(model)
    waiting: list[Row] = []      # driver: taken rows that do not fit the static batch yet
    while True:
        n = len(batch)
        payload = torch.zeros(2 * n + 1, dtype=torch.long)  # tokens, states, then the joins flag
        joins: list[Row] | None = []
        stepped = False
        if driver is not None and take is not None:   # the driver (which has a take: checked above)
            if n:
                if step_ahead is not None:
                    picked = driver.pick(batch).start_copy()
                    step_ahead(picked.device_tokens)
                    stepped = True
                    tokens, states, events = driver.decide(batch.pad_id, picked.on_host())
                else:
                    tokens, states, events = driver.choose(batch)
                payload[:n], payload[n:2 * n] = torch.tensor(tokens), torch.tensor(states)
            finishing = sum(1 for s in payload[n:2 * n].tolist() if s != RUNNING)
            room = max_batch - n + finishing if batch.joins_while_running else (
                max_batch if n == finishing else 0)
            joins = _next_joins(take, waiting, room, block=n == 0 and not waiting)
            if joins:
                joins, failed = _admissible(joins, batch, vocab, waiting)
                if failed and on_step is not None:
                    driver.cancelled |= on_step(failed)
            payload[2 * n] = SHUTDOWN if joins is None else JOINS if joins else NO_JOINS
        share(payload)
        tokens, states, flag = payload[:n].tolist(), payload[n:2 * n].tolist(), int(payload[2 * n])
        if driver is not None and n and on_step is not None:
            driver.cancelled |= on_step(events)
        if flag == SHUTDOWN:
            return driver
        if flag == JOINS:
            joins = share_object(joins)
        kept = [i for i, s in enumerate(states) if s == RUNNING]
        if driver is not None:
            for i, s in enumerate(states):
                if s != RUNNING:
                    driver.forget(batch.rows[i].id)
        batch.keep(kept)
        if kept and not stepped:
            batch.step([tokens[i] for i in kept])
        if flag == JOINS and joins:
            try:
                batch.join(joins)
            except Exception as err:   # noqa: BLE001 - a prefill fault fails its rows, not the group
                if driver is not None and on_step is not None:
                    reason = f"prefill failed: {type(err).__name__}: {err}"[:300]
                    on_step([(row.id, None, ERROR, reason) for row in joins])
                continue
            if driver is not None:
                driver.admit(joins, batch.device)


def _next_joins(take: Take, waiting: list[Row], room: int, block: bool) -> list[Row] | None:
    """Rows offered to the batch: those already waiting first, then new ones."""
    if room <= 0:
        return []
    offered = waiting[:room]
    del waiting[:len(offered)]
    more = take(room - len(offered), block)
    if more is None:
        if offered:   # finish what was taken; the shutdown is seen again on the next take
            return offered
        return None
    return offered + more


def _admissible(rows: list[Row], batch, vocab: int, waiting: list[Row]) -> tuple[list[Row], list[Event]]:
    """Split the offered rows: (rows that join now, error events for rows refused for good). Rows a
    static batch cannot hold together with the others go back to `waiting`, in order."""
    now, failed = [], []
    for row in rows:
        why = refusal(row, vocab)
        if why is None and hasattr(batch, "fits") and not batch.fits(row):
            why = f"prompt ({len(row.input_ids)}) + max_tokens ({row.max_tokens}) exceed the static cache"
        if why is not None:
            failed.append((row.id, None, ERROR, why))
        else:
            now.append(row)
    if hasattr(batch, "fits_together"):
        now, later = batch.fits_together(now)
        waiting[:0] = later
    return now, failed


def decode_batch(model, rows: list[Row], *, on_step: OnStep | None = None, pad_id: int = 0,
                 arrivals: dict[int, list[Row]] | None = None, batch=None,
                 share: Share | None = None, share_object: ShareObject | None = None,
                 overlap: bool | None = None) -> dict[str, list[int]]:
    """The driver's side of a fixed workload: `rows` start together, `arrivals` join after the given
    step. Returns the tokens generated per row id. The engine's simplest use (tests, benchmarks); under
    tensor parallelism the other ranks run `run_engine` with the same `share` functions. `overlap`
    defaults to what the batch asks for when there is one rank (no `share`)."""
    if overlap is None:
        overlap = share is None and bool(getattr(batch, "overlaps_host", False))
    share = share if share is not None else (lambda t: None)
    share_object = share_object if share_object is not None else (lambda o: o)
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
               max_batch=len(produced), take=take, on_step=collect, pad_id=pad_id, batch=batch, overlap=overlap)
    return produced
