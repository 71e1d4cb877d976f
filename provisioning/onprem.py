"""The on-prem installer: bare hosts to a serving, health-checked cluster, over SSH.

`herd up environments/onprem-*.yaml` connects to every host in parallel (paramiko, TCP_NODELAY), checks
each host key against known_hosts (unknown or changed keys are refused unless --trust-new-hosts is
given, and a changed key is refused even then), uploads what the hosts cannot fetch themselves (the
steps, herd's wheels, the weights, the API key as a 0600 file), runs the steps with prefixed logs and
resumable stamps, starts the runtime on every host (the first is the head and the rendezvous), waits
for readiness and runs the smoke test through the head.
"""
from __future__ import annotations

import collections
import concurrent.futures as futures
import hashlib
import math
import os
import posixpath
import select
import shlex
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from rich.console import Console
from rich.markup import escape

from provisioning.bundle import wheel_bundle
from provisioning.steps import STEPS_DIR, HostSteps, plan_host, profiles_for
from provisioning.weights import fetch
from provisioning.weights.manifest import sha256_of
from runtime.errors import UserError
from runtime.paths import model_dir_for
from runtime.planning.plan_spec import request_from_spec
from runtime.planning.planner import plan
from runtime.serving.serve import read_api_key
from runtime.planning.spec import OnpremHost, Spec

RDZV_PORT = 29400


class HostError(Exception):
    """A failure on one host; the message names the host."""


# ------------------------------------------------------------------ SSH
# Every remote command has a deadline: a short one for the installer's own bookkeeping (mkdir, cat,
# kill), a long one for a provisioning step (a driver install, a pip install of torch, hashing
# hundreds of GB of weights). Past it the command is killed on the host and the host's error names it.
COMMAND_TIMEOUT_S = float(os.environ.get("HERD_SSH_COMMAND_TIMEOUT_S", 120))
STEP_TIMEOUT_S = float(os.environ.get("HERD_SSH_STEP_TIMEOUT_S", 4 * 3600))
# Beyond the remote deadline, how long to wait for the host to report it before giving up on the
# connection itself (a host that stopped answering cannot report anything).
DEADLINE_GRACE_S = 15
# An SFTP read or write that stalls this long fails instead of hanging the install.
SFTP_TIMEOUT_S = 300
_known_hosts_lock = threading.Lock()   # hosts connect in parallel; known_hosts is one file


def _short(command: str, limit: int = 160) -> str:
    """A command as an error message shows it: whole when short, else its start and its end (a step's
    command is a long environment followed by the script's name)."""
    command = " ".join(command.split())
    return command if len(command) <= limit else f"{command[:limit - 70]} ... {command[-60:]}"


def _keyscan_type(key_name: str) -> str:
    """ssh-keyscan's name for a key type: ssh-ed25519 -> ed25519, ecdsa-sha2-nistp256 -> ecdsa."""
    return "ecdsa" if key_name.startswith("ecdsa") else key_name.removeprefix("ssh-")


def _record_host_key(known_hosts: Path, hostname: str, key, console: Console, why: str) -> None:
    with _known_hosts_lock:
        known_hosts.parent.mkdir(parents=True, exist_ok=True)
        with open(known_hosts, "a") as f:
            f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
    fingerprint = hashlib.sha256(key.asbytes()).hexdigest()[:32]
    console.print(f"[yellow]{escape(hostname)}: trusted {why} {key.get_name()} SHA256:{fingerprint}... "
                  f"(recorded in {escape(str(known_hosts))})[/]")


class TrustOnFirstUse:
    """Accept a host never seen before and record it (only with --trust-new-hosts). A host already in
    known_hosts never reaches this policy: paramiko compares its key (Host handles a key of a type
    not recorded for it)."""

    def __init__(self, known_hosts: Path, console: Console):
        self.known_hosts, self.console = known_hosts, console

    def missing_host_key(self, client, hostname, key):
        client.get_host_keys().add(hostname, key.get_name(), key)
        _record_host_key(self.known_hosts, hostname, key, self.console, "new host key")


class Host:
    """One SSH connection; commands stream their output prefixed with the host's name."""

    def __init__(self, spec_host: OnpremHost, key: Path, known_hosts: Path, trust_new: bool, console: Console):
        import paramiko
        self.name = spec_host.address
        self.console = console
        # The name paramiko files the host under in known_hosts.
        key_name = spec_host.address if spec_host.port == 22 else f"[{spec_host.address}]:{spec_host.port}"
        try:
            try:
                client = self._connect(spec_host, key, known_hosts, trust_new)
            except paramiko.BadHostKeyException as err:
                known = paramiko.HostKeys(str(known_hosts)).lookup(key_name) if known_hosts.exists() else None
                presented = err.key.get_name()
                known_types = sorted(known.keys()) if known else []
                if presented in known_types:
                    raise   # the key recorded for this very type changed: never accepted
                # paramiko asks the server for the first recorded type; one that lacks it presents
                # another, which paramiko reports as a changed key. A key of a type never recorded
                # for the host is new, not changed: trusted only as a new host is.
                if not trust_new:
                    raise HostError(
                        f"{self.name}: presented a {presented} host key, but {known_hosts} knows this host "
                        f"by {', '.join(known_types)} only; refusing to connect: check the new key's "
                        f"fingerprint (ssh-keyscan -t {_keyscan_type(presented)} {self.name}) and add it, "
                        "or rerun with --trust-new-hosts") from None
                _record_host_key(known_hosts, key_name, err.key, console,
                                 f"a host key of another type (known: {', '.join(known_types)}):")
                client = self._connect(spec_host, key, known_hosts, trust_new)
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
        # A long, silent step (hashing weights) leaves the connection idle for minutes: keepalives keep
        # firewalls and NAT from dropping it, and make a dead one fail on send.
        client.get_transport().set_keepalive(15)
        self.sftp = client.open_sftp()
        self.sftp.get_channel().settimeout(SFTP_TIMEOUT_S)

    def _connect(self, spec_host: OnpremHost, key: Path, known_hosts: Path, trust_new: bool):
        import paramiko
        client = paramiko.SSHClient()
        if known_hosts.exists():
            client.load_host_keys(str(known_hosts))
        client.set_missing_host_key_policy(TrustOnFirstUse(known_hosts, self.console) if trust_new
                                           else paramiko.RejectPolicy())
        try:
            sock = socket.create_connection((spec_host.address, spec_host.port), timeout=10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # ~40 ms saved per request
            client.connect(spec_host.address, spec_host.port, username=spec_host.user, key_filename=str(key),
                           sock=sock, look_for_keys=False, allow_agent=False, timeout=10, auth_timeout=15,
                           banner_timeout=15)
        except BaseException:
            client.close()
            raise
        return client

    def run(self, command: str, check: bool = True, quiet: bool = False,
            timeout: float | None = None) -> tuple[int, str]:
        """Run `command` on the host; (exit code, stdout). Both streams are read as they come (a command
        filling its stderr while we wait on its stdout would otherwise stall both sides for good), and
        the command gets `timeout` seconds (COMMAND_TIMEOUT_S by default)."""
        limit = COMMAND_TIMEOUT_S if timeout is None else timeout
        channel = self.client.get_transport().open_session(timeout=30)
        # The host enforces the deadline too: coreutils `timeout` signals the command's whole process
        # group (TERM, then KILL 10 s later), so a hung command does not linger after we gave up.
        channel.exec_command(f"timeout -k 10 {max(1, math.ceil(limit))} bash -c {shlex.quote(command)}")
        started = time.monotonic()
        deadline = started + limit + DEADLINE_GRACE_S
        out, err_tail = bytearray(), collections.deque(maxlen=50)
        pending = {"out": bytearray(), "err": bytearray()}

        def emit(stream: str, data: bytes, final: bool = False) -> None:
            buffer = pending[stream]
            buffer += data
            *lines, rest = buffer.split(b"\n")
            # A partial line is kept for the next chunk, but not forever: output without newlines
            # (a progress bar) would make every chunk rescan it.
            if rest and (final or len(rest) > 1 << 16):
                lines, rest = lines + [rest], b""
            pending[stream] = bytearray(rest)
            for raw in lines:
                line = raw.decode(errors="replace").rstrip()
                if stream == "err":
                    err_tail.append(line)
                if not quiet:
                    style = "[red]" if stream == "err" else ""
                    self.console.print(f"[cyan]{escape(self.name)}[/] | {style}{escape(line)}"
                                       f"{'[/]' if style else ''}", highlight=False)

        try:
            while True:
                moved = False
                while channel.recv_ready():
                    data = channel.recv(1 << 16)
                    out += data
                    emit("out", data)
                    moved = True
                while channel.recv_stderr_ready():
                    emit("err", channel.recv_stderr(1 << 16))
                    moved = True
                # Done once the exit status and the end of output are in, or the connection is gone.
                if (channel.closed or (channel.exit_status_ready() and channel.eof_received)) and not (
                        channel.recv_ready() or channel.recv_stderr_ready()):
                    break
                if moved:
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HostError(f"{self.name}: `{_short(command)}` timed out after {limit:.0f}s "
                                    "(the host stopped answering; the command may still run there)")
                if channel.eof_received:
                    channel.status_event.wait(min(left, 0.5))   # output done, exit status to come
                else:
                    select.select([channel], [], [], min(left, 0.5))
        finally:
            channel.close()
        emit("out", b"", final=True)
        emit("err", b"", final=True)
        code = channel.recv_exit_status()
        if code == -1:   # paramiko's value when the channel closed without an exit status
            raise HostError(f"{self.name}: the connection was lost while `{_short(command)}` ran "
                            "(no exit status)")
        if code in (124, 137) and time.monotonic() - started >= limit:
            raise HostError(f"{self.name}: `{_short(command)}` timed out after {limit:.0f}s and was stopped "
                            "on the host")
        text = out.decode(errors="replace")
        if check and code != 0:
            last = ([line for line in err_tail if line.strip()] or text.strip().splitlines()
                    or ["(no output)"])[-1].strip()
            raise HostError(f"{self.name}: `{_short(command)}` failed ({code}): {last}")
        return code, text

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
            tmp = f"{remote}/.{path.name}.part"   # SFTP paths are not parsed by a shell: no quoting
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
        host.run(f"mkdir -p {self._path('state', 'steps')}", quiet=True)
        for step in steps.steps:
            stamp_file = self._path("state", "steps", f"{step}.done")
            stamp = steps.stamp(step)
            _, current = host.run(f"cat {stamp_file} 2>/dev/null || true", check=False, quiet=True)
            if current.strip() == stamp:
                result.steps_skipped += 1
                continue
            host.run(steps.command(step, f"{self.home}/steps"), timeout=STEP_TIMEOUT_S)
            host.run(f"echo {shlex.quote(stamp)} > {stamp_file}", quiet=True)
            result.steps_run += 1
        return result

    # ---------------------------------------------------------------- the runtime
    def _path(self, *parts: str) -> str:
        """A path under the install directory, quoted for the remote shell (the directory may hold
        spaces, `$` or quotes: it is the user's)."""
        return shlex.quote(posixpath.join(self.home, *parts))

    def _serve_command(self, steps: HostSteps) -> str:
        # HERD_SERVE_ARGS is already a shell-quoted argument list (shlex.join).
        return (f"cd {self._path()} && mkdir -p state && (setsid nohup {self._path('venv', 'bin', 'herd')} serve "
                f"{steps.env['HERD_SERVE_ARGS']} > {self._path('state', 'serve.log')} 2>&1 < /dev/null & "
                f"echo $! > {self._path('state', 'serve.pid')})")

    def _running(self, host: Host) -> bool:
        code, _ = host.run(f"kill -0 $(cat {self._path('state', 'serve.pid')} 2>/dev/null) 2>/dev/null",
                           check=False, quiet=True)
        return code == 0

    def _start_all(self, hosts: list[Host], host_steps: list[HostSteps]) -> set[str]:
        if self._ready_now() and all(self._running(h) for h in hosts):
            self.console.print("runtime already running and ready on every host: nothing to start")
            return set()
        started = set()
        for host, steps in zip(hosts, host_steps):
            if self._running(host):
                host.run(f"kill $(cat {self._path('state', 'serve.pid')})", check=False, quiet=True)
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
                pid_file = self._path("state", "serve.pid")
                code, _ = host.run(f"test -f {pid_file} && kill $(cat {pid_file})", check=False, quiet=True)
                # The glob stays outside the quotes: the quoted folder, then *.pid expanded in it.
                host.run(f"for f in {self._path('state', 'serve', 'ranks')}/*.pid; do [ -f \"$f\" ] && "
                         f"kill -9 $(cat \"$f\") 2>/dev/null; done; rm -f {pid_file}", check=False, quiet=True)
                if code == 0:
                    stopped.append(host.name)
        except HostError as err:   # a command that timed out: one line naming the host, as for the install
            raise UserError(str(err)) from None
        finally:
            for host in hosts:
                host.close()
        return stopped

    def status(self) -> dict:
        hosts = self._connect_all()
        try:
            states = {h.name: ("running" if self._running(h) else "stopped") for h in hosts}
        except HostError as err:
            raise UserError(str(err)) from None
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
    from runtime.planning.plan_report import render as render_plan
    from runtime.serving.smoke import render as render_smoke
    from runtime.serving.smoke import run_smoke, wait_ready
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
