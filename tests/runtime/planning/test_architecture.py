"""The closed forms the planner relies on, pinned against published figures and the real model class."""
import json

import pytest

from runtime.planning import catalog
from runtime.planning.architecture import Architecture


@pytest.mark.parametrize("model_id, billions", [
    ("llama-3.1-8b", 8.03), ("llama-3.1-70b", 70.55), ("llama-3.1-405b", 405.85),
    ("llama-3.1-405b-instruct", 405.85),
])
def test_llama_parameter_counts_match_published_within_half_a_percent(model_id, billions):
    params = catalog.model(model_id).architecture.total_params
    assert abs(params / 1e9 - billions) / billions < 0.005


def test_smollm2_parameter_count_is_exact():
    assert catalog.model("smollm2-135m-instruct").architecture.total_params == 134_515_008


@pytest.mark.parametrize("model_id, layers, kv_heads, head_dim", [
    ("llama-3.1-8b", 32, 8, 128), ("llama-3.1-70b", 80, 8, 128), ("llama-3.1-405b", 126, 8, 128),
])
def test_bf16_kv_bytes_per_token(model_id, layers, kv_heads, head_dim):
    """K and V for every layer and KV head, 2 bytes each, from Meta's published config.json figures:
    128 KiB (8B), 320 KiB (70B), 504 KiB (405B) per token."""
    expected = 2 * layers * kv_heads * head_dim * 2
    assert catalog.model(model_id).architecture.kv_bytes_per_token(2) == expected
    assert catalog.model(model_id).architecture.kv_bytes_per_token(1) == expected // 2   # an FP8 KV cache


@pytest.mark.parametrize("model_id", sorted(catalog.models()))
def test_closed_form_equals_the_model_built_on_the_meta_device(model_id):
    """No weights needed: transformers builds the real module tree with empty tensors."""
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    arch = catalog.model(model_id).architecture
    config = LlamaConfig(
        vocab_size=arch.vocab_size, hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_hidden_layers, num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads, head_dim=arch.head_dim,
        intermediate_size=arch.intermediate_size, tie_word_embeddings=arch.tie_word_embeddings)
    with init_empty_weights():
        model = LlamaForCausalLM(config)
    model.tie_weights()  # loading ties them; an empty init does not
    # Tied weights are one parameter; parameters() yields it once.
    assert sum(p.numel() for p in model.parameters()) == arch.total_params


def test_architecture_from_any_config_json(tmp_path):
    cfg = {"vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32,
           "num_attention_heads": 32, "intermediate_size": 11008, "max_position_embeddings": 4096}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    arch = Architecture.from_config_json(path)
    assert arch.num_key_value_heads == 32 and arch.head_dim == 128  # HF defaults: MHA, hidden/heads
    assert abs(arch.total_params - 6_738_415_616) == 0  # Llama-2-7B, the published exact count


@pytest.mark.parametrize("tp, ok", [(1, True), (3, True), (9, True), (2, False), (4, False)])
def test_tensor_parallel_must_split_smollm2_heads(tp, ok):
    arch = catalog.model("smollm2-135m-instruct").architecture  # 9 heads, 3 KV heads
    assert arch.valid_tensor_parallel(tp) is ok


def test_tensor_parallel_above_kv_heads_replicates_them():
    arch = catalog.model("llama-3.1-405b").architecture  # 128 heads, 8 KV heads
    assert arch.valid_tensor_parallel(16) and not arch.valid_tensor_parallel(12)
