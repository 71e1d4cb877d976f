"""The on-prem load balancer: HAProxy's configuration (validated by the real `haproxy -c`), the step that
installs it, and two real replicas of the tiny model behind a real HAProxy over TLS on loopback, under a
steady client load while one replica's rank is killed."""
from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from provisioning.haproxy import (BACKEND, BalancerConfig, Replica, admin, balancer_config, balancer_steps,
                                  render, rolling_update, server_states, set_state, step_env)
from provisioning.steps import STEPS_DIR
from runtime.errors import UserError
from runtime.planning.plan_spec import request_from_spec
from runtime.planning.planner import plan
from runtime.planning.spec import parse_spec
from tests.conftest import ROOT

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
needs_haproxy = pytest.mark.skipif(not os.path.exists(HAPROXY), reason="haproxy is installed by `make system`")
slow = pytest.mark.slow


# ------------------------------------------------------------------ a throwaway CA and server certificate
@dataclass
class Certs:
    ca: Path          # the CA certificate clients trust
    bundle: Path      # the server's certificate + key: what HAProxy loads


def make_certs(directory: Path, address: str = "127.0.0.1") -> Certs:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "herd test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, address)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(address))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    bundle = directory / "lb.pem"
    bundle.write_bytes(leaf.public_bytes(pem) + key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                                  serialization.NoEncryption()))
    bundle.chmod(0o600)
    return Certs(directory / "ca.pem", bundle)


def haproxy_check(config_text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "candidate.cfg"
    path.write_text(config_text)
    return subprocess.run([HAPROXY, "-c", "-f", str(path)], capture_output=True, text=True)


# ------------------------------------------------------------------ the configuration
ONPREM = yaml.safe_load((ROOT / "environments" / "onprem-example.yaml").read_text())


def onprem_spec(replicas: int = 2, hosts: int = 4, nodes="auto", **lb):
    data = json.loads(json.dumps(ONPREM))
    data["onprem"]["hosts"] = [{"address": f"10.0.0.{11 + i}", "user": "ubuntu"} for i in range(hosts)]
    data["onprem"]["load_balancer"] = {"address": "10.0.0.5", **lb}
    data["parallelism"]["nodes"] = nodes
    data["replicas"] = replicas
    return parse_spec(data, "onprem-replicas")


def test_each_replica_head_is_a_backend_on_the_serving_port():
    spec = onprem_spec(replicas=2, hosts=4, nodes=2)
    config = balancer_config(spec, plan(request_from_spec(spec)))
    # Replica 0 is hosts 1-2, replica 1 hosts 3-4: their heads are the first host of each group.
    assert config.replicas == (Replica("replica-0", "10.0.0.11", 8000), Replica("replica-1", "10.0.0.13", 8000))
    assert (config.bind_address, config.bind_port) == ("0.0.0.0", 443)
    spec = onprem_spec(replicas=3, hosts=3, listen_port=8443, listen_address="10.0.0.5")
    config = balancer_config(spec, plan(request_from_spec(spec)))
    assert [r.address for r in config.replicas] == ["10.0.0.11", "10.0.0.12", "10.0.0.13"]
    assert "    bind 10.0.0.5:8443 ssl crt /etc/haproxy/certs/herd.pem alpn h2,http/1.1" in render(config).splitlines()


@needs_haproxy
def test_the_configuration_is_valid_for_real_haproxy_and_says_what_matters(tmp_path):
    certs = make_certs(tmp_path)
    spec = onprem_spec(replicas=2, hosts=2)
    text = render(balancer_config(spec, plan(request_from_spec(spec)), pem_path=str(certs.bundle),
                                  socket_path=str(tmp_path / "admin.sock"), backend_ca_path=str(certs.ca)))
    done = haproxy_check(text, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Configuration file is valid" in done.stdout
    lines = [line.strip() for line in text.splitlines()]
    backend = lines[lines.index(f"backend {BACKEND}"):]
    for expected in ("balance leastconn", "option httpchk",
                     "http-check send meth GET uri /health/ready ver HTTP/1.1 hdr Host herd-load-balancer",
                     "http-check expect status 200",
                     "default-server check inter 1s fastinter 1s downinter 1s fall 2 rise 2 observe layer7 error-limit 2 "
                     "on-error mark-down",
                     f"server replica-0 10.0.0.11:8000 ssl verify required ca-file {certs.ca}",
                     f"server replica-1 10.0.0.12:8000 ssl verify required ca-file {certs.ca}"):
        assert expected in backend, expected
    timeouts = {line.split()[1]: line.split()[2] for line in lines if line.startswith("timeout ")}
    # Long non-streaming generations and silent SSE prefill: far above ALB's 60 s / GCP's 30 s defaults.
    assert timeouts["server"] == timeouts["client"] == timeouts["tunnel"] == "900s"
    assert timeouts["connect"] == "5s" and timeouts["http-request"] == "30s"
    assert f"bind 0.0.0.0:443 ssl crt {certs.bundle} alpn h2,http/1.1" in lines
    assert f"stats socket {tmp_path / 'admin.sock'} mode 600 level admin" in lines
    assert {"retries 3", "option redispatch 1", "retry-on conn-failure empty-response junk-response 503",
            "option http-buffer-request"} <= set(lines)


@needs_haproxy
def test_ipv6_replicas_a_replica_ca_and_haproxy_own_errors_are_valid(tmp_path):
    certs = make_certs(tmp_path)
    config = BalancerConfig((Replica("replica-0", "fd00::11", 8000), Replica("replica-1", "127.0.0.1", 8001)),
                            pem_path=str(certs.bundle), socket_path=str(tmp_path / "s.sock"),
                            backend_ca_path=str(certs.ca), generation_timeout_s=1800)
    text = render(config)
    assert "server replica-0 [fd00::11]:8000 ssl verify required ca-file" in text
    assert "timeout server 1800s" in text
    done = haproxy_check(text, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("config, field", [
    (BalancerConfig((Replica("r0", "10.0.0.1", 1),), pem_path="/etc/x.pem\n    stats socket /tmp/x level admin"),
     "load balancer certificate (PEM bundle) path"),
    (BalancerConfig((Replica("r0", "10.0.0.1", 1),), socket_path="/run/x.sock\n"), "stats socket path"),
    (BalancerConfig((Replica("r0", "10.0.0.1 backup", 1),)), "r0 address"),
    (BalancerConfig((Replica("r0", "node1.lan\n", 1),)), "r0 address"),
    (BalancerConfig((Replica("r0 weight 0", "10.0.0.1", 1),)), "replica name"),
    (BalancerConfig((Replica("r0", "10.0.0.1", 1), Replica("r0", "10.0.0.2", 1))), "replica names repeat"),
    (BalancerConfig(()), "no replica"),
    (BalancerConfig((Replica("r0", "10.0.0.1", 1),), generation_timeout_s=30), "at least 60s"),
])
def test_values_that_would_inject_directives_are_refused_by_name(config, field):
    with pytest.raises(UserError, match=re.escape(field)):
        render(config)


# ------------------------------------------------------------------ the step
def run_step(env: dict, dry_run: bool = False) -> subprocess.CompletedProcess:
    cmd = ["bash", str(STEPS_DIR / "90-haproxy.sh")] + (["--dry-run"] if dry_run else [])
    return subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=60)


def test_only_the_balancer_runs_the_step():
    serving_host = run_step({"HERD_HOME": "/nonexistent"})
    assert serving_host.returncode == 0 and "90-haproxy: skip: not the load balancer" in serving_host.stdout
    spec = onprem_spec(replicas=2, hosts=2)
    steps = balancer_steps(spec, plan(request_from_spec(spec)))
    assert steps.steps == ["90-haproxy"] and steps.profile.address == "10.0.0.5"
    assert "70-service" in steps.skipped and "50-venv" in steps.skipped
    assert steps.env["HERD_HAPROXY_PEM_SOURCE"] == "/opt/herd/secrets/haproxy.pem"
    dry = run_step(steps.env, dry_run=True)
    assert dry.returncode == 0, dry.stderr
    assert "would run: install -m 0600 /opt/herd/secrets/haproxy.pem /etc/haproxy/certs/herd.pem" in dry.stdout
    assert "would run: install -m 0644" in dry.stdout and "/etc/haproxy/haproxy.cfg" in dry.stdout
    assert "server replica-1 10.0.0.12:8000" in dry.stdout
    # The replicas serve TLS: their CA is uploaded and installed where the configuration reads it.
    assert ("would run: install -m 0644 /opt/herd/secrets/haproxy-replicas-ca.pem "
            "/etc/haproxy/certs/herd-replicas-ca.pem") in dry.stdout
    assert "ca-file /etc/haproxy/certs/herd-replicas-ca.pem" in dry.stdout and "HERD_SYSTEMD" not in steps.env
    # Outside Debian's /etc/haproxy its unit would load another file: HAProxy runs as its own process.
    elsewhere = balancer_steps(onprem_spec(replicas=2, hosts=2, config_dir="/opt/lb", run_dir="/opt/lb/run"),
                               plan(request_from_spec(spec)))
    assert elsewhere.env["HERD_SYSTEMD"] == "0" and elsewhere.env["HERD_HAPROXY_CONFIG_PATH"] == "/opt/lb/haproxy.cfg"
    assert elsewhere.env["HERD_HAPROXY_SOCKET"] == "/opt/lb/run/herd-admin.sock"


@dataclass
class Balancer:
    env: dict
    socket: str
    pid_file: Path
    url: str

    def states(self) -> dict:
        return {s.name: s for s in server_states(admin(self.socket, "show stat"))}

    def stop(self) -> None:
        if self.pid_file.exists():
            pid = int(self.pid_file.read_text().split()[0])
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.05)


def start_balancer(tmp_path: Path, replicas: list[Replica], certs: Certs, port: int) -> Balancer:
    """HAProxy on loopback, installed and started by the real step (no systemd: a managed process)."""
    etc, run = tmp_path / "etc", tmp_path / "run"
    config = BalancerConfig(tuple(replicas), bind_address="127.0.0.1", bind_port=port,
                            pem_path=str(etc / "certs" / "herd.pem"), socket_path=str(run / "admin.sock"))
    env = {**step_env(config, str(tmp_path / "home"), str(certs.bundle), config_path=str(etc / "haproxy.cfg"),
                      pid_path=str(run / "haproxy.pid")), "HERD_SYSTEMD": "0"}
    return Balancer(env, config.socket_path, run / "haproxy.pid", f"https://127.0.0.1:{port}")


@needs_haproxy
def test_the_step_installs_validates_starts_and_is_idempotent(tmp_path):
    from tests.runtime.conftest import free_port
    certs = make_certs(tmp_path)
    lb = start_balancer(tmp_path, [Replica("replica-0", "127.0.0.1", free_port())], certs, free_port())
    try:
        first = run_step(lb.env)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "90-haproxy: ok: haproxy 2." in first.stdout
        pem = Path(lb.env["HERD_HAPROXY_PEM"])
        assert pem.read_bytes() == certs.bundle.read_bytes() and (pem.stat().st_mode & 0o777) == 0o600
        pid = lb.pid_file.read_text().split()[0]
        again = run_step(lb.env)
        assert again.returncode == 0 and "ok: configuration up to date; haproxy running" in again.stdout
        assert lb.pid_file.read_text().split()[0] == pid
        # A new certificate with the same configuration: HAProxy reloads to serve it.
        (tmp_path / "renewed").mkdir()
        renewed = make_certs(tmp_path / "renewed")
        swapped = run_step({**lb.env, "HERD_HAPROXY_PEM_SOURCE": str(renewed.bundle)})
        assert swapped.returncode == 0 and "up to date" not in swapped.stdout, swapped.stdout + swapped.stderr
        assert lb.pid_file.read_text().split()[0] != pid and pem.read_bytes() == renewed.bundle.read_bytes()
        certs = renewed
        pid = lb.pid_file.read_text().split()[0]
        # No replica listens: it is DOWN, and HAProxy answers the API's own error shape.
        deadline = time.monotonic() + 10
        while lb.states()["replica-0"].status != "DOWN" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert lb.states()["replica-0"].status == "DOWN"
        answer = httpx.get(f"{lb.url}/v1/models", verify=ssl.create_default_context(cafile=str(certs.ca)))
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "no_replica_ready"
        # A changed configuration reloads (a new process takes over); a broken one is refused, the old kept.
        changed = {**lb.env, "HERD_HAPROXY_CONFIG": lb.env["HERD_HAPROXY_CONFIG"].replace("maxconn 4096", "maxconn 2048")}
        reloaded = run_step(changed)
        assert reloaded.returncode == 0, reloaded.stdout + reloaded.stderr
        assert lb.pid_file.read_text().split()[0] != pid
        broken = {**lb.env, "HERD_HAPROXY_CONFIG": changed["HERD_HAPROXY_CONFIG"] + "    frobnicate yes\n"}
        refused = run_step(broken)
        assert refused.returncode == 1 and "the rendered configuration is invalid" in refused.stderr
        assert "maxconn 2048" in Path(lb.env["HERD_HAPROXY_CONFIG_PATH"]).read_text()
    finally:
        lb.stop()


# ------------------------------------------------------------------ two real replicas behind it
@dataclass
class Outcome:
    started: float
    ended: float
    ok: bool
    replica: str | None
    detail: str
    stream: bool


def one_request(client: httpx.Client, url: str, stream: bool, model: str = "tiny") -> Outcome:
    """One completion (streamed or not) through `client` (which carries any API key)."""
    body = {"model": model, "prompt": "Hello world", "max_tokens": 8, "temperature": 0}
    started = time.monotonic()
    replica, detail, ok = None, "", False
    try:
        if stream:
            with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
                replica = r.headers.get("x-herd-replica")
                events = [line for line in r.iter_lines() if line.startswith("data: ")]
                ok = r.status_code == 200 and events[-1:] == ["data: [DONE]"] and \
                    not any('"error"' in e for e in events)
                detail = f"{r.status_code} {events[-2:]}"
        else:
            r = client.post(f"{url}/v1/completions", json=body)
            replica = r.headers.get("x-herd-replica")
            ok = r.status_code == 200 and bool(r.json()["choices"][0]["text"] is not None)
            detail = f"{r.status_code} {r.text[:200]}"
    except httpx.HTTPError as err:
        detail = f"{type(err).__name__}: {err}"
    return Outcome(started, time.monotonic(), ok, replica, detail, stream)


class Load:
    """`threads` clients in a loop (the last `streams` of them streaming) until stopped, or `limit`
    seconds at most: a bounded load. A request that takes longer than `timeout` s (httpx's, between
    bytes: a non-streaming answer sends none until it ends) fails."""

    def __init__(self, url: str, ca: Path, threads: int = 4, streams: int = 1, limit: float = 60,
                 headers: dict | None = None, model: str = "tiny", timeout: float = 30):
        self.outcomes: list[Outcome] = []
        self.stopped = threading.Event()
        self.timeout = timeout
        context = ssl.create_default_context(cafile=str(ca))
        end = time.monotonic() + limit

        def client_loop(stream: bool):
            with httpx.Client(verify=context, timeout=timeout, headers=headers) as client:
                while not self.stopped.is_set() and time.monotonic() < end:
                    self.outcomes.append(one_request(client, url, stream, model))

        self.workers = [threading.Thread(target=client_loop, args=(i >= threads - streams,), daemon=True)
                        for i in range(threads)]
        for w in self.workers:
            w.start()

    def served_by(self) -> set:
        return {o.replica for o in list(self.outcomes) if o.ok}

    def stop(self, timeout: float | None = None) -> list[Outcome]:
        """Stop, once each client's request in flight has ended (within `timeout` s, default: a request's
        own timeout and then some)."""
        self.stopped.set()
        for w in self.workers:
            w.join(self.timeout + 30 if timeout is None else timeout)
        assert not any(w.is_alive() for w in self.workers), "the load did not end"
        return self.outcomes


def serve_args(model: Path, max_model_len: int) -> list[str]:
    return ["--model-dir", str(model), "--tp", "1", "--served-model-name", "tiny", "--max-model-len",
            str(max_model_len), "--concurrency", "4", "--canary-interval", "1", "--max-restarts", "10"]


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory):
    from tests.runtime.conftest import ServeProcess, make_tiny_model, stop_and_check
    if not os.path.exists(HAPROXY):
        pytest.skip("haproxy is installed by `make system`")
    model = make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))
    servers = []
    for i in range(2):
        state = tmp_path_factory.mktemp(f"replica-{i}")
        servers.append(ServeProcess(serve_args(model, 512), state).start())
    tmp = tmp_path_factory.mktemp("balancer")
    certs = make_certs(tmp)
    from tests.runtime.conftest import free_port
    lb = start_balancer(tmp, [Replica(f"replica-{i}", "127.0.0.1", s.port) for i, s in enumerate(servers)],
                        certs, free_port())
    try:
        for server in servers:
            server.wait_ready(timeout=180)
        done = run_step(lb.env)
        assert done.returncode == 0, done.stdout + done.stderr
        wait_states(lb, {"replica-0": "UP", "replica-1": "UP"}, within=15)
        yield servers, lb, certs, model, tmp_path_factory
    finally:
        lb.stop()
        for server in servers:
            stop_and_check(server)


def wait_states(lb: Balancer, want: dict, within: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < within:
        states = lb.states()
        if all(states[name].status == status for name, status in want.items()):
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"not {want} within {within}s: {lb.states()}")


@slow
@pytest.mark.timeout(420)   # two replicas, HAProxy and a load: 60-190 s here
def test_a_killed_replica_leaves_rotation_without_failed_requests_and_comes_back(two_replicas):
    servers, lb, certs, *_ = two_replicas
    victim_server = servers[1]
    load = Load(lb.url, certs.ca, threads=4, streams=1, limit=90)
    started = time.monotonic()
    # Steady state first: both replicas have answered (on this shared 2-core machine, seconds).
    while load.served_by() != {"replica-0", "replica-1"} and time.monotonic() - started < 30:
        time.sleep(0.2)
    time.sleep(2)
    victim = victim_server.rank_pid(0)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    down_after = wait_states(lb, {"replica-1": "DOWN"}, within=10)
    detected_at = killed_at + down_after
    up_after = wait_states(lb, {"replica-1": "UP"}, within=120)
    time.sleep(3)   # the load goes on a little after it is back
    outcomes = load.stop()

    failed = [o for o in outcomes if not o.ok]
    in_flight = [o for o in failed if o.started <= killed_at <= o.ended]
    after_detection = [o for o in failed if o.started >= detected_at]
    before = [o for o in outcomes if o.ended < killed_at]
    assert {o.replica for o in before} == {"replica-0", "replica-1"}, "both replicas served before the kill"
    assert not after_detection, [o.detail for o in after_detection]
    assert failed == in_flight, [(o.started - killed_at, o.detail) for o in failed]
    assert {o.replica for o in failed} <= {"replica-1", None}, [(o.replica, o.detail) for o in failed]
    assert len(outcomes) > 40, len(outcomes)
    # Back in rotation: it answers requests again.
    context = ssl.create_default_context(cafile=str(certs.ca))
    with httpx.Client(verify=context, timeout=30) as client:
        seen = set()
        for _ in range(20):
            outcome = one_request(client, lb.url, stream=False)
            assert outcome.ok, outcome.detail
            seen.add(outcome.replica)
            if seen == {"replica-0", "replica-1"}:
                break
    assert seen == {"replica-0", "replica-1"}, seen
    streams = [o for o in outcomes if o.stream]
    failures = [(o.replica, "stream" if o.stream else "plain", o.detail[-90:]) for o in failed]
    print(f"\nkill under load: {len(outcomes)} requests ({len(streams)} streamed), {len(failed)} failed "
          f"(all in flight at the kill: {len(in_flight)}: {failures}); replica-1 DOWN "
          f"{down_after:.2f}s after kill -9 of its rank, UP again {up_after:.1f}s after it")


@slow
@pytest.mark.timeout(420)   # two replicas, HAProxy and a load: 60-190 s here
def test_a_drained_replica_gets_no_new_requests_and_comes_back_when_ready(two_replicas):
    servers, lb, certs, *_ = two_replicas
    wait_states(lb, {"replica-0": "UP", "replica-1": "UP"}, within=120)
    set_state(lb.socket, "replica-0", "drain")
    try:
        assert lb.states()["replica-0"].status == "DRAIN"
        context = ssl.create_default_context(cafile=str(certs.ca))
        with httpx.Client(verify=context, timeout=30) as client:
            assert {one_request(client, lb.url, stream=False).replica for _ in range(6)} == {"replica-1"}
    finally:
        set_state(lb.socket, "replica-0", "ready")
    assert lb.states()["replica-0"].status == "UP"


@slow
@pytest.mark.timeout(420)   # two replicas, HAProxy and a load: 60-190 s here
def test_a_rolling_update_under_load_replaces_one_replica_at_a_time_without_a_failed_request(two_replicas):
    """max_model_len 512 -> 256 on both replicas, one after the other (drain, stop, start, ready, back),
    while 4 clients keep sending: no request fails, and while one is replaced the other answers all."""
    from tests.runtime.conftest import ServeProcess, stop_and_check
    servers, lb, certs, model, tmp_factory = two_replicas
    wait_states(lb, {"replica-0": "UP", "replica-1": "UP"}, within=120)
    windows = {}

    def replace(name: str) -> None:
        index = int(name.rsplit("-", 1)[1])
        old = servers[index]
        stop_and_check(old)
        servers[index] = ServeProcess(serve_args(model, 256), tmp_factory.mktemp(f"{name}-v2"), port=old.port).start()

    def ready(name: str) -> bool:
        try:
            return httpx.get(f"{servers[int(name.rsplit('-', 1)[1])].url}/health/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    load = Load(lb.url, certs.ca, threads=4, streams=1, limit=240)
    try:
        time.sleep(2)
        # From "draining" to "back in rotation": the replica is out (its own requests run to their end).
        steps = rolling_update(lb.socket, ["replica-0", "replica-1"], replace, ready, drain_timeout=60,
                               ready_timeout=120, say=lambda line: windows.setdefault(line.split(":")[0], [])
                               .append(time.monotonic()))
        time.sleep(2)
    finally:
        outcomes = load.stop()
    failed = [o for o in outcomes if not o.ok]
    assert not failed, [(o.replica, o.detail) for o in failed]
    for name, other in (("replica-0", "replica-1"), ("replica-1", "replica-0")):
        begin, _, end, _ = windows[name]     # draining, replaced, ready (put back), back in rotation
        # A request the client started in the instant before HAProxy applied the drain may still land on
        # the draining replica (it is served, not failed): count from a second after the drain, and up
        # to the moment it is put back (from then on HAProxy may send it requests again).
        during = {o.replica for o in outcomes if o.started >= begin + 1.0 and o.ended <= end}
        assert during == {other}, (name, during)
    assert [s.args[s.args.index("--max-model-len") + 1] for s in servers] == ["256", "256"]
    wait_states(lb, {"replica-0": "UP", "replica-1": "UP"}, within=30)
    print(f"\nrolling update under load: {len(outcomes)} requests, 0 failed; {steps}")


@needs_haproxy
def test_a_loopback_balancer_may_serve_plain_http_and_no_other(tmp_path):
    """The local target's replicas on loopback: HAProxy without TLS, only on a loopback address."""
    replicas = (Replica("replica-0", "127.0.0.1", 8001), Replica("replica-1", "127.0.0.1", 8002))
    config = BalancerConfig(replicas=replicas, bind_address="127.0.0.1", bind_port=8000, pem_path=None,
                            socket_path=str(tmp_path / "admin.sock"), run_as=None, chroot=None, log_target="stdout")
    text = render(config)
    done = haproxy_check(text, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line.strip() for line in text.splitlines()]
    assert "bind 127.0.0.1:8000" in lines and "http-request set-header X-Forwarded-Proto http" in lines
    with pytest.raises(UserError, match="0.0.0.0 is not loopback: it needs a certificate"):
        render(BalancerConfig(replicas=replicas, bind_address="0.0.0.0", pem_path=None))
