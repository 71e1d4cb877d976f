"""Honest readiness under failure, and multi-node launches, with real processes."""
import concurrent.futures as futures
import os
import signal
import time

import httpx
import pytest
import torch

from tests.runtime.conftest import alive, free_port

pytestmark = pytest.mark.slow


def ready_status(url) -> tuple[int, dict]:
    r = httpx.get(f"{url}/health/ready", timeout=2)
    return r.status_code, r.json()


def test_killing_a_rank_flips_ready_fails_in_flight_and_recovers(tiny_model, serve):
    srv = serve("--model-dir", str(tiny_model), "--tp", "2", "--served-model-name", "tiny",
                "--max-model-len", "4096", "--canary-interval", "1")
    srv.wait_ready()
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 4000, "ignore_eos": True, "temperature": 0}
    with futures.ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(httpx.post, f"{srv.url}/v1/completions", json=body, timeout=60)
        time.sleep(1.0)
        assert not in_flight.done(), "the long request should still be generating"
        victim = srv.rank_pid(1)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        while ready_status(srv.url)[0] == 200:
            assert time.monotonic() - killed_at < 5, "still ready 5 s after a rank died"
            time.sleep(0.05)
        flipped_after = time.monotonic() - killed_at
        answer = in_flight.result(timeout=10)  # errors instead of hanging
    assert answer.status_code == 503, answer.text
    assert "engine_lost" == answer.json()["error"]["code"]
    status, health = ready_status(srv.url)
    assert status == 503 and health["reason"]
    print(f"ready flipped {flipped_after:.2f}s after the kill; reason: {health['reason']}")

    srv.wait_ready(timeout=120)
    assert ready_status(srv.url)[1]["restarts"] == 1
    ok = httpx.post(f"{srv.url}/v1/completions", json={**body, "max_tokens": 4}, timeout=30)
    assert ok.status_code == 200
    assert not alive(victim)


def test_requests_before_ready_get_503_with_the_reason(tiny_model, serve):
    srv = serve("--model-dir", str(tiny_model), "--tp", "2", "--served-model-name", "tiny")
    seen, refused = set(), 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            status, health = ready_status(srv.url)
        except httpx.TransportError:
            time.sleep(0.05)
            continue
        if status == 200:
            break
        seen.add(health["reason"])
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
        if r.status_code == 200:  # became ready between the probe and the request
            assert ready_status(srv.url)[0] == 200
            break
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        refused += 1
        time.sleep(0.05)
    assert refused > 0
    assert httpx.get(f"{srv.url}/health/live").status_code == 200
    assert any("rank" in reason or "loaded" in reason or "canary" in reason for reason in seen), seen


def test_two_node_launch_on_loopback_serves_the_same_tokens(tiny_model, serve):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    prompt = [5, 17, 99, 3]
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[0, len(prompt):].tolist()

    rdzv = f"127.0.0.1:{free_port()}"
    common = ["--model-dir", str(tiny_model), "--tp", "1", "--nnodes", "2", "--rdzv-endpoint", rdzv,
              "--node-addr", "127.0.0.1", "--served-model-name", "tiny"]
    head = serve(*common, "--role", "head", name="head")
    worker = serve(*common, "--role", "worker", name="worker")
    head.wait_ready(timeout=180)
    _, health = ready_status(head.url)
    assert health["world_size"] == 2 and health["ranks_loaded"] == 2
    r = httpx.post(f"{head.url}/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 16,
                                                        "temperature": 0, "ignore_eos": True,
                                                        "return_token_ids": True}, timeout=60)
    assert r.json()["choices"][0]["token_ids"] == ref
    assert worker.proc.poll() is None
