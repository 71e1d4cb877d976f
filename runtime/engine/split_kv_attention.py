"""Decode attention split along the cache (flash-decoding): one Triton kernel, then a small combine.

A decode query is one position, so per KV head there is only a group of query heads (4 for Llama 3.1)
against the whole cache. One program per (row, KV head) leaves most of a GPU idle at batch 1 (8
programs for 132 multiprocessors) and makes a long cache one long serial loop: cuDNN's SDPA kernel sat
at ~16 us per layer here whatever the context. Splitting the cache into chunks gives each (row, KV
head, chunk) its own program (about two per multiprocessor in all), each keeps a running max, sum and
weighted values for its chunk (the online softmax), and a second kernel merges the chunks by their
log-sum-exp. The whole query group of a KV head is one tile, so every key and value is read once.

Blocks the attention mask hides entirely (the unused end of a static cache, left padding) are skipped
without reading their keys and values. Both kernels are registered as one torch operator
(`herd::split_kv_decode`) so torch.compile captures them in the decode step's CUDA graph.

Needs Triton (GPU images have it; `available()` says); the CPU build of torch runs transformers' SDPA.
"""
from __future__ import annotations

import functools
import math

import torch

try:   # Triton ships with CUDA builds of torch; CPU installs do without it
    import triton  # pyright: ignore[reportMissingImports]
    import triton.language as tl  # pyright: ignore[reportMissingImports]
    from torch.library import triton_op, wrap_triton
except ImportError:   # pragma: no cover - exercised on CPU installs
    triton = None

BLOCK_N = 64


def available() -> bool:
    return triton is not None


if triton is not None:
    @triton.jit
    def _chunk_kernel(Q, K, V, Keep, Out, Lse,
                      sqb, sqh, sqg, skb, skh, skn, svb, svh, svn, smb,
                      sob, soh, sos, sog, slb, slh, sls,
                      length, groups, kv_heads, scale,
                      CHUNK: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr,
                      IEEE: tl.constexpr):
        row_head, chunk = tl.program_id(0), tl.program_id(1)
        b, h = row_head // kv_heads, row_head % kv_heads
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, D)
        q = tl.load(Q + b * sqb + h * sqh + g[:, None] * sqg + d[None, :], mask=g[:, None] < groups, other=0.0)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        start = chunk * CHUNK
        for offset in range(0, CHUNK, BLOCK):
            n = start + offset + tl.arange(0, BLOCK)
            keep = tl.load(Keep + b * smb + n, mask=n < length, other=0) != 0
            if tl.max(keep.to(tl.int32), axis=0) > 0:   # a block the mask hides whole: nothing read
                k = tl.load(K + b * skb + h * skh + n[:, None] * skn + d[None, :], mask=keep[:, None], other=0.0)
                if IEEE:
                    s = tl.dot(q, tl.trans(k), input_precision="ieee")
                else:
                    s = tl.dot(q, tl.trans(k))
                s = tl.where(keep[None, :], s * scale, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.exp(s - m_safe[:, None])
                alpha = tl.exp(m_i - m_safe)
                l_i = l_i * alpha + tl.sum(p, 1)
                v = tl.load(V + b * svb + h * svh + n[:, None] * svn + d[None, :], mask=keep[:, None], other=0.0)
                if IEEE:
                    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
                else:
                    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
                m_i = m_new
        seen = l_i > 0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
        rows = g < groups
        tl.store(Out + b * sob + h * soh + chunk * sos + g[:, None] * sog + d[None, :], out, mask=rows[:, None])
        tl.store(Lse + b * slb + h * slh + chunk * sls + g, lse, mask=rows)

    @triton.jit
    def _combine_kernel(Out, Lse, Final, sob, soh, sos, sog, slb, slh, sls, sfb, sfh, sfg,
                        chunks, groups, kv_heads, BLOCK_S: tl.constexpr, D: tl.constexpr):
        pid = tl.program_id(0)
        g, row_head = pid % groups, pid // groups
        b, h = row_head // kv_heads, row_head % kv_heads
        c = tl.arange(0, BLOCK_S)
        d = tl.arange(0, D)
        lse = tl.load(Lse + b * slb + h * slh + c * sls + g, mask=c < chunks, other=float("-inf"))
        top = tl.max(lse, 0)
        top = tl.where(top == float("-inf"), 0.0, top)
        w = tl.exp(lse - top)
        part = tl.load(Out + b * sob + h * soh + c[:, None] * sos + g * sog + d[None, :], mask=c[:, None] < chunks,
                       other=0.0)
        total = tl.sum(w, 0)
        merged = tl.sum(w[:, None] * part, 0) / tl.where(total > 0, total, 1.0)
        tl.store(Final + b * sfb + h * sfh + g * sfg + d, merged.to(Final.dtype.element_ty))

    @triton_op("herd::split_kv_decode", mutates_args={})
    def split_kv_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor,
                        scale: float) -> torch.Tensor:
        """query (rows, kv_heads, group, head_dim), key/value (rows, kv_heads, length, head_dim) with unit
        stride in head_dim, keep (rows, length) uint8 (1 = attend): (rows, kv_heads, group, head_dim)."""
        rows, kv_heads, groups, dim = query.shape
        length = key.shape[2]
        chunks, chunk = plan_chunks(rows * kv_heads, length, _multiprocessors(query.device))
        partial = torch.empty((rows, kv_heads, chunks, groups, dim), dtype=torch.float32, device=query.device)
        lse = torch.empty((rows, kv_heads, chunks, groups), dtype=torch.float32, device=query.device)
        final = torch.empty_like(query)
        wrap_triton(_chunk_kernel)[(rows * kv_heads, chunks)](
            query, key, value, keep, partial, lse,
            query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1), key.stride(2),
            value.stride(0), value.stride(1), value.stride(2), keep.stride(0),
            partial.stride(0), partial.stride(1), partial.stride(2), partial.stride(3),
            lse.stride(0), lse.stride(1), lse.stride(2),
            length, groups, kv_heads, scale,
            CHUNK=chunk, BLOCK_G=max(16, _power_of_2(groups)), BLOCK=BLOCK_N, D=dim,
            IEEE=query.dtype == torch.float32, num_warps=4, num_stages=2)
        wrap_triton(_combine_kernel)[(rows * kv_heads * groups,)](
            partial, lse, final, partial.stride(0), partial.stride(1), partial.stride(2), partial.stride(3),
            lse.stride(0), lse.stride(1), lse.stride(2), final.stride(0), final.stride(1), final.stride(2),
            chunks, groups, kv_heads, BLOCK_S=max(2, _power_of_2(chunks)), D=dim, num_warps=4)
        return final


def _power_of_2(n: int) -> int:
    """The smallest power of two >= n (tile sizes)."""
    return 1 << max(0, n - 1).bit_length()


def plan_chunks(programs: int, length: int, multiprocessors: int) -> tuple[int, int]:
    """(chunks, keys per chunk): enough chunks that (rows x KV heads x chunks) is at least two programs
    per multiprocessor where the cache has that many blocks; chunk lengths are whole blocks."""
    blocks = max(1, math.ceil(length / BLOCK_N))
    wanted = max(1, min(blocks, math.ceil(2 * multiprocessors / max(1, programs))))
    per_chunk = blocks // wanted        # rounding down: at least the wanted number of chunks
    return math.ceil(blocks / per_chunk), per_chunk * BLOCK_N


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8   # Triton's interpreter on CPU (tests): any figure works


def decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
           scale: float) -> torch.Tensor:
    """Grouped decode attention: query (rows, kv_heads, group, head_dim), mask (rows, 1, 1, >=length)
    boolean (True = attend) or additive (0 = attend), or None (attend to all)."""
    if triton is None:
        raise RuntimeError("split-cache decode attention needs Triton (a CUDA build of torch ships it)")
    rows, length = query.shape[0], key.shape[2]
    if mask is None:
        keep = torch.ones((rows, length), dtype=torch.uint8, device=query.device)
    elif mask.dtype == torch.bool:
        keep = mask[:, 0, 0, :length].view(torch.uint8)
    else:
        keep = (mask[:, 0, 0, :length] == 0).view(torch.uint8)
    keep = keep.expand(rows, length)   # a mask broadcast over rows: stride 0
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        key, value = key.contiguous(), value.contiguous()
    return split_kv_decode(query.contiguous(), key, value, keep, float(scale))
