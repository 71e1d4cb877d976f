"""The on-prem load balancer: an HAProxy configuration in front of the replicas, and the step that
installs it on the host `onprem.load_balancer` names.

HAProxy (Debian's package; 2.6 on Debian 12) terminates TLS with one PEM bundle (certificate chain and
private key), sends each request to the replica head with the fewest connections (`balance leastconn`)
among those whose `/health/ready` answered 200 (every rank loaded and a canary generation answered:
`option httpchk`, checked every second, out after 2 failures, back after 2 successes; out at once after
two 503 answers to real requests), and retries a
request that could not reach a replica, or that a replica refused with 503 (not ready, or its engine
was lost under it), on another replica (`retries`, `option redispatch`, `retry-on`). Generations are
side-effect free, so a retry is safe; a streamed response that has started cannot be retried.

Timeouts: a non-streaming generation of a few thousand tokens on a large model takes minutes with no
byte on the wire until it ends, and an SSE stream may be silent for a long prefill: `timeout server`
(inactivity while a response is awaited) and `timeout client` are the generation timeout (15 min by
default); `timeout tunnel` (upgraded connections) the same. Connecting and reading a request's headers
stay short.

The admin socket (`show stat`, `set server ... state drain`) is where `herd status` and a rolling
update read and change the balancer's view; `server_states` parses `show stat`.
"""
from __future__ import annotations

import csv
import io
import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Callable, Union

from runtime.errors import UserError

# What the step and the configuration agree on, on the balancer host (Debian's own locations for the
# configuration, so that its haproxy.service runs ours).
CONFIG_PATH = "/etc/haproxy/haproxy.cfg"
PEM_PATH = "/etc/haproxy/certs/herd.pem"
SOCKET_PATH = "/run/haproxy/herd-admin.sock"
PID_PATH = "/run/haproxy/herd.pid"
BACKEND = "herd_replicas"
FRONTEND = "herd_api"
GENERATION_TIMEOUT_S = 900
CHECK_INTER_S = 1
CHECK_FALL = 2
CHECK_RISE = 2
RETRIES = 3
# Statuses HAProxy answers itself (no replica ready, none reachable, a replica timed out) as the API's
# own error shape, so an OpenAI client reads them like any other error of the API.
OWN_ERRORS = {
    502: ("bad_gateway", "a replica closed the connection without an answer"),
    503: ("no_replica_ready", "no replica is ready: every group is loading, restarting or down"),
    504: ("gateway_timeout", "the replica did not answer within the generation timeout of the load balancer"),
}

_SAFE_WORD = re.compile(r"[A-Za-z0-9._/@:+=,-]+")
_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


@dataclass(frozen=True)
class Replica:
    """One replica's head: where its API listens."""
    name: str
    address: str
    port: int


@dataclass(frozen=True)
class BalancerConfig:
    replicas: tuple[Replica, ...]
    bind_address: str = "0.0.0.0"
    bind_port: int = 443
    pem_path: str | None = PEM_PATH   # None: plain HTTP (the local target on loopback only)
    socket_path: str = SOCKET_PATH
    generation_timeout_s: int = GENERATION_TIMEOUT_S
    check_inter_s: float = CHECK_INTER_S
    check_fall: int = CHECK_FALL
    check_rise: int = CHECK_RISE
    retries: int = RETRIES
    # The replicas serve plain HTTP on their private network unless given a CA to verify their TLS.
    backend_ca_path: str | None = None
    # Debian's hardening: drop to this user and chroot after binding (None: stay as started).
    run_as: str | None = "haproxy"
    chroot: str | None = "/var/lib/haproxy"
    log_target: str = "/dev/log"
    maxconn: int = 4096


def _word(field: str, value: str) -> str:
    """A path or name written into the configuration as one word: no space, quote, # or control
    character could end it and start another directive."""
    if not _SAFE_WORD.fullmatch(value):
        raise UserError(f"{field}: {value!r}: not usable in the HAProxy configuration (allowed: letters, "
                        "digits and ._/@:+=,-)")
    return value


def _host(field: str, value: str) -> str:
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        if not _HOSTNAME.fullmatch(value):
            raise UserError(f"{field}: {value!r}: not an IP address or host name") from None
        return value
    return f"[{address}]" if address.version == 6 else str(address)


def _seconds(value: float) -> str:
    return f"{int(value * 1000)}ms" if value < 1 or value != int(value) else f"{int(value)}s"


def render(config: BalancerConfig) -> str:
    """The whole haproxy.cfg. Every value is checked first (one-line UserError naming it)."""
    if not config.replicas:
        raise UserError("load balancer: no replica to send requests to")
    names = [r.name for r in config.replicas]
    if len(set(names)) != len(names):
        raise UserError(f"load balancer: replica names repeat: {names}")
    if config.generation_timeout_s < 60:
        raise UserError(f"load balancer: generation timeout {config.generation_timeout_s}s: at least 60s "
                        "(long non-streaming generations send nothing until they end)")
    bind = _host("onprem.load_balancer.listen_address", config.bind_address)
    if config.pem_path is None and not ipaddress.ip_address(config.bind_address).is_loopback:
        raise UserError(f"load balancer: {config.bind_address} is not loopback: it needs a certificate (TLS)")
    pem = _word("load balancer certificate (PEM bundle) path", config.pem_path) if config.pem_path else None
    sock = _word("load balancer stats socket path", config.socket_path)
    gen = _seconds(config.generation_timeout_s)
    inter = _seconds(config.check_inter_s)
    lines = [
        "# herd load balancer: generated by herd (provisioning/haproxy.py documents every setting).",
        "global",
        f"    log {_word('load balancer log target', config.log_target)} local0",
        f"    maxconn {int(config.maxconn)}",
        # The admin socket: `show stat` (herd status), `set server ... state drain|ready` (rolling updates).
        f"    stats socket {sock} mode 600 level admin",
        "    stats timeout 30s",
        # TLS 1.2 and 1.3 only, forward-secret ciphers, no session tickets (Mozilla's intermediate profile).
        "    ssl-default-bind-options ssl-min-ver TLSv1.2 no-tls-tickets",
        "    ssl-default-bind-ciphers ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
        "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:"
        "ECDHE-RSA-CHACHA20-POLY1305",
        "    ssl-default-bind-ciphersuites TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256",
    ]
    if config.chroot:
        lines.append(f"    chroot {_word('load balancer chroot', config.chroot)}")
    if config.run_as:
        user = _word("load balancer user", config.run_as)
        lines += [f"    user {user}", f"    group {user}"]
    lines += [
        "",
        "defaults",
        "    mode http",
        "    log global",
        "    option httplog",
        "    option dontlognull",
        "    option forwardfor",
        # A request that could not reach a replica, or that one refused with 503 (not ready; engine
        # lost under it), goes to another replica: generations have no side effect, so a retry is
        # safe. HAProxy can resend only a request it holds whole: http-buffer-request waits for the
        # body before choosing a replica (without it a POST is not retried; measured). Requests larger
        # than one buffer (tune.bufsize, 16 KB) are not retried.
        "    option http-buffer-request",
        f"    retries {int(config.retries)}",
        "    option redispatch 1",
        "    retry-on conn-failure empty-response junk-response 503",
        "    timeout connect 5s",
        # Inactivity limits: a long non-streaming generation sends nothing until it ends, an SSE stream
        # nothing during a long prefill: the server side (and the client side, idle meanwhile) wait
        # as long as a generation may take.
        f"    timeout client {gen}",
        f"    timeout server {gen}",
        f"    timeout tunnel {gen}",
        "    timeout client-fin 30s",
        "    timeout server-fin 30s",
        "    timeout http-request 30s",
        "    timeout http-keep-alive 60s",
        "    timeout queue 60s",
        "    timeout check 5s",
    ]
    for status, (code, message) in sorted(OWN_ERRORS.items()):
        body = ('{"error":{"message":"%s","type":"server_error","code":"%s"}}' % (message, code))
        lines.append(f"    http-error status {status} content-type application/json string '{body}'")
    lines += [
        "",
        f"frontend {FRONTEND}",
        f"    bind {bind}:{int(config.bind_port)}" + (f" ssl crt {pem} alpn h2,http/1.1" if pem else ""),
        f"    http-request set-header X-Forwarded-Proto {'https' if pem else 'http'}",
        # Which replica answered: for clients reporting a problem, and for tests.
        "    http-response set-header X-Herd-Replica %s",
        f"    default_backend {BACKEND}",
        "",
        f"backend {BACKEND}",
        "    balance leastconn",
        # Ready means every rank loaded and a canary generation answered: anything but 200 is out.
        "    option httpchk",
        "    http-check send meth GET uri /health/ready ver HTTP/1.1 hdr Host herd-load-balancer",
        "    http-check expect status 200",
        # A failed check is retried at the same interval (fastinter) so a dead replica leaves rotation
        # after fall x inter; one that is down is checked as often, so it comes back as fast.
        # Real traffic counts too (observe layer7): a replica that answers 503 (not ready, engine lost)
        # to two requests in a row is marked down at once. Without it, a replica failing fast has the
        # fewest connections, so leastconn sends it the retries of the very requests it refused.
        f"    default-server check inter {inter} fastinter {inter} downinter {inter} "
        f"fall {int(config.check_fall)} rise {int(config.check_rise)} observe layer7 error-limit 2 on-error mark-down",
    ]
    tls = ""
    if config.backend_ca_path:
        tls = f" ssl verify required ca-file {_word('replica CA path', config.backend_ca_path)}"
    for replica in config.replicas:
        name = _word("replica name", replica.name)
        lines.append(f"    server {name} {_host(f'{name} address', replica.address)}:{int(replica.port)}{tls}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ from the spec
def replica_name(index: int) -> str:
    return f"replica-{index}"


def balancer_config(spec, plan, **overrides) -> BalancerConfig:
    """The on-prem balancer of a spec: one server per replica head (its first host), on serving.port, its
    files where onprem.load_balancer puts them. Replicas serving TLS are verified against the
    deployment's CA, uploaded beside the certificate (BACKEND_CA_NAME)."""
    from runtime.planning.plan_spec import replica_hosts
    lb = spec.onprem_section.load_balancer
    if lb is None:
        raise UserError("onprem.load_balancer: not set (address: the host that runs HAProxy)")
    replicas = tuple(Replica(replica_name(i), group[0].address, spec.serving.port)
                     for i, group in enumerate(replica_hosts(spec, plan)))
    files = {"pem_path": f"{lb.config_dir}/certs/herd.pem", "socket_path": f"{lb.run_dir}/herd-admin.sock",
             "backend_ca_path": f"{lb.config_dir}/certs/herd-replicas-ca.pem" if spec.serving.tls_enabled else None}
    return BalancerConfig(replicas=replicas, bind_address=lb.listen_address, bind_port=lb.listen_port,
                          **{**files, **overrides})


def step_env(config: BalancerConfig, home: str, pem_source: str | None = None, config_path: str = CONFIG_PATH,
             pid_path: str = PID_PATH) -> dict[str, str]:
    """The 90-haproxy step's environment for this configuration. `pem_source`: where the installer
    uploaded the PEM bundle on the balancer (default HOME/secrets/haproxy.pem, 0600)."""
    if config.pem_path is None:   # a balancer the step installs faces the network: always TLS
        raise UserError("load balancer: a certificate (PEM bundle) is required on a balancer host")
    return {
        "HERD_HOME": home,
        "HERD_HAPROXY_CONFIG": render(config),
        "HERD_HAPROXY_CONFIG_PATH": _word("load balancer config path", config_path),
        "HERD_HAPROXY_PEM_SOURCE": _word("load balancer PEM upload path", pem_source or f"{home}/secrets/haproxy.pem"),
        "HERD_HAPROXY_PEM": config.pem_path,
        "HERD_HAPROXY_SOCKET": config.socket_path,
        "HERD_HAPROXY_PID": _word("load balancer pid path", pid_path),
        "HERD_HAPROXY_LISTEN": f"{config.bind_address}:{config.bind_port}",
    }


def balancer_steps(spec, plan):
    """The balancer host's steps (HostSteps, as for the serving hosts): 90-haproxy only. The installer
    uploads the PEM bundle to HOME/secrets/haproxy.pem and the replicas' CA to
    HOME/secrets/haproxy-replicas-ca.pem; the step installs both where the configuration reads them.
    Outside Debian's /etc/haproxy, HAProxy runs as one process of its own (Debian's unit would load
    /etc/haproxy/haproxy.cfg, not ours)."""
    from provisioning.steps import HostProfile, HostSteps, step_names
    lb, home = spec.onprem_section.load_balancer, spec.onprem_section.install_dir
    profile = HostProfile(name=lb.address, address=lb.address, node_rank=-1, gpu=False, gpus=0, home=home)
    config = balancer_config(spec, plan)
    env = step_env(config, home, f"{home}/secrets/haproxy.pem", config_path=f"{lb.config_dir}/haproxy.cfg",
                   pid_path=f"{lb.run_dir}/herd.pid")
    if config.backend_ca_path:
        env["HERD_HAPROXY_BACKEND_CA_SOURCE"] = f"{home}/secrets/haproxy-replicas-ca.pem"
        env["HERD_HAPROXY_BACKEND_CA"] = config.backend_ca_path
    if lb.config_dir != "/etc/haproxy":
        env["HERD_SYSTEMD"] = "0"
    skipped = {s: "load balancer host" for s in step_names() if s != "90-haproxy"}
    return HostSteps(profile, env, ["90-haproxy"], skipped)


# ------------------------------------------------------------------ the admin socket
def admin(socket_path: str, command: str, timeout: float = 5.0) -> str:
    """One command on HAProxy's admin socket (a Unix socket on the balancer host); its whole answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(socket_path)
        conn.sendall(command.encode() + b"\n")
        chunks = []
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks).decode()


@dataclass(frozen=True)
class ServerState:
    name: str
    status: str           # UP, DOWN, DRAIN, MAINT, "UP 1/2" (going down), "DOWN 1/2" (coming up), no check
    active_sessions: int
    total_sessions: int
    check_status: str     # L7OK, L7STS (wrong status), L4CON (refused), ...
    check_code: str       # the last check's HTTP status
    last_change_s: int    # seconds since the status last changed


def server_states(show_stat: str, backend: str = BACKEND) -> list[ServerState]:
    """The replicas as HAProxy sees them, from `show stat` (CSV with a '# ' header line)."""
    text = show_stat.lstrip()
    if not text.startswith("# "):
        raise ValueError(f"not `show stat` output: {show_stat[:80]!r}")
    rows = csv.DictReader(io.StringIO(text[2:]))
    return [ServerState(row["svname"], row["status"], int(row["scur"] or 0), int(row["stot"] or 0),
                        row["check_status"], row["check_code"], int(row["lastchg"] or 0))
            for row in rows if row["pxname"] == backend and row["svname"] not in ("FRONTEND", "BACKEND")]


AdminSocket = Union[str, Callable[[str], str]]   # a socket path here, or a function reaching one elsewhere


def ask(socket: AdminSocket, command: str) -> str:
    """One admin command: `socket` is the socket's path on this machine, or a function that sends the
    command to the balancer's socket on its host (over SSH) and returns the answer."""
    return socket(command) if callable(socket) else admin(socket, command)


def set_state(socket: AdminSocket, server: str, state: str, backend: str = BACKEND) -> str:
    """Take a replica out of rotation while its requests finish (drain), stop it (maint), or put it back
    (ready): what a rolling update does to one replica at a time. `socket`: as for ask()."""
    if state not in ("ready", "drain", "maint"):
        raise ValueError(f"state {state!r}: allowed ready, drain, maint")
    return ask(socket, f"set server {backend}/{_word('replica name', server)} state {state}")


def rolling_update(socket_path: AdminSocket, names: list[str], replace, ready, drain_timeout: float = GENERATION_TIMEOUT_S,
                   ready_timeout: float = 3600, poll_s: float = 0.2, say=lambda line: None,
                   backend: str = BACKEND) -> list[dict]:
    """Replace replicas one at a time behind HAProxy without failing a request: for each, check that every
    other replica is UP (else stop: draining this one could leave none), drain it (no new requests; those
    it has run to their end), wait until it has no session left, `replace(name)` (stop, update, start),
    wait until `ready(name)` (its /health/ready is 200), put it back, and wait until HAProxy's checks say
    UP before the next. Returns what happened to each, with timings."""
    import time

    def states() -> dict[str, ServerState]:
        return {s.name: s for s in server_states(ask(socket_path, "show stat"), backend)}

    def wait(what: str, condition, timeout: float) -> float:
        started = time.monotonic()
        while not condition():
            if time.monotonic() - started > timeout:
                raise UserError(f"rolling update: {what}: not within {timeout:.0f}s (stopped here; the other "
                                "replicas serve)")
            time.sleep(poll_s)
        return time.monotonic() - started

    done = []
    for name in names:
        others = {n: s.status for n, s in states().items() if n != name}
        if not others or any(status != "UP" for status in others.values()):
            raise UserError(f"rolling update: before {name}: the other replicas must be UP, they are {others} "
                            "(draining it now could leave no replica in rotation)")
        set_state(socket_path, name, "drain")
        say(f"{name}: draining")
        drained = wait(f"{name} draining", lambda: states()[name].active_sessions == 0, drain_timeout)
        started = time.monotonic()
        replace(name)
        replaced = time.monotonic() - started
        say(f"{name}: replaced; waiting until ready")
        became_ready = wait(f"{name} ready", lambda: ready(name), ready_timeout)
        say(f"{name}: ready; putting it back")
        set_state(socket_path, name, "ready")
        back = wait(f"{name} back in rotation", lambda: states()[name].status == "UP", 60)
        say(f"{name}: back in rotation")
        done.append({"replica": name, "drain_s": round(drained, 2), "replace_s": round(replaced, 2),
                     "ready_s": round(became_ready, 2), "up_s": round(back, 2)})
    return done
