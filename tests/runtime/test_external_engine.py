"""herd's front before an engine in its own process (the vLLM path), with a real stand-in engine:
herd's own server on a tiny model, started by the sidecar as its engine command."""
import json
import os
import shlex
import signal
import sys
import time

import httpx
import pytest

from tests.runtime.conftest import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]   # a fake engine restarted under herd: 100-150 s under load


def engine_pid(state_dir) -> int:
    """The stand-in engine writes its own pid file (it is `herd serve` too)."""
    return int((state_dir / "engine-serve.pid").read_text())


def test_front_is_ready_only_after_the_canary_and_survives_an_engine_death(tiny_model, serve, tmp_path):
    engine_port = free_port()
    engine_state = tmp_path / "engine"
    engine_state.mkdir()
    stand_in = [sys.executable, "-c",
                # a wrapper that records its pid, waits 2 s (vLLM loads before it listens), then serves
                "import os,sys,time,runpy; open(sys.argv[1],'w').write(str(os.getpid())); time.sleep(2); "
                "sys.argv=['herd']+sys.argv[2:]; runpy.run_module('infra.cli', run_name='__main__')",
                str(engine_state / "engine-serve.pid"), "serve", "--model-dir", str(tiny_model),
                "--port", str(engine_port), "--served-model-name", "tiny", "--state-dir", str(engine_state),
                "--canary-interval", "1"]
    front = serve("--engine-cmd", shlex.join(stand_in), "--engine-url", f"http://127.0.0.1:{engine_port}",
                  "--served-model-name", "tiny", "--canary-interval", "1", name="front")
    # While the engine does not listen: live, not ready, API refused with the reason.
    seen_not_ready = False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{front.url}/health/ready", timeout=2)
        except httpx.TransportError:
            time.sleep(0.1)
            continue
        if r.status_code == 200:
            break
        seen_not_ready = True
        assert "engine" in r.json()["reason"] or "canary" in r.json()["reason"]
        api = httpx.post(f"{front.url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 1})
        if api.status_code != 200:
            assert api.status_code == 503 and api.json()["error"]["code"] == "not_ready"
        time.sleep(0.1)
    assert seen_not_ready and r.status_code == 200
    assert r.json()["last_canary_seconds"] is not None

    # The OpenAI API passes through, streaming included.
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    via_front = httpx.post(f"{front.url}/v1/completions", json=body, timeout=60).json()
    direct = httpx.post(f"http://127.0.0.1:{engine_port}/v1/completions", json=body, timeout=60).json()
    assert via_front["choices"][0]["token_ids"] == direct["choices"][0]["token_ids"]
    with httpx.stream("POST", f"{front.url}/v1/completions", json={**body, "stream": True}, timeout=60) as s:
        events = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) > 2

    # The engine dies: not ready within 5 s, then restarted and ready again.
    os.kill(engine_pid(engine_state), signal.SIGKILL)
    killed = time.monotonic()
    while httpx.get(f"{front.url}/health/ready").status_code == 200:
        assert time.monotonic() - killed < 5, "front still ready 5 s after the engine died"
        time.sleep(0.05)
    refused = httpx.post(f"{front.url}/v1/completions", json=body)
    assert refused.status_code == 503
    front.wait_ready(timeout=120)
    assert httpx.get(f"{front.url}/health/ready").json()["restarts"] >= 1
    assert httpx.post(f"{front.url}/v1/completions", json=body, timeout=60).status_code == 200
