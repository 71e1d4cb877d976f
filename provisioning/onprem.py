"""The on-prem installer: bare hosts to a serving, health-checked cluster, over SSH.

`herd up environments/onprem-*.yaml` connects to every host in parallel (paramiko, TCP_NODELAY), checks
each host key against known_hosts (unknown or changed keys are refused unless --trust-new-hosts is
given, and a changed key is refused even then), uploads what the hosts cannot fetch themselves (the
steps, herd's wheels, the weights, the API key as a 0600 file), runs the steps with prefixed logs and
resumable stamps, starts the runtime on every host (the first is the head and the rendezvous), waits
for readiness and runs the smoke test through the head.
"""
from __future__ import annotations

import concurrent.futures as futures
import hashlib
import os
import shlex
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from rich.console import Console

from provisioning.bundle import wheel_bundle
from provisioning.steps import STEPS_DIR, HostSteps, plan_host, profiles_for
from provisioning.weights import fetch
from provisioning.weights.manifest import sha256_of
from runtime.errors import UserError
from runtime.paths import model_dir_for
from runtime.plan_spec import request_from_spec
from runtime.planner import plan
from runtime.serve import read_api_key
from runtime.spec import OnpremHost, Spec

RDZV_PORT = 29400


class HostError(Exception):
    """A failure on one host; the message names the host."""


# ------------------------------------------------------------------ SSH
class TrustOnFirstUse:
    """Accept a host never seen before and record it (only with --trust-new-hosts). A key that
    differs from a recorded one never reaches this policy: paramiko raises BadHostKeyException."""

    def __init__(self, known_hosts: Path, console: Console):
        self.known_hosts, self.console = known_hosts, console
        self.lock = threading.Lock()

    def missing_host_key(self, client, hostname, key):
        with self.lock:
            client.get_host_keys().add(hostname, key.get_name(), key)
            self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
            with open(self.known_hosts, "a") as f:
                f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        fingerprint = hashlib.sha256(key.asbytes()).hexdigest()[:32]
        self.console.print(f"[yellow]{hostname}: trusted new host key {key.get_name()} SHA256:{fingerprint}... "
                           f"(recorded in {self.known_hosts})[/]")


class Host:
    """One SSH connection; commands stream their output prefixed with the host's name."""

    def __init__(self, spec_host: OnpremHost, key: Path, known_hosts: Path, trust_new: bool, console: Console):
        import paramiko
        self.name = spec_host.address
        self.console = console
        client = paramiko.SSHClient()
        if known_hosts.exists():
            client.load_host_keys(str(known_hosts))
        client.set_missing_host_key_policy(TrustOnFirstUse(known_hosts, console) if trust_new
                                           else paramiko.RejectPolicy())
        try:
            sock = socket.create_connection((spec_host.address, spec_host.port), timeout=10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # ~40 ms saved per request
            client.connect(spec_host.address, spec_host.port, username=spec_host.user, key_filename=str(key),
                           sock=sock, look_for_keys=False, allow_agent=False, timeout=10, auth_timeout=15,
                           banner_timeout=15)
        except OSError as err:
            raise HostError(f"{self.name}: unreachable on port {spec_host.port} ({err.strerror or err})") from None
        except paramiko.BadHostKeyException as err:
            raise HostError(f"{self.name}: HOST KEY CHANGED (now {err.key.get_name()}); refusing to connect: "
                            f"someone may be intercepting, or the host was reinstalled. If you know it was, "
                            f"remove its line from {known_hosts} (ssh-keygen -R {self.name}) and verify "
                            "the new fingerprint") from None
        except paramiko.AuthenticationException:
            raise HostError(f"{self.name}: the key {key} was refused for user {spec_host.user}") from None
        except paramiko.SSHException as err:
            if "not found in known_hosts" in str(err):
                raise HostError(f"{self.name}: unknown host key: add it to {known_hosts} after checking its "
                                "fingerprint (ssh-keyscan), or rerun with --trust-new-hosts") from None
            raise HostError(f"{self.name}: SSH failed: {err}") from None
        self.client = client
        self.sftp = client.open_sftp()

    def run(self, command: str, check: bool = True, quiet: bool = False) -> tuple[int, str]:
        _, stdout, stderr = self.client.exec_command(command)
        lines = []
        for line in iter(stdout.readline, ""):
            lines.append(line)
            if not quiet:
                self.console.print(f"[cyan]{self.name}[/] | {line.rstrip()}", highlight=False)
        err = stderr.read().decode(errors="replace")
        code = stdout.channel.recv_exit_status()
        if err and not quiet:
            for line in err.rstrip().splitlines():
                self.console.print(f"[cyan]{self.name}[/] | [red]{line}[/]", highlight=False)
        if check and code != 0:
            last = (err.strip().splitlines() or lines or ["(no output)"])[-1].strip()
            raise HostError(f"{self.name}: `{command[:80]}` failed ({code}): {last}")
        return code, "".join(lines)

    def upload_dir(self, local: Path, remote: str, stats: dict) -> None:
        """Put every file of `local` under `remote`, skipping files already there with the same sha256."""
        self.run(f"mkdir -p {shlex.quote(remote)}", quiet=True)
        _, listing = self.run(f"cd {shlex.quote(remote)} && sha256sum -- * 2>/dev/null || true", check=False,
                              quiet=True)
        present = {line.split(None, 1)[1].strip().lstrip("*"): line.split()[0]
                   for line in listing.splitlines() if line.strip()}
        for path in sorted(p for p in local.iterdir() if p.is_file()):
            if present.get(path.name) == _sha(path):
                stats["skipped"] += path.stat().st_size
                continue
            tmp = f"{remote}/.{path.name}.part"
            self.sftp.put(str(path), tmp)
            self.sftp.posix_rename(tmp, f"{remote}/{path.name}")  # never a half file under the real name
            stats["uploaded"] += path.stat().st_size

    def write_secret(self, remote: str, value: str) -> None:
        self.run(f"mkdir -p -m 700 {shlex.quote(os.path.dirname(remote))}", quiet=True)
        with self.sftp.open(remote, "w") as f:
            f.chmod(0o600)
            f.write(value)

    def close(self) -> None:
        self.client.close()


_sha_cache: dict[tuple, str] = {}


def _sha(path: Path) -> str:
    key = (str(path), path.stat().st_size, path.stat().st_mtime_ns)
    if key not in _sha_cache:
        _sha_cache[key] = sha256_of(path)
    return _sha_cache[key]


@dataclass
class HostResult:
    name: str
    uploaded: int = 0
    skipped_bytes: int = 0
    steps_run: int = 0
    steps_skipped: int = 0
    started: bool = False


class Installer:
    def __init__(self, spec: Spec, env_path: str, console: Console, trust_new_hosts: bool = False):
        if spec.target != "onprem":
            raise UserError(f"target: {spec.target!r}: the on-prem installer needs target onprem")
        self.spec, self.env_path, self.console = spec, Path(env_path), console
        self.trust_new = trust_new_hosts
        section = spec.onprem
        self.key = Path(section.ssh_key).expanduser()
        self.known_hosts = Path(section.known_hosts).expanduser()
        if not self.key.is_file():
            raise UserError(f"onprem.ssh_key: {section.ssh_key!r}: no such file")
        self.home = section.install_dir
        self.plan = plan(request_from_spec(spec))
        self.api_key: str | None = None   # read by install(): status and down need no key

    @property
    def hosts(self) -> list[OnpremHost]:
        return self.spec.onprem.hosts[:self.plan.nodes]

    def endpoint(self) -> str:
        return f"http://{self.hosts[0].address}:{self.spec.serving.port}"

    @staticmethod
    def _on_every_host(fn, *per_host_args) -> tuple[list, list[str]]:
        """Run fn on every host at once; (results in host order, one error line per failed host)."""
        calls = list(zip(*per_host_args))
        with futures.ThreadPoolExecutor(len(calls)) as pool:
            jobs = [pool.submit(fn, *args) for args in calls]
            results, errors = [], []
            for job in jobs:
                try:
                    results.append(job.result())
                except HostError as err:
                    errors.append(str(err))
        return results, errors

    def _connect_all(self) -> list[Host]:
        n = len(self.hosts)
        results, errors = self._on_every_host(Host, self.hosts, [self.key] * n, [self.known_hosts] * n,
                                              [self.trust_new] * n, [self.console] * n)
        if errors:
            for host in results:
                host.close()
            raise UserError("; ".join(errors))
        return results

    def install(self) -> list[HostResult]:
        if not self.plan.fits:
            raise UserError("the plan does not fit: " + "; ".join(self.plan.reasons))
        self.api_key = read_api_key(self.spec.serving.api_key_env, self.spec.serving.api_key_file)
        model_dir = model_dir_for(self.spec.model.id)
        source = self.spec.model.source or ""
        if source and not source.startswith(("file:", "/")):
            fetch(source, model_dir)               # here, once; the hosts get the verified copy
        else:
            model_dir = Path(source.removeprefix("file://"))
        bundle = wheel_bundle(self.console)
        hosts = self._connect_all()
        remote_model = f"{self.home}/models/{self.spec.model.id}"
        # Each host's steps and serve arguments, decided once for both the install and the start.
        host_steps = [plan_host(self.spec, self.plan, profile, self.hosts[0].address, remote_model, None,
                                f"{self.home}/environment.yaml")
                      for profile in profiles_for(self.spec, self.plan)]
        n = len(hosts)
        try:
            results, errors = self._on_every_host(self._install_host, hosts, host_steps, [bundle] * n,
                                                  [model_dir] * n, [remote_model] * n)
            if errors:
                raise UserError("; ".join(sorted(errors)) + " (the other hosts are left consistent; "
                                "rerun `herd up` to resume)")
            started = self._start_all(hosts, host_steps)
            for r in results:
                r.started = r.name in started
            return sorted(results, key=lambda r: r.name)
        finally:
            for host in hosts:
                host.close()

    def _install_host(self, host: Host, steps: HostSteps, bundle: Path, model_dir: Path,
                      remote_model: str) -> HostResult:
        import paramiko
        try:
            return self._install_host_steps(host, steps, bundle, model_dir, remote_model)
        except (paramiko.SSHException, OSError, EOFError) as err:
            raise HostError(f"{host.name}: connection lost during the install ({type(err).__name__}: "
                            f"{err}); its finished steps are recorded") from None

    def _install_host_steps(self, host: Host, steps: HostSteps, bundle: Path, model_dir: Path,
                            remote_model: str) -> HostResult:
        result = HostResult(host.name)
        stats = {"uploaded": 0, "skipped": 0}
        host.upload_dir(STEPS_DIR, f"{self.home}/steps", stats)
        host.upload_dir(bundle, f"{self.home}/wheels", stats)
        host.upload_dir(model_dir, remote_model, stats)
        host.sftp.put(str(self.env_path), f"{self.home}/environment.yaml")
        if self.api_key:
            host.write_secret(f"{self.home}/secrets/api-key", self.api_key)
        result.uploaded, result.skipped_bytes = stats["uploaded"], stats["skipped"]
        for step, why in steps.skipped.items():
            host.console.print(f"[cyan]{host.name}[/] | {step}: skip: {why}", highlight=False)
        host.run(f"mkdir -p {self.home}/state/steps", quiet=True)
        for step in steps.steps:
            stamp_file = f"{self.home}/state/steps/{step}.done"
            stamp = steps.stamp(step)
            _, current = host.run(f"cat {stamp_file} 2>/dev/null || true", check=False, quiet=True)
            if current.strip() == stamp:
                result.steps_skipped += 1
                continue
            host.run(steps.command(step, f"{self.home}/steps"))
            host.run(f"echo {stamp} > {stamp_file}", quiet=True)
            result.steps_run += 1
        return result

    # ---------------------------------------------------------------- the runtime
    def _serve_command(self, steps: HostSteps) -> str:
        home = self.home
        return (f"cd {home} && mkdir -p state && (setsid nohup {home}/venv/bin/herd serve "
                f"{steps.env['HERD_SERVE_ARGS']} > {home}/state/serve.log 2>&1 < /dev/null & "
                f"echo $! > {home}/state/serve.pid)")

    def _running(self, host: Host) -> bool:
        code, _ = host.run(f"kill -0 $(cat {self.home}/state/serve.pid 2>/dev/null) 2>/dev/null", check=False,
                           quiet=True)
        return code == 0

    def _start_all(self, hosts: list[Host], host_steps: list[HostSteps]) -> set[str]:
        if self._ready_now() and all(self._running(h) for h in hosts):
            self.console.print("runtime already running and ready on every host: nothing to start")
            return set()
        started = set()
        for host, steps in zip(hosts, host_steps):
            if self._running(host):
                host.run(f"kill $(cat {self.home}/state/serve.pid)", check=False, quiet=True)
                time.sleep(1)
            host.run(self._serve_command(steps), quiet=True)
            started.add(host.name)
        return started

    def _ready_now(self) -> bool:
        try:
            return httpx.get(f"{self.endpoint()}/health/ready", timeout=3).status_code == 200
        except httpx.TransportError:
            return False

    # ---------------------------------------------------------------- down / status
    def down(self) -> list[str]:
        hosts = self._connect_all()
        stopped = []
        try:
            for host in hosts:
                code, _ = host.run(f"test -f {self.home}/state/serve.pid && kill $(cat {self.home}/state/serve.pid)",
                                   check=False, quiet=True)
                host.run(f"for f in {self.home}/state/serve/ranks/*.pid; do [ -f \"$f\" ] && kill -9 $(cat \"$f\") "
                         "2>/dev/null; done; rm -f {home}/state/serve.pid".replace("{home}", self.home),
                         check=False, quiet=True)
                if code == 0:
                    stopped.append(host.name)
        finally:
            for host in hosts:
                host.close()
        return stopped

    def status(self) -> dict:
        hosts = self._connect_all()
        try:
            states = {h.name: ("running" if self._running(h) else "stopped") for h in hosts}
        finally:
            for host in hosts:
                host.close()
        try:
            health = httpx.get(f"{self.endpoint()}/health/ready", timeout=3).json()
        except (httpx.TransportError, ValueError) as err:
            health = {"status": "unreachable", "reason": str(err)}
        return {"hosts": states, "endpoint": self.endpoint(), "health": health}


# ------------------------------------------------------------------ commands
def up_onprem(spec: Spec, env_path: str, console: Console, smoke: bool = True,
              trust_new_hosts: bool = False, ready_timeout: float = 900) -> int:
    from runtime.plan_report import render as render_plan
    from runtime.smoke import render as render_smoke
    from runtime.smoke import run_smoke, wait_ready
    installer = Installer(spec, env_path, console, trust_new_hosts)
    render_plan(installer.plan, console)
    if not installer.plan.fits:
        console.print("[red]refusing to install: the plan does not fit (see the reasons above)[/]")
        return 1
    started = time.monotonic()
    results = installer.install()
    console.print(f"install phase took {time.monotonic() - started:.1f}s")
    for r in results:
        console.print(f"{r.name}: {r.uploaded / 1e6:.1f} MB uploaded, {r.skipped_bytes / 1e6:.1f} MB already there, "
                      f"{r.steps_run} steps run, {r.steps_skipped} already done"
                      + (", runtime started" if r.started else ""))
    with httpx.Client(base_url=installer.endpoint(), timeout=5) as client:
        try:
            wait_ready(client, ready_timeout, console)
        except TimeoutError as err:
            console.print(f"[red]{err}[/]")
            return 1
    console.print(f"install took {time.monotonic() - started:.1f}s")
    if smoke:
        report = run_smoke(installer.endpoint(), installer.api_key, 60, console)
        render_smoke(report, console)
        if not report.passed:
            return 1
    console.print(f"endpoint: [bold]{installer.endpoint()}/v1[/] (API key from "
                  f"{spec.serving.api_key_env or spec.serving.api_key_file})")
    return 0


def down_onprem(spec: Spec, env_path: str, console: Console) -> int:
    stopped = Installer(spec, env_path, console).down()
    console.print(f"{spec.name}: stopped on {', '.join(stopped) or 'no host (nothing was running)'}")
    return 0


def status_onprem(spec: Spec, env_path: str, console: Console, as_json: bool = False) -> int:
    import json
    info = Installer(spec, env_path, console).status()
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        for name, state in info["hosts"].items():
            console.print(f"{name}: {state}")
        h = info["health"]
        console.print(f"{info['endpoint']}: {h.get('status')} ({h.get('reason')})")
    return 0 if info["health"].get("status") == "ready" else 3
