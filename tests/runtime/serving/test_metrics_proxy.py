"""herd's /metrics in front of an external engine (the vLLM path): one scrape target per node.

The engine is a real process: the small OpenAI-compatible server at the bottom of this file (run as
`python -m tests.runtime.serving.test_metrics_proxy`), which exposes vLLM-named metrics on its own /metrics
and generates with known delays, so herd's histograms can be checked against what the engine did, and
lists every /v1 request that reached it (GET /control), so herd's API key can be checked to stop the others.
herd's front is a real `herd serve --engine-cmd` process.
"""

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.runtime.conftest import free_port

FIRST_TOKEN_DELAY_S = 0.3     # the fake engine's prefill
TOKEN_DELAY_S = 0.05          # and its time per output token
PROMPT_TOKENS = 5             # what its usage reports for every prompt
KV_USAGE = 0.42
PREEMPTIONS = 7


# ------------------------------------------------------------------ helpers
def families(url: str, timeout: float = 10, headers: dict | None = None) -> dict:
    r = httpx.get(f"{url}/metrics", timeout=timeout, headers=headers)
    assert r.status_code == 200, r.text
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def value(fams: dict, sample: str, **labels) -> float:
    """The one sample with this name (and these labels); fails when absent or ambiguous."""
    found = [s.value for f in fams.values() for s in f.samples
             if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (sample, labels, found)
    return found[0]


def nvml_present() -> bool:
    try:
        import pynvml
        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount() > 0
    except Exception:  # noqa: BLE001 - any failure means no usable GPU on this host
        return False


@pytest.fixture(scope="module")
def front(serve_module, tmp_path_factory):
    """herd's front with the fake engine behind it; ready before the tests start."""
    state = tmp_path_factory.mktemp("fake-engine")
    engine_port = free_port()
    engine = [sys.executable, "-m", "tests.runtime.serving.test_metrics_proxy", "--port", str(engine_port),
              "--starts", str(state / "starts"), "--slow-restart-s", "120"]
    server = serve_module("--engine-cmd", shlex.join(engine), "--engine-url", f"http://127.0.0.1:{engine_port}",
                          "--served-model-name", "tiny", "--canary-interval", "5", name="front")
    server.wait_ready(timeout=60)
    server.engine_url = f"http://127.0.0.1:{engine_port}"
    return server


FRONT_KEY = "sk-front-test-key"


@pytest.fixture(scope="module")
def keyed_front(serve_module, tmp_path_factory):
    """The same, with herd's API key (from --api-key-env) in front of the engine, which has none."""
    state = tmp_path_factory.mktemp("fake-engine-keyed")
    engine_port = free_port()
    engine = [sys.executable, "-m", "tests.runtime.serving.test_metrics_proxy", "--port", str(engine_port),
              "--starts", str(state / "starts")]
    server = serve_module("--engine-cmd", shlex.join(engine), "--engine-url", f"http://127.0.0.1:{engine_port}",
                          "--served-model-name", "tiny", "--api-key-env", "HERD_TEST_FRONT_KEY",
                          env={"HERD_TEST_FRONT_KEY": FRONT_KEY}, name="keyed-front")
    server.wait_ready(timeout=60)     # /health/ready needs no key
    server.engine_url = f"http://127.0.0.1:{engine_port}"
    return server


def reached_engine(engine_url: str) -> list[dict]:
    """The /v1 requests the fake engine received, in order: path, Authorization header, prompt."""
    return httpx.get(f"{engine_url}/control", timeout=10).json()["seen"]


def requests_counted(fams: dict, route: str, status: str) -> float:
    """herd_requests_total for one route and status; 0 before the first such request."""
    return sum(s.value for s in fams["herd_requests"].samples
               if s.name == "herd_requests_total" and s.labels == {"route": route, "status": status})


# ------------------------------------------------------------------ tests
pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]   # real servers: 15-60 s here


def test_front_carries_the_engines_families_alongside_its_own(front):
    fams = families(front.url)
    # The engine's vLLM families, with the engine's values and labels, in the same exposition.
    assert value(fams, "vllm:kv_cache_usage_perc", model_name="tiny") == KV_USAGE
    assert value(fams, "vllm:num_preemptions_total", model_name="tiny") == PREEMPTIONS
    assert fams["vllm:time_to_first_token_seconds"].type == "histogram"
    assert value(fams, "vllm:num_requests_waiting", model_name="tiny") == 0
    # herd's own, once each: the engine's `herd_ready 0` (a name herd owns) is not relayed, nor are
    # its process_/python_ families (they describe the engine's process, not herd).
    assert value(fams, "herd_ready") == 1
    assert value(fams, "herd_engine_metrics_up") == 1
    assert value(fams, "herd_phase", phase="ready") == 1 and value(fams, "herd_phase", phase="loading") == 0
    assert value(fams, "herd_ranks_loaded") == value(fams, "herd_world_size") == 1
    assert not [n for n in fams if n.startswith(("process_", "python_"))], sorted(fams)
    engine_own = {f.name for f in text_string_to_metric_families(httpx.get(f"{front.engine_url}/metrics").text)}
    assert {"process_cpu_seconds", "herd_ready"} <= engine_own   # so the filtering above was exercised
    # No GPU here, so no GPU series (and no error); on a GPU host they would be there.
    gpu = [n for n in fams if n.startswith("herd_gpu_")]
    assert bool(gpu) == nvml_present(), gpu


def test_proxied_requests_fill_herds_request_histograms(front):
    before = families(front.url)
    n = 6
    body = {"model": "tiny", "prompt": "hello there", "max_tokens": n}
    # Streamed completion, and a streamed chat answer that reports its usage at the end.
    with httpx.stream("POST", f"{front.url}/v1/completions", json={**body, "stream": True}, timeout=30) as s:
        assert s.status_code == 200
        texts = [json.loads(line[6:])["choices"][0]["text"] for line in s.iter_lines()
                 if line.startswith("data: {")]
    assert "".join(texts) == "".join(f"t{i} " for i in range(n))
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": n, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{front.url}/v1/chat/completions", json=chat, timeout=30) as s:
        events = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and '"usage"' in events[-2]
    # Not streamed: the tokens come from the usage field.
    plain = httpx.post(f"{front.url}/v1/completions", json=body, timeout=30).json()
    assert plain["usage"]["completion_tokens"] == n
    # An engine error is relayed and fills nothing.
    assert httpx.post(f"{front.url}/v1/completions", json={**body, "model": "nope"}).status_code == 404
    after = families(front.url)

    def delta(sample: str) -> float:
        return value(after, sample) - value(before, sample)
    assert delta("herd_time_to_first_token_seconds_count") == 2           # the two streams
    # Each stream's first token left the engine 0.3 s after the request: the front cannot have seen it sooner.
    assert delta("herd_time_to_first_token_seconds_sum") >= 2 * FIRST_TOKEN_DELAY_S
    assert delta("herd_time_per_output_token_seconds_count") == 2 * (n - 1)
    # The gaps add up to first-to-last token time, whatever the network does with them.
    assert delta("herd_time_per_output_token_seconds_sum") >= 2 * (n - 1) * TOKEN_DELAY_S * 0.8
    assert delta("herd_request_latency_seconds_count") == 3
    assert delta("herd_request_latency_seconds_sum") >= 3 * (FIRST_TOKEN_DELAY_S + (n - 1) * TOKEN_DELAY_S)
    assert delta("herd_generated_tokens_total") == 3 * n
    assert delta("herd_prompt_tokens_total") == 2 * PROMPT_TOKENS            # the two answers with usage
    assert value(after, "herd_requests_total", route="/v1/{path:path}", status="404") >= 1


def test_herds_metrics_survive_a_hung_then_a_dead_engine(front):
    # The engine's /metrics hangs: herd answers after its short deadline, with its own metrics only.
    httpx.post(f"{front.engine_url}/control", json={"metrics_delay_s": 30}).raise_for_status()
    started = time.monotonic()
    fams = families(front.url, timeout=15)
    took = time.monotonic() - started
    assert took < 2 + 1.5, f"/metrics took {took:.1f}s with a hung engine (deadline 2 s)"
    assert value(fams, "herd_engine_metrics_up") == 0 and value(fams, "herd_ready") == 1
    assert not [n for n in fams if n.startswith("vllm:")]
    httpx.post(f"{front.engine_url}/control", json={"metrics_delay_s": 0}).raise_for_status()
    assert value(families(front.url), "herd_engine_metrics_up") == 1

    # The engine dies; its restart then loads for 2 minutes without listening (as vLLM does).
    httpx.post(f"{front.engine_url}/control", json={"exit": True})
    deadline = time.monotonic() + 15
    while True:
        fams = families(front.url)
        if value(fams, "herd_ready") == 0:
            break
        assert time.monotonic() < deadline, "herd still ready 15 s after its engine died"
        time.sleep(0.2)
    assert value(fams, "herd_engine_metrics_up") == 0
    assert not [n for n in fams if n.startswith("vllm:")]
    assert "herd_requests" in fams and "herd_time_to_first_token_seconds" in fams
    assert value(fams, "herd_phase", phase="ready") == 0


def test_the_api_key_keeps_requests_from_the_engine_and_metrics_count_what_was_forwarded(keyed_front):
    url, key = keyed_front.url, {"Authorization": f"Bearer {FRONT_KEY}"}
    # Health stays open (probes and load balancers carry no key); /metrics does not (the scrape sends it).
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/health/ready").json()["status"] == "ready"
    before = families(url, headers=key)
    already = len(reached_engine(keyed_front.engine_url))

    def completion(prompt: str, **kw) -> httpx.Response:
        return httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 3},
                          timeout=30, **kw)
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "streamed chat"}], "max_tokens": 3,
            "stream": True}
    refused = {
        "no key": completion("no key"),
        "a wrong key": completion("a wrong key", headers={"Authorization": "Bearer sk-wrong"}),
        "the key without Bearer": completion("the key without Bearer", headers={"Authorization": FRONT_KEY}),
        "a streamed chat without a key": httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=30),
        "the model list without a key": httpx.get(f"{url}/v1/models", timeout=30),
        "metrics without a key": httpx.get(f"{url}/metrics", timeout=30),
    }
    for what, r in refused.items():
        assert r.status_code == 401, (what, r.status_code, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key", what

    # With the key: forwarded (the key with it), answered by the engine.
    answered = completion("with the key", headers=key)
    assert answered.status_code == 200 and answered.json()["choices"][0]["text"] == "t0 t1 t2 "
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=chat, headers=key, timeout=30) as s:
        events = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert s.status_code == 200 and events[-1] == "data: [DONE]"
    assert "".join(json.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in events[1:-1]
                   if json.loads(e[6:])["choices"]) == "t0 t1 t2 "
    models = httpx.get(f"{url}/v1/models", headers=key, timeout=30)
    assert [m["id"] for m in models.json()["data"]] == ["tiny"]

    # What reached the engine: the three keyed requests, and none of the refused ones. (herd's own
    # canary, a one-token "Hello" without a key, goes straight to the engine: it is not counted here.)
    reached = [r for r in reached_engine(keyed_front.engine_url)[already:]
               if not (r["prompt"] == "Hello" and r["authorization"] is None)]
    assert reached == [
        {"path": "/v1/completions", "authorization": f"Bearer {FRONT_KEY}", "prompt": "with the key"},
        {"path": "/v1/chat/completions", "authorization": f"Bearer {FRONT_KEY}", "prompt": "streamed chat"},
        {"path": "/v1/models", "authorization": f"Bearer {FRONT_KEY}", "prompt": None},
    ]
    assert {r["authorization"] for r in reached_engine(keyed_front.engine_url)} <= {None, key["Authorization"]}

    # herd's /metrics counts each request by what herd answered, the refused ones included.
    after = families(url, headers=key)

    def delta(route: str, status: str) -> float:
        return requests_counted(after, route, status) - requests_counted(before, route, status)
    assert delta("/v1/{path:path}", "200") == 3
    assert delta("/v1/{path:path}", "401") == 5
    assert delta("/metrics", "401") == 1
    assert value(after, "herd_request_errors_total") - value(before, "herd_request_errors_total") == 6
    # The two generations the engine answered fill herd's histograms: 3 tokens each.
    assert value(after, "herd_generated_tokens_total") - value(before, "herd_generated_tokens_total") == 6
    assert (value(after, "herd_request_latency_seconds_count")
            - value(before, "herd_request_latency_seconds_count")) == 2
    assert (value(after, "herd_time_to_first_token_seconds_count")
            - value(before, "herd_time_to_first_token_seconds_count")) == 1   # the stream
    assert FRONT_KEY not in keyed_front.log_text()


# ------------------------------------------------------------------ the fake engine (a real process)
def fake_engine(port: int, starts: Path, slow_restart_s: float) -> None:
    """An OpenAI-compatible server with vLLM's metric names: deterministic text ("t0 t1 ..."), a
    0.3 s first token then 50 ms per token, usage with 5 prompt tokens. POST /control sets a delay
    on /metrics or exits; GET /control lists the /v1 requests that reached it. Every start after the first
    waits `slow_restart_s` before listening."""
    import asyncio
    import os

    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector,
                                   generate_latest)

    count = int(starts.read_text()) + 1 if starts.exists() else 1
    starts.write_text(str(count))
    if count > 1:
        time.sleep(slow_restart_s)

    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    labels = {"model_name": "tiny", "engine": "0"}
    gauge = lambda name: Gauge(name, name, list(labels), registry=registry).labels(**labels)  # noqa: E731
    running = gauge("vllm:num_requests_running")
    gauge("vllm:num_requests_waiting").set(0)
    gauge("vllm:kv_cache_usage_perc").set(KV_USAGE)
    Counter("vllm:num_preemptions", "preemptions", list(labels), registry=registry).labels(**labels).inc(PREEMPTIONS)
    generated = Counter("vllm:generation_tokens", "tokens", list(labels), registry=registry).labels(**labels)
    ttft = Histogram("vllm:time_to_first_token_seconds", "ttft", list(labels), registry=registry).labels(**labels)
    Gauge("herd_ready", "a name herd owns: must not be relayed", registry=registry).set(0)
    control = {"metrics_delay_s": 0.0}
    seen: list[dict] = []
    app = FastAPI()

    def reached(request: Request, body: dict | None) -> None:
        prompt = None
        if body is not None:
            prompt = body["messages"][-1]["content"] if "messages" in body else body.get("prompt")
        seen.append({"path": request.url.path, "authorization": request.headers.get("authorization"),
                     "prompt": prompt})

    @app.get("/v1/models")
    async def models(request: Request):
        reached(request, None)
        return {"object": "list", "data": [{"id": "tiny", "object": "model", "created": 0, "owned_by": "fake"}]}

    @app.get("/metrics")
    async def metrics():
        await asyncio.sleep(control["metrics_delay_s"])
        return PlainTextResponse(generate_latest(registry).decode())

    @app.post("/control")
    async def set_control(request: Request):
        body = await request.json()
        if body.get("exit"):
            asyncio.get_running_loop().call_later(0.05, os._exit, 3)
        control.update({k: v for k, v in body.items() if k == "metrics_delay_s"})
        return {"ok": True}

    @app.get("/control")
    async def requests_seen():
        return {"seen": seen}

    async def generate(request: Request, chat: bool):
        body = await request.json()
        reached(request, body)
        if body.get("model") != "tiny":
            return JSONResponse({"error": {"message": "no such model", "type": "NotFoundError"}}, 404)
        n = int(body.get("max_tokens") or 16)
        usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": n, "total_tokens": PROMPT_TOKENS + n}
        obj = "chat.completion" if chat else "text_completion"

        async def tokens():
            running.inc()
            try:
                await asyncio.sleep(FIRST_TOKEN_DELAY_S)
                ttft.observe(FIRST_TOKEN_DELAY_S)
                for i in range(n):
                    if i:
                        await asyncio.sleep(TOKEN_DELAY_S)
                    generated.inc()
                    yield f"t{i} "
            finally:
                running.dec()

        if not body.get("stream"):
            text = "".join([t async for t in tokens()])
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                      if chat else {"index": 0, "text": text, "finish_reason": "length"})
            return {"id": "x", "object": obj, "created": 0, "model": "tiny", "choices": [choice], "usage": usage}

        def event(choices, **extra) -> str:
            return "data: " + json.dumps({"id": "x", "object": obj + (".chunk" if chat else ""), "created": 0,
                                          "model": "tiny", "choices": choices, **extra}) + "\n\n"

        async def sse():
            if chat:
                yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            async for t in tokens():
                yield event([{"index": 0, "delta": {"content": t}, "finish_reason": None} if chat
                             else {"index": 0, "text": t, "finish_reason": None}])
            yield event([{"index": 0, "delta": {}, "finish_reason": "length"} if chat
                         else {"index": 0, "text": "", "finish_reason": "length"}])
            if (body.get("stream_options") or {}).get("include_usage"):
                yield event([], usage=usage)
            yield "data: [DONE]\n\n"
        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--starts", type=Path, required=True)
    parser.add_argument("--slow-restart-s", type=float, default=0)
    args = parser.parse_args()
    fake_engine(args.port, args.starts, args.slow_restart_s)
