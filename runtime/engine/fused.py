"""Fused projections: one QKV matrix and one gate/up matrix per layer, built from the checkpoint's
separate tensors after loading.

A decode step reads every weight once; at small batches each projection is a GEMV whose time is its
bytes plus a fixed launch-and-tail cost. Llama's layer has five input projections (q, k, v, gate, up)
that read the same input: stacked into two matrices they are two GEMVs instead of five (fewer kernels
in the CUDA graph, and wider ones that keep more of the GPU's memory pipes busy). The outputs are the
same dot products, split back into q/k/v and gate/up.

Under tensor parallelism transformers shards q/k/v and gate/up by output rows (colwise): each rank
holds its heads' rows of each. Stacking a rank's local rows gives that rank's share of the fused
matrix, and the input is already whole on every rank, so the fused matrix is a plain local Linear with
no collective; o_proj and down_proj keep their row-wise sharding and all-reduce.

Only the modules whose forward this file mirrors are fused (transformers' LlamaAttention and LlamaMLP:
Llama 3.x, SmolLM2); anything else is left as it is. tests/runtime/test_fused.py holds the fused model
to the same logits and tokens as the unfused one, alone and at TP 2.
"""
from __future__ import annotations

import os
import types

import torch
from torch import nn


def _local(t: torch.Tensor) -> torch.Tensor:
    """A rank's own rows of a (possibly DTensor) parameter."""
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t


def _stacked(linears: list[nn.Linear]) -> tuple[nn.Linear, list[int]]:
    weights = [_local(lin.weight.data) for lin in linears]
    sizes = [w.shape[0] for w in weights]
    biases = [lin.bias for lin in linears]
    fused = nn.Linear(weights[0].shape[1], sum(sizes), bias=biases[0] is not None,
                      device=weights[0].device, dtype=weights[0].dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat(weights))
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([_local(b.data) for b in biases if b is not None]))
    fused.weight.requires_grad_(False)
    return fused, sizes


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
    """transformers 5.24's LlamaAttention.forward with the three projections as one."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query, key, value = self.qkv_proj(hidden_states).split(self.qkv_sizes, dim=-1)
    query_states = query.view(hidden_shape).transpose(1, 2)
    key_states = key.view(hidden_shape).transpose(1, 2)
    value_states = value.view(hidden_shape).transpose(1, 2)
    assert position_embeddings is not None, "LlamaModel passes the rotary embeddings to every layer"
    cos, sin = position_embeddings
    query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
    if cache is not None:
        key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)
    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                eager_attention_forward)
    attn_output, attn_weights = attention_interface(self, query_states, key_states, value_states, attention_mask,
                                                    dropout=0.0, scaling=self.scaling, **kwargs)
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(attn_output), attn_weights


def _mlp_forward(self, x):
    gate, up = self.gate_up_proj(x).split(self.gate_up_sizes, dim=-1)
    return self.down_proj(self.act_fn(gate) * up)


def _fusable_attention(module) -> bool:
    return (type(module).__name__ == "LlamaAttention" and not hasattr(module, "qkv_proj")
            and all(isinstance(getattr(module, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj")))


def _fusable_mlp(module) -> bool:
    return (type(module).__name__ == "LlamaMLP" and not hasattr(module, "gate_up_proj")
            and all(isinstance(getattr(module, n, None), nn.Linear) for n in ("gate_proj", "up_proj")))


def fuse_projections(model) -> int:
    """Fuse q/k/v and gate/up in place in every layer that can be; returns how many modules were
    fused. The separate matrices are dropped as each layer is done, so the model never holds more
    than one layer's projections twice."""
    fused = 0
    for module in list(model.modules()):
        if _fusable_attention(module):
            module.qkv_proj, module.qkv_sizes = _stacked([module.q_proj, module.k_proj, module.v_proj])
            del module.q_proj, module.k_proj, module.v_proj
            module.forward = types.MethodType(_attention_forward, module)
            fused += 1
        elif _fusable_mlp(module):
            module.gate_up_proj, module.gate_up_sizes = _stacked([module.gate_proj, module.up_proj])
            del module.gate_proj, module.up_proj
            module.forward = types.MethodType(_mlp_forward, module)
            fused += 1
    return fused


def wanted(device: str) -> bool:
    """Fuse on GPUs (where decode is bandwidth-bound and graph-captured); HERD_FUSE_PROJECTIONS=1/0
    forces it either way (the CPU tests use 1)."""
    forced = os.environ.get("HERD_FUSE_PROJECTIONS")
    if forced in ("0", "1"):
        return forced == "1"
    return device.startswith("cuda")
