"""The planner's decisions, as scenarios a platform engineer would ask about.

Expected values come from published figures, not from the planner: parameter counts and architectures
from Meta's config.json files (Llama 3.1 8B / 70B / 405B: 8.03 / 70.55 / 405.85 B parameters; 32 / 80 /
126 layers; 8 KV heads of 128 dimensions), Meta's stated GPU needs for 405B, vLLM's measured 57.75 GiB
per GPU for the FP8 405B at TP 8, NVIDIA's HBM bandwidths and AWS's instance specifications.
"""
import re
from dataclasses import replace

import pytest

from runtime.planning import catalog
from runtime.planning.planner import (FETCH_GBPS_CAP, GB, GIB, LOAD_BYTES_PER_S, Hardware, PlanRequest, plan,
                             weights_per_device)

# Published parameter counts (Meta's model cards / config.json), in parameters.
PARAMS = {"llama-3.1-8b": 8.03e9, "llama-3.1-70b": 70.55e9, "llama-3.1-405b": 405.85e9}
# Published architectures: (layers, KV heads, head dim).
KV_SHAPE = {"llama-3.1-8b": (32, 8, 128), "llama-3.1-70b": (80, 8, 128), "llama-3.1-405b": (126, 8, 128)}
BF16 = 2


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
    # One step reads every weight once (8.03 B x 2 bytes) and the KV cache of 1024 tokens
    # (2 x 32 layers x 8 KV heads x 128 x 2 bytes per token), at the H100 SXM's 3.35 TB/s.
    layers, kv_heads, head_dim = KV_SHAPE["llama-3.1-8b"]
    step_bytes = PARAMS["llama-3.1-8b"] * BF16 + 1024 * 2 * layers * kv_heads * head_dim * BF16
    floor_ms = step_bytes / 3.35e12 * 1000          # about 4.83 ms
    assert result.decode_ms_per_token_floor == pytest.approx(floor_ms, rel=0.005)
    # p5.48xlarge on demand: $55.04/h for the whole instance, one token per floor.
    assert result.cost_usd_per_hour == pytest.approx(55.04)
    assert result.cost_usd_per_million_tokens == pytest.approx(55.04 / (1000 / floor_ms * 3600) * 1e6, rel=0.005)


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


# ---------------------------------------------------------------- published sizes
@pytest.mark.parametrize("model_id", sorted(PARAMS))
def test_bf16_checkpoint_size_is_two_bytes_per_published_parameter(model_id):
    result = plan(request(model_id, "p5.48xlarge", tensor=1, pipeline=1, nodes=1, max_model_len=1024,
                          concurrency=1), suggest=False)
    assert result.weights_total_bytes == pytest.approx(PARAMS[model_id] * BF16, rel=0.005)


@pytest.mark.parametrize("model_id", sorted(KV_SHAPE))
@pytest.mark.parametrize("tp, pp", [(1, 1), (8, 1), (8, 2)])
def test_kv_bytes_per_token_follow_the_published_architecture(model_id, tp, pp):
    """2 (K and V) x layers on the stage x KV heads on the rank x head dim x 2 bytes (BF16)."""
    layers, kv_heads, head_dim = KV_SHAPE[model_id]
    hw = Hardware(accelerator=catalog.accelerator("h200-141gb"), devices_per_node=8, max_nodes=2)
    result = plan(PlanRequest(architecture=catalog.model(model_id).architecture, hardware=hw, tensor=tp,
                              pipeline=pp, max_model_len=1024, concurrency=1), suggest=False)
    # Uneven stages: the heaviest holds the rounded-up share of layers (126 / 2 = 63, 32 / 2 = 16).
    stage_layers = -(-layers // pp)
    assert result.kv_bytes_per_token_per_gpu == 2 * stage_layers * (kv_heads // tp) * head_dim * BF16
    if (tp, pp) == (1, 1):   # the whole model's figure: 8B 128 KiB, 70B 320 KiB, 405B 504 KiB per token
        assert result.kv_bytes_per_token_per_gpu == {"llama-3.1-8b": 131_072, "llama-3.1-70b": 327_680,
                                                     "llama-3.1-405b": 516_096}[model_id]


def test_meta_stated_needs_for_405b():
    """Meta: 405B in BF16 needs 16 GPUs x 70 GB or 8 x 120 GB; in FP8 8 x 70 GB."""
    one_p5 = plan(request("llama-3.1-405b-instruct", "p5.48xlarge", nodes=1), suggest=False)  # 8 x 80 GB
    assert not one_p5.fits and any("per-GPU memory" in r for r in one_p5.reasons)
    # BF16 weights alone over 8 GPUs: 405.85 B x 2 / 8 = 101.5 GB each, above an H100's 80 GB.
    assert one_p5.per_gpu_bytes.weights == pytest.approx(PARAMS["llama-3.1-405b"] * BF16 / 8, rel=0.01)
    one_p5en = plan(request("llama-3.1-405b-instruct", "p5en.48xlarge", nodes=1), suggest=False)  # 8 x 141 GB
    assert one_p5en.fits, one_p5en.reasons
    two_p5 = plan(request("llama-3.1-405b-instruct", "p5.48xlarge"), suggest=False)  # 16 x 80 GB
    assert two_p5.fits and (two_p5.nodes, two_p5.tensor_parallel * two_p5.pipeline_parallel) == (2, 16)
    # Over 16 GPUs each holds 1/16 of the BF16 weights, within Meta's 70 GB per GPU.
    assert two_p5.per_gpu_bytes.weights == pytest.approx(PARAMS["llama-3.1-405b"] * BF16 / 16, rel=0.01)
    assert two_p5.per_gpu_bytes.weights < 70 * GB
    fp8 = plan(request("llama-3.1-405b-instruct", "p5.48xlarge", "fp8", nodes=1), suggest=False)
    assert fp8.fits and fp8.per_gpu_bytes.weights < 70 * GB


# ---------------------------------------------------------------- host RAM and local disk
H100 = catalog.accelerator("h100-80gb")
LLAMA_70B = catalog.model("llama-3.1-70b-instruct").architecture
BF16_70B_BYTES = PARAMS["llama-3.1-70b"] * BF16          # 141.1 GB = 131.4 GiB


def plan_70b_on(host_ram_gib=None, disk_gib=None, **kw):
    hw = Hardware(accelerator=H100, devices_per_node=8, max_nodes=1,
                  host_ram_bytes=int(host_ram_gib * GIB) if host_ram_gib else None,
                  disk_bytes=int(disk_gib * GIB) if disk_gib else None, **kw)
    return plan(PlanRequest(architecture=LLAMA_70B, hardware=hw, model_id="llama-3.1-70b-instruct", tensor=8,
                            max_model_len=8192, concurrency=4), suggest=False)


def test_weights_beyond_host_ram_are_refused_naming_ram_and_both_sizes():
    """A node stages its shards in host RAM while loading: 70B BF16 (131 GiB on the node) needs more
    than a 128 GiB host has, though each H100 holds its 16 GiB shard easily."""
    small = plan_70b_on(host_ram_gib=128)
    assert not small.fits
    (reason,) = small.reasons                            # RAM is the only thing wrong
    assert reason.startswith("host RAM"), reason
    loads, ram = map(float, re.search(r"loads (\d+) GiB of weights.* its (\d+) GiB RAM", reason).groups())
    assert loads == pytest.approx(BF16_70B_BYTES / GIB, abs=1) and ram == 128
    assert small.per_gpu_bytes.total < small.per_gpu_bytes.capacity
    # Enough RAM for the weights with a tenth to spare: the same plan fits.
    assert plan_70b_on(host_ram_gib=1024).fits


def test_a_disk_smaller_than_the_checkpoint_is_refused_naming_disk_and_both_sizes():
    small = plan_70b_on(host_ram_gib=1024, disk_gib=100)
    assert not small.fits
    (reason,) = small.reasons
    assert reason.startswith("local disk"), reason
    ckpt, disk = map(float, re.search(r"checkpoint is (\d+) GB, the node has (\d+) GB", reason).groups())
    assert ckpt == pytest.approx(BF16_70B_BYTES / GB, abs=1)
    assert disk == pytest.approx(100 * GIB / GB, abs=1)          # 100 GiB = 107 GB
    assert plan_70b_on(host_ram_gib=1024, disk_gib=200).fits     # 215 GB holds 141 GB


def test_an_onprem_spec_with_too_little_ram_and_disk_is_refused_for_both():
    from runtime.planning.plan_spec import request_from_spec
    from runtime.planning.spec import load_spec
    from tests.conftest import ROOT
    spec = load_spec(ROOT / "environments" / "onprem-example.yaml")
    small = spec.model_copy(update={"onprem": spec.onprem.model_copy(update={"host_ram_gib": 64, "disk_gib": 64})})
    result = plan(request_from_spec(small), suggest=False)
    assert not result.fits
    assert [r.split(":")[0] for r in result.reasons] == ["host RAM", "local disk"], result.reasons
    assert "64 GiB RAM" in result.reasons[0] and "the node has 69 GB" in result.reasons[1]   # 64 GiB = 68.7 GB


# ---------------------------------------------------------------- cold start
def expected_cold_start(fetch_bytes, load_bytes, network_gbps):
    """Each node pulls the whole checkpoint at its network rate, capped at FETCH_GBPS_CAP, then loads its
    own shards into device memory at LOAD_BYTES_PER_S."""
    rate = min(network_gbps, FETCH_GBPS_CAP) * 1e9 / 8
    return fetch_bytes / rate + load_bytes / LOAD_BYTES_PER_S


def test_cold_start_is_fetch_plus_load_of_the_published_weight_size():
    w = PARAMS["llama-3.1-8b"] * BF16                   # 16.06 GB
    result = plan(request("llama-3.1-8b-instruct", "p5.48xlarge", tensor=1), suggest=False)
    # p5.48xlarge: 3200 Gbps, above the per-host fetch cap.
    assert result.cold_start_s == pytest.approx(expected_cold_start(w, w, 3200), rel=0.005)
    assert result.cold_start_s == pytest.approx(w / (FETCH_GBPS_CAP * 1e9 / 8) + w / LOAD_BYTES_PER_S, rel=0.005)


def test_cold_start_of_two_pipeline_stages_fetches_everything_and_loads_half():
    w = PARAMS["llama-3.1-405b"] * BF16                 # 811.7 GB; each p4de node loads one stage
    result = plan(request("llama-3.1-405b-instruct", "p4de.24xlarge"), suggest=False)
    assert (result.nodes, result.pipeline_parallel) == (2, 2)
    assert result.cold_start_s == pytest.approx(expected_cold_start(w, w / 2, 400), rel=0.01)


def test_cold_start_grows_when_the_network_is_slower_than_the_cap():
    w = PARAMS["llama-3.1-70b"] * BF16
    times = {}
    for gbps in (3200, FETCH_GBPS_CAP, 25, 10):
        times[gbps] = plan_70b_on(network_gbps=gbps).cold_start_s
        assert times[gbps] == pytest.approx(expected_cold_start(w, w, gbps), rel=0.005), gbps
    assert times[3200] == pytest.approx(times[FETCH_GBPS_CAP])        # above the cap: no faster
    assert times[3200] < times[25] < times[10]
    assert times[10] - times[25] == pytest.approx(w / (10e9 / 8) - w / (25e9 / 8), rel=0.005)
    # Unknown network (on-prem): the cap.
    assert plan_70b_on().cold_start_s == pytest.approx(times[FETCH_GBPS_CAP])
