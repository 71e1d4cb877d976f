"""The planner's decisions, as scenarios a platform engineer would ask about."""
from dataclasses import replace

import pytest

from runtime import catalog
from runtime.planner import GIB, Hardware, PlanRequest, plan, weights_per_device


def request(model_id, instance, quantization="none", **kw):
    model = catalog.model(model_id)
    return PlanRequest(architecture=model.architecture, hardware=Hardware.from_instance(instance),
                       model_id=model_id, quantization=quantization,
                       fp8_checkpoint=model.fp8_checkpoint, **kw)


def test_405b_bf16_does_not_fit_one_p4d_and_says_why_with_numbers():
    result = plan(request("llama-3.1-405b-instruct", "p4d.24xlarge", nodes=1))
    assert not result.fits
    assert any("per-GPU memory" in r and "GiB" in r for r in result.reasons)
    assert result.per_gpu_bytes.weights > result.per_gpu_bytes.capacity
    # Every suggestion really fits when planned again.
    assert result.suggestions
    for s in result.suggestions:
        again = plan(request("llama-3.1-405b-instruct", s.instance, s.quantization, nodes=s.nodes))
        assert again.fits, s
    costs = [s.cost_usd_per_hour for s in result.suggestions]
    assert costs == sorted(costs)


def test_405b_bf16_auto_spreads_over_two_p4de_nodes_with_pipeline_parallelism():
    result = plan(request("llama-3.1-405b-instruct", "p4de.24xlarge"))
    assert result.fits
    assert (result.nodes, result.tensor_parallel, result.pipeline_parallel) == (2, 8, 2)
    assert result.cost_usd_per_hour == pytest.approx(2 * 27.45)


def test_meta_fp8_405b_weights_per_gpu_match_vllms_measurement():
    """vLLM reported 57.75 GiB of weights per GPU for Meta's FP8 405B at TP 8 (vllm issue 6746)."""
    result = plan(request("llama-3.1-405b-instruct", "p5.48xlarge", "fp8", max_model_len=8192))
    assert result.fits and result.nodes == 1
    assert result.per_gpu_bytes.weights / GIB == pytest.approx(57.75, rel=0.03)


def test_fp8_checkpoint_keeps_attention_and_edge_blocks_in_bf16():
    req = request("llama-3.1-405b-instruct", "p5.48xlarge", "fp8")
    arch = req.architecture
    meta_ckpt = weights_per_device(arch, req, 8, 1)[0]
    every_linear = weights_per_device(arch, replace(req, fp8_checkpoint=None), 8, 1)[0]
    # Meta's checkpoint keeps, per rank, all attention weights and the two edge MLPs at 2 bytes:
    # one byte more per parameter than FP8 everywhere (row scales aside).
    attention_per_rank = 2 * 16384 * 16384 / 8 + 2 * 16384 * 128
    edge_mlps_per_rank = 2 * 3 * 16384 * 53248 / 8
    expected = 126 * attention_per_rank + edge_mlps_per_rank
    assert meta_ckpt - every_linear == pytest.approx(expected, rel=0.01)


def test_fp8_on_a100_is_weight_only_and_says_so():
    result = plan(request("llama-3.1-70b-instruct", "p4de.24xlarge", "fp8"))
    assert result.fits
    assert any("weight-only" in n for n in result.notes)


@pytest.mark.parametrize("tp, heads_per_rank", [(1, 8), (2, 4), (8, 1)])
def test_kv_heads_per_rank_never_below_one(tp, heads_per_rank):
    req = request("llama-3.1-405b", "p5.48xlarge", max_model_len=1000, concurrency=1, tensor=tp,
                  pipeline=1)
    result = plan(req, suggest=False)
    assert result.kv_bytes_per_token_per_gpu == 2 * 126 * heads_per_rank * 128 * 2


def test_tensor_parallel_beyond_kv_heads_replicates_kv_and_notes_it():
    hw = Hardware(accelerator=catalog.accelerator("h100-80gb"), devices_per_node=16)
    model = catalog.model("llama-3.1-405b")
    result = plan(PlanRequest(architecture=model.architecture, hardware=hw, tensor=16, pipeline=1,
                              max_model_len=1000, concurrency=1), suggest=False)
    assert result.kv_bytes_per_token_per_gpu == 2 * 126 * 1 * 128 * 2
    assert any("replicated" in n for n in result.notes)


def test_decode_floor_is_bytes_over_bandwidth():
    result = plan(request("llama-3.1-8b-instruct", "p5.48xlarge", tensor=1, max_model_len=1024,
                          concurrency=1), suggest=False)
    step = result.per_gpu_bytes.weights + result.per_gpu_bytes.kv_cache
    assert result.decode_ms_per_token_floor == pytest.approx(step / 3.35e12 * 1000)
    # ~16 GB of weights at 3.35 TB/s: about 4.8 ms per token.
    assert 4.5 < result.decode_ms_per_token_floor < 5.2
    assert result.cost_usd_per_million_tokens == pytest.approx(
        55.04 / (1000 / result.decode_ms_per_token_floor * 3600) * 1e6)


def test_context_too_large_for_memory_is_refused_even_though_weights_fit():
    result = plan(request("llama-3.1-70b-instruct", "p4d.24xlarge", nodes=1, max_model_len=131072,
                          concurrency=64))
    assert not result.fits
    assert any("KV cache" in r for r in result.reasons)
    assert result.max_kv_tokens < 131072 * 64


def test_a_model_that_fits_nowhere_has_no_suggestions():
    arch = catalog.model("llama-3.1-405b").architecture
    huge = arch.__class__(**{**arch.__dict__, "num_hidden_layers": 126 * 20})
    result = plan(PlanRequest(architecture=huge, hardware=Hardware.from_instance("p5.48xlarge")))
    assert not result.fits and result.suggestions == []
