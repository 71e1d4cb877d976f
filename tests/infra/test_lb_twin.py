"""The clouds' load balancers as their programs declare them (tests/infra/lb_twin.py: HAProxy built from
the declared listener, target group or backend service and health check), in front of a real herd head
serving as a cloud node does: bound to every address, so HTTPS with the deployment's CA and an API key.
The health check must pass and a chat must go through, or no replica deployment on that cloud works."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from provisioning.haproxy import admin, server_states
from tests.infra.lb_twin import Head, declared_aws, declared_gcp, haproxy_config
from tests.infra.test_lb_clouds import API_KEY, aws_two_groups, gcp_groups
from tests.provisioning.test_haproxy import HAPROXY, make_certs

pytestmark = [pytest.mark.twin, pytest.mark.slow,
              pytest.mark.skipif(not os.path.exists(HAPROXY), reason="haproxy is installed by `make system`")]


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("HERD_API_KEY", API_KEY)


@pytest.fixture(scope="module")
def cloud_head(tmp_path_factory):
    """One herd head as the cloud nodes run it (--host 0.0.0.0: TLS and an API key), shared by the cases."""
    from tests.runtime.conftest import ServeProcess, make_tiny_model, stop_and_check
    model = make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))
    head = ServeProcess(["--model-dir", str(model), "--host", "0.0.0.0", "--api-key-env", "TWIN_KEY",
                         "--served-model-name", "tiny", "--canary-interval", "30"],
                        tmp_path_factory.mktemp("head"), env={"TWIN_KEY": API_KEY}, tls=True).start()
    try:
        head.wait_ready(timeout=240)
        yield head
    finally:
        stop_and_check(head)


@dataclass
class Twin:
    proc: subprocess.Popen
    socket: str
    url: str
    ca: Path

    def head_state(self):
        (state,) = server_states(admin(self.socket, "show stat"), backend="heads")
        return state

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_twin(declared, head, tmp_path: Path) -> Twin:
    from tests.runtime.conftest import free_port
    certs = make_certs(tmp_path)          # the listener's certificate (ACM's or the user's on a cloud)
    port, socket = free_port(), str(tmp_path / "admin.sock")
    config = tmp_path / "twin.cfg"
    config.write_text(haproxy_config(declared, [Head("head-0", "127.0.0.1", head.port)], port, str(certs.bundle),
                                     socket))
    checked = subprocess.run([HAPROXY, "-c", "-q", "-f", str(config)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr + config.read_text()
    proc = subprocess.Popen([HAPROXY, "-W", "-db", "-f", str(config)], stdout=open(tmp_path / "twin.log", "wb"),
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while not os.path.exists(socket):
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "twin.log").read_text()
        time.sleep(0.05)
    return Twin(proc, socket, f"https://127.0.0.1:{port}", certs.ca)


def first_check(twin: Twin, within: float):
    """The head's state once the declared health check has run on it at least once."""
    deadline = time.monotonic() + within
    while True:
        state = twin.head_state()
        if state.check_status not in ("", "INI") and not state.check_status.startswith("*"):
            return state
        assert time.monotonic() < deadline, f"no health check result within {within:.0f}s: {state}"
        time.sleep(0.2)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("cloud", ["aws", "gcp"])
def test_the_declared_balancer_finds_the_head_healthy_and_a_chat_goes_through(cloud, run_stack, tmp_path, cloud_head):
    mocks, _ = (aws_two_groups if cloud == "aws" else gcp_groups)(run_stack, tmp_path)
    declared = declared_aws(mocks) if cloud == "aws" else declared_gcp(mocks)
    twin = start_twin(declared, cloud_head, tmp_path)
    try:
        state = first_check(twin, within=declared.interval_s + declared.timeout_s + 10)
        assert state.check_status == "L7OK", (
            f"{cloud}: the declared {declared.check_protocol} health check of {declared.check_path} against a "
            f"head serving HTTPS: {state.check_status} {state.check_code} (the balancer would never mark it healthy)")
        deadline = time.monotonic() + declared.interval_s * (declared.healthy_threshold + 1) + declared.timeout_s
        while twin.head_state().status != "UP":
            assert time.monotonic() < deadline, f"{cloud}: not UP: {twin.head_state()}"
            time.sleep(0.2)
        reply = httpx.post(f"{twin.url}/v1/chat/completions", verify=str(twin.ca), timeout=120,
                           headers={"Authorization": f"Bearer {API_KEY}"},
                           json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] >= 1
    finally:
        twin.stop()
