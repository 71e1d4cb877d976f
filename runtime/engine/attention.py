"""Decode attention that reads each KV head once (grouped-query attention without `repeat_kv`).

Llama 3.1 has 8 KV heads for 32/64/128 query heads. transformers' SDPA path folds the query heads of a
KV head together for a single-token query only when not compiling; under torch.compile (the CUDA-graph
decode step) it copies every KV head 4-16 times per layer and step. For a batch of 32 at 640 tokens on
the 8B shape that is ~24 GB of extra memory traffic per step: more than the weights themselves.
Here a decode query (one position) is reshaped to (batch, kv_heads, group, head_dim), so each group
attends to its own KV head's cache as a short query sequence, with the same mask broadcast over it.
With HERD_DECODE_ATTENTION=split, on CUDA with Triton, the grouped query goes to herd's split-cache
kernel (split_kv_attention: every multiprocessor busy at batch 1, masked-out blocks skipped); by
default, and elsewhere, to torch's SDPA. The kernel is opt-in until a GPU run has held it to SDPA in
bf16 and timed it (bench/gpu_run.sh runs with it on). Everything else (prefill, models without grouped heads)
goes to transformers' own SDPA function.
"""
from __future__ import annotations

import os

import torch.nn.functional as F

from runtime.engine import split_kv_attention

NAME = "herd_sdpa"


def grouped_decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    groups = getattr(module, "num_key_value_groups", 1)
    if query.shape[2] != 1 or groups == 1 or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    batch, heads, _, dim = query.shape
    grouped = query.reshape(batch, heads // groups, groups, dim)
    mask = attention_mask[:, :, :, : key.shape[-2]] if attention_mask is not None else None
    if split_cache(query.device.type):
        out = split_kv_attention.decode(grouped, key, value, mask, scaling if scaling is not None else dim ** -0.5)
    else:
        out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, dropout_p=0.0, scale=scaling)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


def split_cache(device_type: str) -> bool:
    """Whether decode attention runs herd's split-cache kernel: asked for (HERD_DECODE_ATTENTION=split),
    on CUDA, with Triton."""
    return (device_type == "cuda" and split_kv_attention.available()
            and os.environ.get("HERD_DECODE_ATTENTION", "sdpa") == "split")


def use_grouped_decode_attention(model) -> None:
    """Switch `model` to the grouped decode attention (same masks as SDPA)."""
    from transformers.modeling_utils import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    AttentionInterface.register(NAME, grouped_decode_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)


def uses_grouped_decode_attention(model) -> bool:
    return model.config._attn_implementation == NAME
