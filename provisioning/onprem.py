"""The on-prem installer: bare hosts to a serving, health-checked cluster, over SSH.

`herd up environments/onprem-*.yaml` connects to every host in parallel (paramiko, TCP_NODELAY), checks
each host key against known_hosts (unknown or changed keys are refused unless --trust-new-hosts is
given, and a changed key is refused even then), uploads what the hosts cannot fetch themselves (the
steps, herd's wheels, the weights, the API key as a 0600 file, and to the head its TLS certificate and
key: the spec's, or signed by the deployment CA kept on this machine), runs the steps with prefixed logs and
resumable stamps, starts the runtime on every host (the first is the head and the rendezvous), waits
for readiness and runs the smoke test through the head.

The runtime on a host is its systemd unit where the 70-service step installed one (`systemctl restart`,
`is-active`, `stop`), else one managed process run as the unprivileged `herd` user, named by a pid file
that records its start time, so a rerun restarts it instead of starting a second copy and a reused pid
is never taken for it. `herd down` stops either, and the ranks a killed runtime left behind.
"""
from __future__ import annotations

import collections
import concurrent.futures as futures
import hashlib
import math
import os
import posixpath
import re
import select
import shlex
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
from rich.console import Console
from rich.markup import escape

from provisioning import haproxy, rollout
from provisioning.bundle import vllm_bundle, wheel_bundle
from provisioning.steps import SERVICE_USER, STEPS_DIR, HostSteps, plan_host, profiles_for
from provisioning.weights import fetch
from provisioning.weights.manifest import sha256_of
from runtime.serving import tls
from runtime.errors import UserError
from runtime.paths import model_dir_for
from runtime.planning.plan_spec import replica_hosts, request_from_spec
from runtime.planning.planner import plan
from runtime.serving.serve import read_api_key
from runtime.planning.spec import OnpremHost, Spec, parse_spec

if TYPE_CHECKING:     # imported where SSH is used: the onprem extra
    import paramiko



class HostError(Exception):
    """A failure on one host; the message names the host."""


# ------------------------------------------------------------------ SSH
# Every remote command has a deadline: a short one for the installer's own bookkeeping (mkdir, cat,
# kill), a long one for a provisioning step (a driver install, a pip install of torch, hashing
# hundreds of GB of weights). Past it the command is killed on the host and the host's error names it.
COMMAND_TIMEOUT_S = float(os.environ.get("HERD_SSH_COMMAND_TIMEOUT_S", 120))
STEP_TIMEOUT_S = float(os.environ.get("HERD_SSH_STEP_TIMEOUT_S", 4 * 3600))
READY_TIMEOUT_S = 900   # one replica loading its weights after an update (405B: minutes)
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


def trust_on_first_use(known_hosts: Path, console: Console) -> paramiko.MissingHostKeyPolicy:
    """Accept a host never seen before and record it (only with --trust-new-hosts). A host already in
    known_hosts never reaches this policy: paramiko compares its key (Host handles a key of a type
    not recorded for it). Made here because paramiko is imported only once SSH is used."""
    import paramiko

    class TrustOnFirstUse(paramiko.MissingHostKeyPolicy):
        def missing_host_key(self, client, hostname, key):
            client.get_host_keys().add(hostname, key.get_name(), key)
            _record_host_key(known_hosts, hostname, key, console, "new host key")

    return TrustOnFirstUse()


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
        self._transport().set_keepalive(15)
        self.sftp = client.open_sftp()
        channel = self.sftp.get_channel()
        if channel is None:
            raise HostError(f"{self.name}: SSH failed: the SFTP session has no channel")
        channel.settimeout(SFTP_TIMEOUT_S)

    def _transport(self) -> paramiko.Transport:
        """The connection's transport; paramiko has none once the connection is closed."""
        transport = self.client.get_transport()
        if transport is None:
            raise HostError(f"{self.name}: SSH failed: the connection is closed")
        return transport

    def _connect(self, spec_host: OnpremHost, key: Path, known_hosts: Path, trust_new: bool):
        import paramiko
        client = paramiko.SSHClient()
        if known_hosts.exists():
            client.load_host_keys(str(known_hosts))
        client.set_missing_host_key_policy(trust_on_first_use(known_hosts, self.console) if trust_new
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
        channel = self._transport().open_session(timeout=30)
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


# ------------------------------------------------------------------ the runtime on a host
SERVICE = "herd.service"
# The managed process gets what the unit gives the service: systemd's default PATH, a $HOME it may
# write, and no other variable of the SSH session.
SERVICE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# How long a stopping runtime gets to stop its ranks itself (it gives torchrun 10 s) before the rest
# of its process tree is killed.
STOP_GRACE_S = 30

_CONTROL = r"""
set -u
home=__HOME__
user=__USER__
unit=__UNIT__
action=__ACTION__
pidf="$home/state/serve.pid"
report() { printf 'herd-runtime: %s\n' "$*"; }

# The unit is installed (the 70-service step installs it where systemd runs) and systemd answers.
has_unit() { command -v systemctl >/dev/null 2>&1 && systemctl cat "$unit" >/dev/null 2>&1; }

# The start time of a live process (clock ticks since boot, /proc/PID/stat field 22): with its pid, it
# names that one process; a pid reused later by another has another start time.
started_at() {
  local s
  s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  s=${s##*) }
  # shellcheck disable=SC2086  # the fields after the command name, split on purpose
  set -- $s
  [ "$1" != Z ] && echo "${20}"
}

# The pid of the runtime this installer started when it still runs, else nothing (status 1). The pid
# file holds "PID START"; an older one holds only the pid: then the process must be herd serve itself.
serve_pid() {
  local pid="" start="" now
  [ -f "$pidf" ] || return 1
  read -r pid start < "$pidf" || [ -n "$pid" ] || return 1
  case $pid in ''|*[!0-9]*) return 1 ;; esac
  now=$(started_at "$pid") || return 1
  if [ -n "$start" ]; then
    [ "$now" = "$start" ] || return 1
  else
    tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$home/venv/bin/herd serve" || return 1
  fi
  echo "$pid"
}

# PID:START of every process below $1 (its engine launcher and ranks, which leave its session).
descendants() {
  local p s
  for p in $(ps -e -o pid= -o ppid= | awk -v root="$1" '
      { parent[$1] = $2 }
      END { for (p in parent) { q = parent[p]; while (q != "" && q > 1 && q != root) q = parent[q];
                                if (q == root) print p } }'); do
    s=$(started_at "$p") && echo "$p:$s"
  done
}

# Stop the managed runtime: SIGTERM (it stops its ranks), then SIGKILL for whatever of its process
# tree is left. With "ranks", also the ranks its pid files name that still run (a runtime killed
# before it could stop them left them behind); with "own-ranks", only when a managed runtime ran (the
# pid files may be a unit's). Status 0 when something was stopped.
stop_process() {
  local pid tree p s stopped=1 f
  if pid=$(serve_pid); then
    stopped=0
    tree=$(descendants "$pid")
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 $((__GRACE__ * 10))); do started_at "$pid" >/dev/null || break; sleep 0.1; done
    for p in "$pid:$(started_at "$pid")" $tree; do
      s=${p#*:}
      [ -n "$s" ] && [ "$(started_at "${p%%:*}")" = "$s" ] && kill -KILL "${p%%:*}" 2>/dev/null
    done
  fi
  if [ "${1:-}" = ranks ] || { [ "${1:-}" = own-ranks ] && [ $stopped = 0 ]; }; then
    for f in "$home"/state/serve/ranks/*.pid; do
      [ -f "$f" ] || continue
      p=$(head -c 32 "$f")
      case $p in ''|*[!0-9]*) continue ;; esac
      if tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | grep -q 'runtime\.engine\.worker'; then
        kill -KILL "$p" 2>/dev/null && stopped=0
      fi
    done
  fi
  rm -f "$pidf"
  return $stopped
}

# What the unit assumes, for the managed process: the user (as the 70-service step creates it where
# systemd runs), its writable state and $HOME, the API key and the head's TLS key readable by it alone.
prepare_user() {
  local out group secret
  if ! id -u "$user" >/dev/null 2>&1; then
    if getent group "$user" >/dev/null; then group=(--gid "$user"); else group=(--user-group); fi
    # Another install on this host may create it at the same moment: its user is as good.
    out=$(useradd --system "${group[@]}" --no-create-home --no-log-init --home-dir "$home/state/home" \
            --shell /usr/sbin/nologin --comment "herd inference runtime" "$user" 2>&1) ||
      id -u "$user" >/dev/null 2>&1 || { echo "creating the user $user failed: $out" >&2; exit 1; }
  fi
  for group in video render; do
    getent group "$group" >/dev/null || continue
    id -nG "$user" | tr ' ' '\n' | grep -qx "$group" || usermod -aG "$group" "$user"
  done
  install -d -m 0755 "$home/state"
  install -d -o "$user" -g "$user" -m 0750 "$home/state/serve" "$home/state/home"
  if [ -n "$(find "$home/state/serve" "$home/state/home" ! -user "$user" -print -quit)" ]; then
    chown -R "$user:$user" "$home/state/serve" "$home/state/home"   # left by a runtime run as root
  fi
  if [ -d "$home/secrets" ]; then
    chown "$user:$user" "$home/secrets" && chmod 0700 "$home/secrets"
    for secret in api-key tls-cert tls-key; do
      [ -f "$home/secrets/$secret" ] || continue
      chown "$user:$user" "$home/secrets/$secret" && chmod 0600 "$home/secrets/$secret"
    done
  fi
}

# One `herd serve`, in its own session, as the user, with no privilege it could regain.
launch() {
  local pid env line
  command -v setpriv >/dev/null ||
    { echo "setpriv (util-linux) is missing: it runs the runtime as $user" >&2; exit 1; }
  __GPU_PREP__
  env=("PATH=__PATH__" "HOME=$home/state/home" "LANG=C.UTF-8")
  if [ -f "$home/nccl.env" ]; then   # the fabric's variables, as the unit's EnvironmentFile=
    while IFS= read -r line; do env+=("$line"); done < <(grep -E '^[A-Za-z_][A-Za-z0-9_]*=' "$home/nccl.env")
  fi
  cd "$home" || exit 1
  umask 027
  setsid env -i "${env[@]}" setpriv --reuid="$user" --regid="$user" --init-groups --no-new-privs \
    --inh-caps=-all --bounding-set=-all -- "$home/venv/bin/herd" serve __ARGS__ \
    > "$home/state/serve.log" 2>&1 < /dev/null &
  pid=$!
  echo "$pid $(started_at "$pid")" > "$pidf.new" && mv -f "$pidf.new" "$pidf"
  sleep 1
  if ! serve_pid >/dev/null; then
    echo "herd serve exited at once: $(tail -n 5 "$home/state/serve.log" | tr '\n' ' ')" >&2
    exit 1
  fi
  report "process running $pid"
}

case $action in
  status)
    if has_unit; then report "systemd $(systemctl is-active "$unit" 2>/dev/null)"
    elif pid=$(serve_pid); then report "process running $pid"
    else report "process stopped"; fi ;;
  start|ensure)
    if has_unit; then
      # A runtime started outside systemd (before the unit was installed) would run beside it.
      stop_process own-ranks && echo "stopped the runtime started outside systemd"
      systemctl enable --quiet "$unit" || { echo "systemctl enable $unit failed" >&2; exit 1; }
      # start: always a fresh start (new arguments, new weights); ensure: after a boot script that
      # restarted it already, only when it is not running.
      if [ "$action" = start ]; then verb=restart; else verb=start; fi
      systemctl "$verb" "$unit" || { echo "systemctl $verb $unit failed (journalctl -u $unit)" >&2; exit 1; }
      report "systemd $(systemctl is-active "$unit" 2>/dev/null)"
    else
      stop_process ranks
      prepare_user
      launch
    fi ;;
  stop)
    manager=process what=""
    if has_unit; then
      manager=systemd
      case $(systemctl is-active "$unit" 2>/dev/null) in active|activating|reloading) what=systemd ;; esac
      systemctl stop "$unit" || { echo "systemctl stop $unit failed" >&2; exit 1; }
      systemctl disable --quiet "$unit"   # down stays down: a reboot does not start it again
    fi
    if stop_process ranks; then what="${what:+$what+}process"; fi
    if [ -n "$what" ]; then report "$what stopped"; else report "$manager idle"; fi ;;
esac
"""

_GPU_PREP = ('nvidia-smi -L >/dev/null || { echo "nvidia-smi -L failed: the GPUs do not answer" >&2; exit 1; }\n'
             '  ! command -v nvidia-modprobe >/dev/null || nvidia-modprobe -u -c=0')


def as_root(script: str) -> str:
    """`script` run by bash with root rights: as is for root, through passwordless sudo otherwise."""
    return (f'script={shlex.quote(script)}; if [ "$(id -u)" = 0 ]; then bash -c "$script"; '
            'elif sudo -n true 2>/dev/null; then sudo -n bash -c "$script"; '
            'else echo "needs root or passwordless sudo (user $(id -un))" >&2; exit 1; fi')


def runtime_control(home: str, action: str, serve_args: str = "", gpu: bool = False) -> str:
    """The shell command that runs `action` for the runtime on a host, with root rights:
    status; start (restart it: the unit through systemctl where installed, else one process as the
    `herd` user, never a second copy); ensure (the same, but a unit already running is left alone);
    stop (the unit and the managed process, ranks included). `serve_args` is HERD_SERVE_ARGS, already
    shell-quoted. Its last line reports `herd-runtime: MANAGER STATE [PID]`."""
    if action not in ("status", "start", "ensure", "stop"):
        raise ValueError(f"unknown runtime action {action!r}")
    values = {"HOME": shlex.quote(home), "USER": SERVICE_USER, "UNIT": SERVICE, "GRACE": str(STOP_GRACE_S),
              "PATH": SERVICE_PATH, "GPU_PREP": _GPU_PREP if gpu else ":", "ACTION": action, "ARGS": serve_args}
    # One pass: a value (the install directory is the user's) is never searched for another name.
    return as_root(re.sub(r"__([A-Z_]+?)__", lambda m: values[m.group(1)], _CONTROL))


@dataclass
class RuntimeState:
    host: str
    manager: str              # systemd | process
    state: str                # systemd: is-active's word; process: running | stopped; stop: stopped | idle
    pid: int | None = None

    @classmethod
    def parse(cls, host: str, output: str) -> "RuntimeState":
        lines = [line for line in output.splitlines() if line.startswith("herd-runtime: ")]
        if not lines:
            raise HostError(f"{host}: the runtime's control script reported nothing")
        words = lines[-1].split()[1:]
        manager, state = (words + ["", ""])[:2]
        pid = int(words[2]) if len(words) > 2 and words[2].isdigit() else None
        return cls(host, manager, state, pid)

    @property
    def running(self) -> bool:
        return self.state in ("active", "running")

    @property
    def summary(self) -> str:
        """running | starting | failed | stopped, whichever manager runs it."""
        if self.running:
            return "running"
        return {"activating": "starting", "reloading": "running", "failed": "failed"}.get(self.state, "stopped")

    def describe(self) -> str:
        if self.manager == "systemd":
            return f"systemd {SERVICE}"
        return f"process {self.pid}, user {SERVICE_USER}" if self.pid else f"process, user {SERVICE_USER}"


class Installer:
    def __init__(self, spec: Spec, env_path: str, console: Console, trust_new_hosts: bool = False):
        if spec.target != "onprem":
            raise UserError(f"target: {spec.target!r}: the on-prem installer needs target onprem")
        self.spec, self.env_path, self.console = spec, Path(env_path), console
        self.trust_new = trust_new_hosts
        section = spec.onprem_section
        self.key = Path(section.ssh_key).expanduser()
        self.known_hosts = Path(section.known_hosts).expanduser()
        if not self.key.is_file():
            raise UserError(f"onprem.ssh_key: {section.ssh_key!r}: no such file")
        self.home = section.install_dir
        self.plan = plan(request_from_spec(spec))
        # One list of hosts per replica (its head first); one group without replicas.
        self.groups: list[list[OnpremHost]] = replica_hosts(spec, self.plan)
        self.balancer = section.load_balancer
        self.api_key: str | None = None   # read by install(): status and down need no key
        self.tls: tls.ServerTls | None = None   # made or checked by install(), handed to the head
        self.vllm_wheels: Path | None = None    # engine vllm: its wheels, downloaded by install()

    @property
    def hosts(self) -> list[OnpremHost]:
        return [host for group in self.groups for host in group]

    def endpoint(self) -> str:
        """Where clients go: the balancer when there is one, else the head."""
        url = tls.endpoint_for(self.spec)
        if url is None:   # only a cloud target has none, and the constructor refused those
            raise UserError(f"target: {self.spec.target!r}: has no endpoint the spec locates")
        return url

    def head_endpoint(self, group: int) -> str:
        """One replica's own API (its head), as the balancer's health checks reach it."""
        scheme = "https" if self.spec.serving.tls_enabled else "http"
        address = self.groups[group][0].address
        return f"{scheme}://{f'[{address}]' if ':' in address else address}:{self.spec.serving.port}"

    def verify(self, ca_file: str | None = None):
        """httpx's `verify=` for the endpoint: `ca_file`, else the spec's CA or the deployment CA."""
        endpoint = self.endpoint()
        if not endpoint.startswith("https://"):
            return tls.client_verify(ca_file, endpoint)   # refuses a CA for plain HTTP
        return tls.client_verify(ca_file or tls.client_ca(self.spec), endpoint,
                                 "--ca-file" if ca_file else "deployment CA")

    def server_tls(self) -> tls.ServerTls | None:
        """The head's certificate and key: the spec's files (checked), else issued by the deployment CA
        on this machine for the head's address and the spec's names; None for plain HTTP (loopback)."""
        if not self.spec.serving.tls_enabled:
            return None
        named = tls.named_material(self.spec, str(self.env_path))
        if named is not None:
            return named
        sans = tls.server_sans(self.hosts[0].address, tls.spec_sans(self.spec))
        material, _ = tls.deployment_material(tls.deployment_tls_dir(self.spec), sans, self.spec.name)
        return material

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

    def _connect_all(self, balancer: bool = False) -> list[Host]:
        """Every serving host in group order, then the balancer host when asked (and set)."""
        targets = self.hosts + ([self.balancer] if balancer and self.balancer else [])
        n = len(targets)
        results, errors = self._on_every_host(Host, targets, [self.key] * n, [self.known_hosts] * n,
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
        self.tls = self.server_tls()
        model_dir = model_dir_for(self.spec.model.id)
        source = self.spec.model.source or ""
        if source and not source.startswith(("file:", "/")):
            fetch(source, model_dir)               # here, once; the hosts get the verified copy
        else:
            model_dir = Path(source.removeprefix("file://"))
        bundle = wheel_bundle(self.console)
        if self.spec.serving.runs_vllm:
            # The hosts reach no package index: vLLM's build for them travels as wheels too.
            self.vllm_wheels = vllm_bundle("gpu" if self.spec.onprem_section.gpus_per_host else "cpu", self.console)
        connected = self._connect_all(balancer=True)
        hosts, lb_host = connected[:len(self.hosts)], (connected[-1] if self.balancer else None)
        remote_model = f"{self.home}/models/{self.spec.model.id}"
        # Each host's steps and serve arguments, decided once for both the install and the start: each
        # replica's hosts rendezvous at that replica's head.
        group_steps = [[plan_host(self.spec, self.plan, profile, group[0].address, remote_model, None,
                                  f"{self.home}/environment.yaml")
                        for profile in profiles_for(self.spec, self.plan, group)] for group in self.groups]
        host_steps = [steps for group in group_steps for steps in group]
        n = len(hosts)
        try:
            if lb_host is not None:
                states, errors = self._on_every_host(lambda h: self._control(h, "status"), hosts)
                if errors:
                    raise UserError("; ".join(sorted(errors)))
                serving = any(state.running for state in states)
                if serving:
                    self._refuse_unrollable(hosts[0])
                self._install_balancer(lb_host)
                if serving:   # replace one replica at a time behind the balancer
                    return self._roll(hosts, group_steps, lb_host, bundle, model_dir, remote_model)
            described, errors = self._on_every_host(self._environment_differs, hosts)
            if errors:
                raise UserError("; ".join(sorted(errors)))
            results, errors = self._on_every_host(self._install_host, hosts, host_steps, [bundle] * n,
                                                  [model_dir] * n, [remote_model] * n)
            if errors:
                raise UserError("; ".join(sorted(errors)) + " (the other hosts are left consistent; "
                                "rerun `herd up` to resume)")
            # A new description (the runtime reads its settings from it) or a step that ran again means
            # the running runtime is not what the spec says: restart it.
            changed = any(described) or any(r.steps_run for r in results)
            started = self._start_all(hosts, host_steps, restart=changed)
            for r in results:
                r.started = r.name in started
            return sorted(results, key=lambda r: r.name)
        finally:
            for host in connected:
                host.close()

    # ---------------------------------------------------------------- replicas behind HAProxy
    def _refuse_unrollable(self, head: Host) -> None:
        """A running deployment whose groups would change cannot be replaced one replica at a time: say
        what changed before anything is touched."""
        code, text = head.run(f"cat {self._path('environment.yaml')}", check=False, quiet=True)
        if code != 0 or not text.strip():
            return
        import yaml
        try:
            previous = parse_spec(yaml.safe_load(text), f"{head.name}:{self.home}/environment.yaml")
            before = rollout.group_shape(previous, plan(request_from_spec(previous), suggest=False))
        except (UserError, ValueError, yaml.YAMLError):
            return   # an unreadable old description: nothing to compare against
        changes = rollout.unrollable_changes(before, rollout.group_shape(self.spec, self.plan))
        if changes:
            raise UserError(f"{self.spec.name}: this change cannot be rolled one replica at a time "
                            f"({'; '.join(changes)}): `herd down` first, then `herd up` (the endpoint is "
                            "down in between)")

    def _install_balancer(self, lb_host: Host) -> None:
        """The 90-haproxy step on the balancer host: the PEM bundle (the deployment's certificate, or
        onprem.load_balancer.pem_file) and the replicas' CA uploaded as 0600 files, then the step."""
        steps = haproxy.balancer_steps(self.spec, self.plan)
        lb = self.spec.onprem_section.load_balancer
        assert lb is not None   # only called with a balancer
        if lb.pem_file:
            pem = Path(lb.pem_file).expanduser().read_text()
        elif self.tls is not None:
            pem = self.tls.certfile.read_text() + self.tls.keyfile.read_text()
        else:
            raise UserError("onprem.load_balancer.pem_file: needed when serving.tls names no certificate here")
        lb_host.write_secret(f"{self.home}/secrets/haproxy.pem", pem)
        ca = tls.client_ca(self.spec)
        if "HERD_HAPROXY_BACKEND_CA_SOURCE" in steps.env:
            if ca is None:
                raise UserError("serving.tls.ca: the balancer must verify the replicas' certificates: name "
                                "the CA that signed serving.tls.cert")
            lb_host.write_secret(steps.env["HERD_HAPROXY_BACKEND_CA_SOURCE"], Path(ca).read_text())
        lb_host.run(f"mkdir -p {self._path('steps')}", quiet=True)
        stats = {"uploaded": 0, "skipped": 0}
        lb_host.upload_dir(STEPS_DIR, f"{self.home}/steps", stats)
        lb_host.run(steps.command("90-haproxy", f"{self.home}/steps"), timeout=STEP_TIMEOUT_S)

    def _balancer_admin(self, lb_host: Host):
        """A function sending one command to HAProxy's admin socket on the balancer host."""
        socket_path = haproxy.balancer_config(self.spec, self.plan).socket_path

        def ask(command: str) -> str:
            return lb_host.run(as_root(rollout.remote_admin_script(socket_path, command)), quiet=True,
                               timeout=30)[1]
        return ask

    def _pending_steps(self, host: Host, steps: HostSteps) -> list[str]:
        """The steps whose stamp on the host differs from what this spec would stamp."""
        stamps = self._path("state", "steps")
        _, out = host.run(f'for f in {stamps}/*.done; do [ -f "$f" ] && echo "$(basename "$f" .done) $(cat "$f")"; '
                          'done; true', check=False, quiet=True)
        done = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
        return [step for step in steps.steps if done.get(step, "").strip() != steps.stamp(step)]

    def _environment_differs(self, host: Host) -> bool:
        """The host's environment.yaml (what its runtime reads its settings from) is not this spec's."""
        want = hashlib.sha256(self.env_path.read_bytes()).hexdigest()
        _, out = host.run(f"sha256sum {self._path('environment.yaml')} 2>/dev/null; true", check=False, quiet=True)
        return out.split()[:1] != [want]

    def _group_ready(self, group: int) -> bool:
        return self._ready_at(self.head_endpoint(group))

    def _roll(self, hosts: list[Host], group_steps: list[list[HostSteps]], lb_host: Host, bundle: Path,
              model_dir: Path, remote_model: str) -> list[HostResult]:
        """Bring every replica to this spec, one at a time, while the others answer: a replica whose steps
        are all current and that answers ready is left alone; one out of rotation is updated at once;
        one serving is drained, stopped, updated, started, and put back when ready (rolling_update)."""
        by_group, first = [], 0
        for group in self.groups:
            by_group.append(hosts[first:first + len(group)])
            first += len(group)
        results: list[HostResult] = []

        def replace(index: int) -> None:
            group, steps = by_group[index], group_steps[index]
            _, errors = self._on_every_host(lambda h: self._control(h, "stop"), group)
            if errors:
                raise UserError("; ".join(sorted(errors)))
            done, errors = self._on_every_host(self._install_host, group, steps, [bundle] * len(group),
                                               [model_dir] * len(group), [remote_model] * len(group))
            if errors:
                raise UserError("; ".join(sorted(errors)) + f" ({haproxy.replica_name(index)} is out of rotation; "
                                "the other replicas serve; rerun `herd up` to resume)")
            _, errors = self._on_every_host(lambda h, s: self._control(h, "start", s), group, steps)
            if errors:
                raise UserError("; ".join(sorted(errors)))
            for r in done:
                r.started = True
            results.extend(done)

        names = [haproxy.replica_name(i) for i in range(len(self.groups))]
        admin = self._balancer_admin(lb_host)
        in_rotation = {s.name: s.status == "UP" for s in haproxy.server_states(admin("show stat"))}
        stale = [i for i in range(len(self.groups))
                 if any(self._pending_steps(h, s) or self._environment_differs(h)
                        for h, s in zip(by_group[i], group_steps[i]))
                 or not self._group_ready(i)]
        if not stale:
            self.console.print("every replica is current and ready: nothing to roll")
        # Replicas out of rotation serve nothing: update them first, together, and wait until ready.
        idle = [i for i in stale if not in_rotation.get(names[i])]
        for i in idle:
            self.console.print(f"{names[i]}: out of rotation; updating it", highlight=False)
            replace(i)
        for i in idle:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while not self._group_ready(i):
                if time.monotonic() > deadline:
                    raise UserError(f"{names[i]}: not ready within {READY_TIMEOUT_S:.0f}s after its update "
                                    f"({self.head_endpoint(i)}/health/ready)")
                time.sleep(1)
        serving = [names[i] for i in stale if i not in idle]
        if serving:
            haproxy.rolling_update(admin, serving, lambda name: replace(names.index(name)),
                                   lambda name: self._group_ready(names.index(name)), ready_timeout=READY_TIMEOUT_S,
                                   poll_s=0.5, say=lambda line: self.console.print(f"rolling update: {line}",
                                                                                  highlight=False))
        return sorted(results, key=lambda r: r.name)

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
        if self.vllm_wheels is not None:
            host.upload_dir(self.vllm_wheels, f"{self.home}/vllm-wheels", stats)
        host.upload_dir(model_dir, remote_model, stats)
        host.sftp.put(str(self.env_path), f"{self.home}/environment.yaml")
        if self.api_key:
            host.write_secret(f"{self.home}/secrets/api-key", self.api_key)
        if self.tls is not None and steps.profile.node_rank == 0:   # only the head serves HTTPS
            host.write_secret(f"{self.home}/secrets/tls-cert", self.tls.certfile.read_text())
            host.write_secret(f"{self.home}/secrets/tls-key", self.tls.keyfile.read_text())
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

    def _control(self, host: Host, action: str, steps: HostSteps | None = None) -> RuntimeState:
        """Run one runtime action (status, start, stop) on the host, with root rights; its last report."""
        script = runtime_control(self.home, action, steps.env["HERD_SERVE_ARGS"] if steps else "",
                                 gpu=bool(steps and steps.profile.gpu))
        _, out = host.run(script, quiet=True, timeout=COMMAND_TIMEOUT_S)
        return RuntimeState.parse(host.name, out)

    def _running(self, host: Host) -> bool:
        return self._control(host, "status").running

    def _start_all(self, hosts: list[Host], host_steps: list[HostSteps], restart: bool = False) -> set[str]:
        """Start the runtime on every host: its systemd unit where it has one, else one process run as
        the `herd` user. A runtime that runs already is restarted, never started beside itself; one that
        runs and answers ready on every host is left alone unless `restart` (its install changed)."""
        states, errors = self._on_every_host(lambda h: self._control(h, "status"), hosts)
        if errors:
            raise UserError("; ".join(errors))
        if not restart and all(s.running for s in states) and self._ready_now():
            self.console.print("runtime already running and ready on every host: nothing to start")
            return set()
        started, errors = self._on_every_host(lambda h, s: self._control(h, "start", s), hosts, host_steps)
        if errors:
            raise UserError("; ".join(sorted(errors)))
        for state in started:
            self.console.print(f"[cyan]{escape(state.host)}[/] | runtime started ({state.describe()})",
                               highlight=False)
        return {state.host for state in started}

    def _ready_now(self) -> bool:
        return self._ready_at(self.endpoint())

    def _ready_at(self, url: str) -> bool:
        """Whether `url`'s /health/ready answers 200 now (the balancer's endpoint, or one head)."""
        try:
            return httpx.get(f"{url}/health/ready", timeout=3, verify=self.verify()).status_code == 200
        except httpx.TransportError:
            return False

    # ---------------------------------------------------------------- down / status
    def down(self) -> list[str]:
        """Stop whatever runs on each host (the unit, a managed process, ranks left behind), then the
        balancer's HAProxy; the hosts where something ran (the balancer's address among them)."""
        connected = self._connect_all(balancer=True)
        hosts = connected[:len(self.hosts)]
        try:
            states, errors = self._on_every_host(lambda h: self._control(h, "stop"), hosts)
            if errors:   # a command that failed or timed out: one line naming the host, as for the install
                raise UserError("; ".join(sorted(errors)))
            stopped = [s.host for s in states if s.state == "stopped"]
            if self.balancer is not None and self._stop_balancer(connected[-1]):
                stopped.append(connected[-1].name)
        finally:
            for host in connected:
                host.close()
        return stopped

    def _stop_balancer(self, lb_host: Host) -> bool:
        """Stop HAProxy as the 90-haproxy step started it (Debian's unit, or its own process); whether
        it ran."""
        env = haproxy.balancer_steps(self.spec, self.plan).env
        pid_file = shlex.quote(env["HERD_HAPROXY_PID"])
        unit = ("[ \"$(ps -p 1 -o comm= 2>/dev/null)\" = systemd ]" if env.get("HERD_SYSTEMD") != "0" else "false")
        script = (f'if {unit}; then systemctl is-active -q haproxy && systemctl stop haproxy && echo stopped; '
                  f'elif [ -f {pid_file} ] && kill -0 "$(head -n1 {pid_file})" 2>/dev/null; then '
                  f'kill "$(head -n1 {pid_file})"; for _ in $(seq 50); do kill -0 "$(head -n1 {pid_file})" '
                  f'2>/dev/null || break; sleep 0.1; done; rm -f {pid_file}; echo stopped; fi; true')
        _, out = lb_host.run(as_root(script), quiet=True, timeout=COMMAND_TIMEOUT_S)
        return "stopped" in out.split()

    def status(self, ca_file: str | None = None) -> dict:
        verify = self.verify(ca_file)
        connected = self._connect_all(balancer=True)
        hosts = connected[:len(self.hosts)]
        try:
            states, errors = self._on_every_host(lambda h: self._control(h, "status"), hosts)
            if errors:
                raise UserError("; ".join(sorted(errors)))
            balancer = None
            if self.balancer:   # HAProxy's own view of each replica, from its admin socket
                try:
                    balancer = {s.name: {"status": s.status, "check": s.check_status, "sessions": s.active_sessions}
                                for s in haproxy.server_states(self._balancer_admin(connected[-1])("show stat"))}
                except (HostError, ValueError) as err:
                    balancer = {"error": str(err)}
        finally:
            for host in connected:
                host.close()

        def ready(url: str) -> dict:
            try:
                return httpx.get(f"{url}/health/ready", timeout=3, verify=verify).json()
            except (httpx.TransportError, ValueError) as err:
                return {"status": "unreachable", "reason": str(err)}
        info = {"hosts": {s.host: s.summary for s in states},
                "managers": {s.host: s.describe() for s in states},
                "endpoint": self.endpoint(), "health": ready(self.endpoint())}
        if self.balancer:
            info["replicas"] = {haproxy.replica_name(i): {"hosts": [h.address for h in group],
                                                         "health": ready(self.head_endpoint(i)).get("status")}
                                for i, group in enumerate(self.groups)}
            info["balancer"] = balancer
        return info


# ------------------------------------------------------------------ commands
def up_onprem(spec: Spec, env_path: str, console: Console, smoke: bool = True,
              trust_new_hosts: bool = False, ready_timeout: float = 900) -> int:
    from runtime.planning.plan_report import render as render_plan
    from runtime.serving.smoke import render as render_smoke
    from runtime.serving.smoke import ready_within, run_smoke
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
    if installer.tls is not None:
        console.print(tls.announce(installer.tls), markup=False, highlight=False, soft_wrap=True)
    verify = installer.verify()
    if not ready_within(installer.endpoint(), verify, ready_timeout, console):
        return 1
    console.print(f"install took {time.monotonic() - started:.1f}s")
    if smoke:
        report = run_smoke(installer.endpoint(), installer.api_key, 60, console, verify=verify)
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


def status_onprem(spec: Spec, env_path: str, console: Console, as_json: bool = False,
                  ca_file: str | None = None) -> int:
    import json
    info = Installer(spec, env_path, console).status(ca_file)
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        for name, state in info["hosts"].items():
            console.print(f"{name}: {state} ({info['managers'][name]})")
        for name, replica in info.get("replicas", {}).items():
            view = (info.get("balancer") or {}).get(name, {})
            console.print(f"{name} ({', '.join(replica['hosts'])}): {replica['health']}; balancer: "
                          f"{view.get('status', '?')} (check {view.get('check', '?')}, {view.get('sessions', 0)} "
                          "in flight)")
        h = info["health"]
        engine = f"; engine {h['engine']}" if h.get("engine") else ""
        console.print(f"{info['endpoint']}: {h.get('status')} ({h.get('reason')}){engine}")
    return 0 if info["health"].get("status") == "ready" else 3
