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
