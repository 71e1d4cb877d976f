"""The grouped decode attention computes what transformers' SDPA attention computes (which repeats each
KV head for its query heads), without the repeat; prefill is handed to transformers unchanged."""
import types

import pytest
import torch

from runtime.engine.attention import grouped_decode_attention


def reference(module, q, k, v, mask, scaling):
    from transformers.integrations.sdpa_attention import repeat_kv
    k, v = repeat_kv(k, module.num_key_value_groups), repeat_kv(v, module.num_key_value_groups)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2)


@pytest.mark.parametrize("batch,heads,kv_heads,length", [(1, 32, 8, 40), (5, 8, 2, 17), (3, 4, 4, 9)])
def test_one_query_position_attends_like_repeated_heads(batch, heads, kv_heads, length):
    torch.manual_seed(batch * heads + length)
    module = types.SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True)
    q = torch.randn(batch, heads, 1, 16)
    k, v = torch.randn(batch, kv_heads, length, 16), torch.randn(batch, kv_heads, length, 16)
    mask = torch.rand(batch, 1, 1, length) > 0.3       # padding and not-yet-written cache slots
    mask[..., 0] = True
    out, _ = grouped_decode_attention(module, q, k, v, mask, scaling=0.25)
    assert out.shape == (batch, 1, heads, 16)
    torch.testing.assert_close(out, reference(module, q, k, v, mask, 0.25), rtol=1e-5, atol=1e-5)


def test_prefill_goes_to_transformers_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    module = types.SimpleNamespace(num_key_value_groups=2, is_causal=True)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    ours, _ = grouped_decode_attention(module, q, k, v, None, scaling=0.3)
    theirs, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.3)
    assert torch.equal(ours, theirs)
