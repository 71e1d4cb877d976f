"""A KV cache layer for continuous batching that does not copy the cache to grow it.

transformers' DynamicLayer concatenates every step's keys and values onto the whole cache (a copy of
the cache per layer and step), and joining rows to a running batch concatenated every existing row
again. Here each layer keeps preallocated buffers (rows x heads x columns x head_dim): a decode step
writes its column in place (capacity doubles when full), joining rows writes them into free row slots,
and a join whose prompt is longer than the batch's context extends the used columns to the left into
headroom kept there. Rows leaving compact the kept rows (a copy of what stays, as before); padding
columns every row has left behind are dropped by moving the start, not by copying.

The batch's layout is unchanged: every row's last position sits in the same column, shorter rows are
left-padded, and the attention mask marks the padding (which is zeroed, so masked values stay finite).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

LEFT_ROOM, RIGHT_ROOM = 64, 128


class SlotLayer(DynamicLayer):
    def __init__(self, **kwargs):
        self._k: torch.Tensor | None = None   # the buffers, allocated by the first update
        self._v: torch.Tensor | None = None
        self.rows = self.start = self.end = 0
        super().__init__(**kwargs)

    # ---------------------------------------------------------------- the view transformers sees
    @property
    def keys(self):
        return None if self._k is None else self._k[:self.rows, :, self.start:self.end]

    @keys.setter
    def keys(self, value):
        # transformers assigns whole tensors (reset, batch_select_indices): adopt them as the buffer.
        self._adopt("_k", value)

    @property
    def values(self):
        return None if self._v is None else self._v[:self.rows, :, self.start:self.end]

    @values.setter
    def values(self, value):
        self._adopt("_v", value)

    def _adopt(self, name: str, value) -> None:
        setattr(self, name, value)
        if value is None:
            self.rows = self.start = self.end = 0
        elif value.dim() == 4:
            self.rows, self.start, self.end = value.shape[0], 0, value.shape[-2]

    def lazy_initialization(self, key_states, value_states) -> None:
        self.device = key_states.device
        self.is_initialized = True

    # ---------------------------------------------------------------- growth
    def _reallocate(self, rows: int, left: int, columns: int) -> None:
        """New buffers with room for `rows` rows, `left` free columns before the used ones and
        `columns` after `start`; the used part is copied over (the only copy growth makes)."""
        def grow(old):
            shape = (rows, old.shape[1], left + columns, old.shape[3])
            new = torch.zeros(shape, dtype=old.dtype, device=old.device)
            used = self.end - self.start
            new[:self.rows, :, left:left + used] = old[:self.rows, :, self.start:self.end]
            return new
        used = self.end - self.start
        self._k, self._v = grow(self._k), grow(self._v)
        self.start, self.end = left, left + used

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if self._k is None or self._v is None or self._k.numel() == 0 or self.rows == 0:
            b, h, _, d = key_states.shape
            self._k = torch.zeros((b, h, LEFT_ROOM + n + RIGHT_ROOM, d), dtype=key_states.dtype, device=key_states.device)
            self._v = torch.zeros((b, h, LEFT_ROOM + n + RIGHT_ROOM, value_states.shape[-1]), dtype=value_states.dtype,
                                  device=value_states.device)
            self.rows, self.start, self.end = b, LEFT_ROOM, LEFT_ROOM
        if self.end + n > self._k.shape[-2]:
            used = self.end - self.start
            self._reallocate(self._k.shape[0], self.start, max(2 * used, used + n + RIGHT_ROOM))
        self._k[:self.rows, :, self.end:self.end + n] = key_states
        self._v[:self.rows, :, self.end:self.end + n] = value_states
        self.end += n
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.end - self.start if self._k is not None else 0

    # ---------------------------------------------------------------- batch changes
    def join(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append rows whose cache (left-padded among themselves) ends at the batch's last column."""
        if self._k is None or self._v is None:
            raise RuntimeError("SlotLayer.join before the first update: no rows to join")
        k, length = keys.shape[0], keys.shape[-2]
        used = self.end - self.start
        if length > used:   # longer than the batch: open columns on the left
            extra = length - used
            if self.start < extra or self.rows + k > self._k.shape[0]:
                self._reallocate(max(self.rows + k, 2 * self.rows), extra + LEFT_ROOM,
                                 self._k.shape[-2] - self.start)
            self.start -= extra
            self._k[:self.rows, :, self.start:self.start + extra] = 0
            self._v[:self.rows, :, self.start:self.start + extra] = 0
        elif self.rows + k > self._k.shape[0]:
            self._reallocate(max(self.rows + k, 2 * self.rows), self.start, self._k.shape[-2] - self.start)
        rows = slice(self.rows, self.rows + k)
        self._k[rows, :, self.start:self.end] = 0
        self._v[rows, :, self.start:self.end] = 0
        self._k[rows, :, self.end - length:self.end] = keys
        self._v[rows, :, self.end - length:self.end] = values
        self.rows += k

    def keep_rows(self, index: torch.Tensor) -> None:
        """Only the rows in `index` stay, packed at the top (a copy of the kept rows)."""
        if self._k is None or self._v is None:
            raise RuntimeError("SlotLayer.keep_rows before the first update: no rows to keep")
        kept = index.numel()
        self._k[:kept] = self._k.index_select(0, index)
        self._v[:kept] = self._v.index_select(0, index)
        self.rows = kept

    def drop_left(self, columns: int) -> None:
        self.start += columns


def slot_cache(config):
    """A DynamicCache whose layers are SlotLayers (attention code sees ordinary tensors)."""
    from transformers.cache_utils import DynamicCache
    cache = DynamicCache(config=config)
    cache.layers[:] = [SlotLayer() for _ in cache.layers]   # in place: the cache's list holds any layer kind
    return cache
