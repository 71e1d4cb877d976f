"""The built-in engine on CUDA (`pytest -m gpu`, on a GPU machine; skipped without CUDA): rows decode on
the device their rank is placed on, greedy output is `generate`'s, sampling is reproducible per seed
and independent of what shares the batch, and the CUDA-graph static decode agrees with the dynamic one.
fp32 throughout, so tokens compare exactly."""
import json
import os
import subprocess
import sys

import pytest
import torch

from runtime.engine.decode import Row, decode_batch
from runtime.engine.placement import place_rank, visible_cuda_devices

from tests.conftest import ROOT

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

P1, P2, P3 = [5, 17, 99, 3, 42, 7], [11, 200, 8], [300]


@pytest.fixture(scope="module")
def gpu_model(tiny_model):
    from runtime.engine.worker import load_model
    placement = place_rank(cuda_devices=visible_cuda_devices(), local_rank=0, world=1)
    assert placement.device == "cuda:0" and placement.backend == "nccl"
    model = load_model(str(tiny_model), torch.float32, 1, placement.device)
    assert model.device.type == "cuda" and all(p.is_cuda for p in model.parameters())
    layer = model.model.layers[0]
    assert hasattr(layer.self_attn, "qkv_proj") and hasattr(layer.mlp, "gate_up_proj")   # fused on GPUs
    return model


def reference(model, prompt, n):
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


def sampled(seed, n=24, temperature=1.0, top_p=1.0, id="s"):
    return Row(P1, n, temperature=temperature, top_p=top_p, seed=seed, id=id)


def test_greedy_on_the_gpu_equals_generate_alone_batched_and_joining(gpu_model):
    refs = {"a": reference(gpu_model, P1, 12), "b": reference(gpu_model, P2, 9), "c": reference(gpu_model, P3, 20)}
    assert decode_batch(gpu_model, [Row(P1, 12, id="a")]) == {"a": refs["a"]}
    assert decode_batch(gpu_model, [Row(P1, 12, id="a"), Row(P2, 9, id="b"), Row(P3, 20, id="c")]) == refs
    joined = decode_batch(gpu_model, [Row(P1, 12, id="a")], arrivals={3: [Row(P2, 9, id="b"), Row(P3, 20, id="c")]})
    assert joined == refs


def test_sampling_on_the_gpu_repeats_per_seed_and_ignores_its_neighbours(gpu_model):
    greedy = decode_batch(gpu_model, [Row(P1, 24, id="s")])["s"]
    first = decode_batch(gpu_model, [sampled(7)])["s"]
    again = decode_batch(gpu_model, [sampled(7)])["s"]
    other = decode_batch(gpu_model, [sampled(8)])["s"]
    crowded = decode_batch(gpu_model, [Row(P2, 24, id="g"), sampled(7), sampled(99, id="t")])["s"]
    assert first == again == crowded
    assert first != other and first != greedy
    narrow = decode_batch(gpu_model, [sampled(7, top_p=1e-6)])["s"]
    assert narrow == greedy            # a nucleus that holds only the top token is greedy
    cold = decode_batch(gpu_model, [sampled(7, temperature=1e-39)])["s"]
    assert cold == greedy              # below the temperature floor: greedy, never NaN


def test_logprobs_come_from_the_device_and_match_a_host_computation(gpu_model):
    events = []
    decode_batch(gpu_model, [Row(P1, 4, logprobs=3, id="a")], on_step=lambda ev: events.extend(ev) or set())
    ids = torch.tensor([P1], device=gpu_model.device)
    with torch.inference_mode():
        logits = gpu_model(input_ids=ids).logits[0, -1].float().cpu()
    host = torch.log_softmax(logits, -1)
    _, token, _, (logprob, top) = events[0]
    assert token == int(host.argmax()) and abs(logprob - float(host[token])) < 1e-4
    assert [i for i, _ in top] == host.topk(3).indices.tolist()


def test_cuda_graph_static_decode_agrees_with_dynamic_decode(gpu_model):
    from runtime.engine.static_batch import StaticBatch
    rows = lambda: [Row(P1, 12, id="a"), Row(P2, 9, id="b"), sampled(5, n=10, id="s")]  # noqa: E731
    dynamic = decode_batch(gpu_model, rows())
    static = StaticBatch(gpu_model, max_len=64)
    assert static.compiled                     # CUDA: the decode step runs as captured graphs
    from runtime.engine.attention import uses_grouped_decode_attention
    assert uses_grouped_decode_attention(gpu_model)   # and reads each KV head once
    assert decode_batch(gpu_model, rows(), batch=static) == dynamic
    assert decode_batch(gpu_model, rows(), batch=static) == dynamic   # replayed graphs, reused cache


@pytest.mark.parametrize("tp", [1, 2])
def test_tensor_parallel_ranks_on_their_own_gpus_decode_what_one_gpu_decodes(gpu_model, tiny_model, tmp_path, tp):
    if visible_cuda_devices() < tp:
        pytest.skip(f"TP {tp} needs {tp} GPUs; this machine has {visible_cuda_devices()}")
    from tests.runtime.tp_decode import rows
    out = tmp_path / f"tp{tp}.json"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(tp), "tests/runtime/tp_decode.py", str(tiny_model), str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert (result["device"], result["backend"]) == ("cuda:0", "nccl")
    alone = decode_batch(gpu_model, rows())
    assert result["tokens"] == alone


def graph_launches(fn) -> dict[str, int]:
    """CPU-side launch calls while `fn` runs: a replayed CUDA graph shows as cudaGraphLaunch alone."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
        torch.cuda.synchronize()
    counts = {e.key: e.count for e in prof.key_averages()}
    return {"graph": counts.get("cudaGraphLaunch", 0),
            "kernels": sum(n for k, n in counts.items() if k in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx",
                                                                   "cudaLaunchKernelExC"))}


def grouped_decode_inputs(rows, length, dtype, heads=8, group=4, dim=128):
    torch.manual_seed(0)
    q = torch.randn(rows, heads, group, dim, device="cuda", dtype=dtype)
    k, v = (torch.randn(rows, heads, length, dim, device="cuda", dtype=dtype) for _ in range(2))
    mask = torch.zeros(rows, 1, 1, length, dtype=torch.bool, device="cuda")
    mask[0, ..., :] = True
    mask[1 % rows, ..., length // 3:] = True              # left padding
    mask[2 % rows, ..., : length - length // 4] = True    # the unused end of a static cache
    return q, k, v, mask


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("rows,length", [(3, 64), (3, 640), (3, 4099), (1, 32768), (32, 640)])
def test_split_cache_decode_attention_matches_sdpa(dtype, tol, rows, length):
    import torch.nn.functional as F

    from runtime.engine import split_kv_attention
    assert split_kv_attention.available()
    q, k, v, mask = grouped_decode_inputs(rows, length, dtype)
    out = split_kv_attention.decode(q, k, v, mask, q.shape[-1] ** -0.5)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    assert out.dtype == dtype and (out.float() - ref).abs().max().item() < tol


def test_split_cache_decode_attention_replays_inside_a_cuda_graph():
    from runtime.engine import split_kv_attention
    q, k, v, mask = grouped_decode_inputs(3, 640, torch.bfloat16)
    eager = split_kv_attention.decode(q, k, v, mask, 128 ** -0.5)
    step = torch.compile(lambda q, k, v, m: split_kv_attention.decode(q, k, v, m, 128 ** -0.5),
                         mode="reduce-overhead", fullgraph=True)
    for _ in range(3):   # warm-up, record, replay
        step(q, k, v, mask)
    assert graph_launches(lambda: step(q, k, v, mask))["graph"] >= 1
    torch.testing.assert_close(step(q, k, v, mask).clone(), eager)


def test_the_decode_step_replays_as_one_cuda_graph(gpu_model):
    from runtime.engine.static_batch import StaticBatch
    static = StaticBatch(gpu_model, max_len=64)
    rows = [Row(P1, 12, id="a"), Row(P2, 9, id="b")]
    with torch.inference_mode():
        static.join(rows)
        for _ in range(3):
            static.step([1, 1])
        launches = graph_launches(lambda: static.step([1, 1]))
    # One graph per step: the model's hundreds of kernels are in it (what launches alone is the
    # step's mask and position updates and the graph's input copies).
    assert launches["graph"] == 1 and launches["kernels"] < 16, launches
