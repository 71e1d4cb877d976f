"""Honest readiness and self-healing under failure, and multi-node launches, with real processes.

The healing tests share one `herd serve` (tiny model, 2 real ranks over gloo) with a short restart
window, so each kill, SIGSTOP or rejected connection is paid for with a restart, not a fresh start;
each of them leaves it ready again. The spent-budget test needs a server of its own: it exits.
"""
from __future__ import annotations

import concurrent.futures as futures
import contextlib
import json
import os
import re
import signal
import socket
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest
import torch

from runtime.serving.supervisor import EXIT_RESTARTS_SPENT, RestartBudget
from tests.runtime.conftest import alive, free_port

slow = pytest.mark.slow

WINDOW_S, MAX_RESTARTS, CANARY_TIMEOUT_S, CANARY_RETRIES = 4, 2, 4, 1
# Prompt ids, long enough that nothing finishes while a test breaks the group under it.
LONG = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 4000, "ignore_eos": True, "temperature": 0}


# ------------------------------------------------------------------ the budget itself (no processes)
def test_budget_counts_only_restarts_inside_the_window():
    budget = RestartBudget(limit=2, window_s=10, backoff_s=1, backoff_max_s=30)
    assert budget.take(0) == 1 and budget.take(1) == 2   # backoff doubles inside the window
    assert not budget.allows(5)                          # two within 10 s: spent
    assert budget.recent(10.5) == 1 and budget.allows(10.5)  # the first one aged out
    assert budget.take(10.5) == 2                         # one still counted: doubled once
    assert budget.recent(30) == 0 and budget.take(30) == 1   # all aged out: backoff starts over


def test_budget_caps_the_backoff_and_a_zero_budget_allows_nothing():
    budget = RestartBudget(10, 60, 1, 5)
    assert [budget.take(t) for t in range(5)] == [1, 2, 4, 5, 5]
    assert not RestartBudget(0, 60).allows(0)


# ------------------------------------------------------------------ helpers
def ready_status(url) -> tuple[int, dict]:
    r = httpx.get(f"{url}/health/ready", timeout=2)
    return r.status_code, r.json()


def wait_status(url: str, want: int, within: float, what: str) -> tuple[float, list[str]]:
    """Poll readiness until it answers `want`; returns (seconds, the distinct reasons seen meanwhile)."""
    started, reasons = time.monotonic(), []
    while True:
        try:
            status, health = ready_status(url)
            if health["reason"] not in reasons:
                reasons.append(health["reason"])
            if status == want:
                return time.monotonic() - started, reasons
        except httpx.TransportError:
            pass
        assert time.monotonic() - started < within, f"{what}: not {want} within {within}s; saw {reasons}"
        time.sleep(0.05)


def restarts(url: str) -> int:
    return ready_status(url)[1]["restarts"]


def restart_lines(srv, since: int) -> list[str]:
    """The supervisor's 'restarting worker group' log lines written after byte offset `since`."""
    text = (srv.state_dir / "serve.log").read_bytes()[since:].decode(errors="replace")
    return [line for line in text.splitlines() if "restarting worker group" in line]


def log_size(srv) -> int:
    return (srv.state_dir / "serve.log").stat().st_size


def wait_for_log(srv, since: int, text: str, within: float) -> None:
    """Until `text` appears in serve.log after byte `since`."""
    deadline = time.monotonic() + within
    while text not in (srv.state_dir / "serve.log").read_bytes()[since:].decode(errors="replace"):
        assert time.monotonic() < deadline, f"{text!r} not logged within {within:.0f}s"
        time.sleep(0.1)


_healed_at: dict[int, float] = {}  # port -> when the shared server was last seen ready after a restart


def recovered(srv, before: int, timeout: float = 120) -> float:
    """Wait until the server is ready again after exactly one more restart; returns the seconds."""
    took = srv.wait_ready(timeout=timeout)
    assert restarts(srv.url) == before + 1
    _healed_at[srv.port] = time.monotonic()
    return took


def past_the_window(srv) -> None:
    """Wait until the last restart is older than the window, so it no longer counts."""
    time.sleep(max(0.0, _healed_at.get(srv.port, 0) + WINDOW_S + 0.5 - time.monotonic()))


@dataclass
class Stream:
    """One streaming completion in a thread: how it ended, and when."""
    outcome: str = "running"   # done | error:<code> | cut (closed without either) | http <status> | exception:<type>
    ended_at: float | None = None
    started: threading.Event = field(default_factory=threading.Event)
    timeout: float = 30         # httpx's, per read: a request queued behind others waits for its first byte
    finish_reason: str | None = None

    def run(self, url: str, body: dict) -> None:
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True},
                              timeout=self.timeout) as r:
                if r.status_code != 200:
                    self.outcome = f"http {r.status_code}"
                    return
                self.outcome = self._read(r)
        except httpx.HTTPError as err:
            self.outcome = f"exception:{type(err).__name__}"
        finally:
            self.ended_at = time.monotonic()
            self.started.set()  # a stream that failed early must not keep the test waiting

    def _read(self, response) -> str:
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return "done"
            event = json.loads(line[len("data: "):])
            if "error" in event:
                return f"error:{event['error']['code']}"
            for choice in event.get("choices", []):   # the usage chunk has none
                self.finish_reason = choice.get("finish_reason") or self.finish_reason
            self.started.set()
        return "cut"


@pytest.fixture(scope="module")
def healing(tiny_model, serve_module):
    srv = serve_module("--model-dir", str(tiny_model), "--tp", "2", "--served-model-name", "tiny",
                       "--max-model-len", "4096", "--concurrency", "10", "--canary-interval", "1",
                       "--canary-timeout", str(CANARY_TIMEOUT_S), "--canary-retries", str(CANARY_RETRIES),
                       "--max-restarts", str(MAX_RESTARTS), "--restart-window", str(WINDOW_S),
                       name="healing")
    srv.wait_ready(timeout=180)
    return srv


# ------------------------------------------------------------------ healing, on the shared server
@slow
@pytest.mark.timeout(480)   # real ranks killed, stopped and restarted: up to ~3 min under load
def test_chaos_kill_a_rank_under_streaming_load(healing):
    """8 streams and a plain request in flight; kill -9 a rank: each ends within 10 s (an SSE error
    event, or 503 engine_lost), readiness drops within 5 s, and the group comes back."""
    srv, before = healing, restarts(healing.url)
    streams = [Stream() for _ in range(8)]
    with futures.ThreadPoolExecutor(9) as pool:
        plain = pool.submit(httpx.post, f"{srv.url}/v1/completions", json=LONG, timeout=30)
        for stream in streams:
            pool.submit(stream.run, srv.url, LONG)
        deadline = time.monotonic() + 60
        for stream in streams:
            assert stream.started.wait(max(0.0, deadline - time.monotonic())), "a stream never started"
        assert [s.outcome for s in streams] == ["running"] * 8, "a stream ended before the kill"
        victim = srv.rank_pid(1)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        flipped, reasons = wait_status(srv.url, 503, within=5, what="readiness after kill -9 of rank 1")
        answer = plain.result(timeout=15)
    ended = [s.ended_at - killed_at for s in streams]
    assert max(ended) < 10, f"streams ended {ended} s after the kill"
    assert {s.outcome for s in streams} == {"error:engine_lost"}, [s.outcome for s in streams]
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "engine_lost", answer.text

    took = recovered(srv, before)
    assert not alive(victim)
    ok = httpx.post(f"{srv.url}/v1/completions", json={**LONG, "max_tokens": 4}, timeout=30)
    assert ok.status_code == 200, ok.text
    print(f"\nchaos: ready dropped {flipped:.2f}s after the kill ({reasons[-1]!r}); all 9 requests ended "
          f"within {max(ended):.2f}s; ready again {took:.1f}s later")


@slow
@pytest.mark.timeout(480)   # real ranks killed, stopped and restarted: up to ~3 min under load
def test_kills_spaced_past_the_window_always_heal(healing):
    """More kills than --max-restarts (and, counting the other tests, than the old lifetime limit of
    3): each one spaced past the window is restarted, counted as the only one in it, backoff reset."""
    srv, since = healing, log_size(healing)
    for _ in range(MAX_RESTARTS + 1):
        past_the_window(srv)
        before = restarts(srv.url)
        os.kill(srv.rank_pid(1), signal.SIGKILL)
        wait_status(srv.url, 503, within=5, what="readiness after a kill")
        recovered(srv, before)
    lines = restart_lines(srv, since)
    assert len(lines) == MAX_RESTARTS + 1, lines
    for line in lines:
        assert f"1/{MAX_RESTARTS} within {WINDOW_S}s" in line and "in 1.0s" in line, line


@slow
@pytest.mark.timeout(480)   # real ranks killed, stopped and restarted: up to ~3 min under load
def test_a_stopped_rank_is_noticed_by_its_heartbeat_and_restarted(healing):
    """SIGSTOP (not kill) rank 1 while idle: its process lives, but its heartbeat stops; readiness
    drops, the group restarts (the stopped rank is killed) and becomes ready again."""
    srv = healing
    past_the_window(srv)
    before, since, victim = restarts(srv.url), log_size(srv), srv.rank_pid(1)
    os.kill(victim, signal.SIGSTOP)
    try:
        # The driver reports a silent rank after 2.5 s without a heartbeat; it checks every 0.5 s.
        flipped, _ = wait_status(srv.url, 503, within=6, what="readiness after SIGSTOP of rank 1")
        took = recovered(srv, before)
    finally:
        if alive(victim):  # never leave a stopped process behind, whatever failed
            os.kill(victim, signal.SIGKILL)
    assert not alive(victim)
    [line] = restart_lines(srv, since)
    assert "rank 1 stopped answering (no heartbeat for" in line, line
    print(f"\nSIGSTOP: ready dropped after {flipped:.2f}s, ready again {took:.1f}s later: {line}")


@slow
@pytest.mark.timeout(480)   # real ranks killed, stopped and restarted: up to ~3 min under load
def test_a_canary_timeout_is_retried_then_restarts_and_readiness_never_sticks(healing):
    """SIGSTOP the driver (rank 0) while idle: no rank reports anything, only the canary sees it.
    Resumed after one timed-out canary: the retry answers, with no restart, and readiness never
    dropped (it follows the restart decision, as a probe's failure threshold does: one slow canary
    must not take the group out of every balancer). Left stopped: the retries time out too, the group
    restarts (counted; 503 meanwhile) and readiness comes back."""
    srv = healing
    past_the_window(srv)
    before, driver = restarts(srv.url), srv.rank_pid(0)
    since = log_size(srv)

    os.kill(driver, signal.SIGSTOP)
    try:
        wait_for_log(srv, since, f"canary timed out after {CANARY_TIMEOUT_S}s", within=CANARY_TIMEOUT_S + 12)   # the next canary (every 1 s) and its timeout
        assert httpx.get(f"{srv.url}/health/ready", timeout=5).status_code == 200   # one failure: still ready
    finally:
        os.kill(driver, signal.SIGCONT)
    wait_status(srv.url, 200, within=CANARY_TIMEOUT_S + 3, what="the retried canary after SIGCONT")
    assert restarts(srv.url) == before and srv.rank_pid(0) == driver  # healed without a restart

    since = log_size(srv)
    os.kill(driver, signal.SIGSTOP)
    try:
        budget = (CANARY_RETRIES + 1) * CANARY_TIMEOUT_S + 3
        _, reasons = wait_status(srv.url, 503, within=budget, what="a driver stopped for good")
        took = recovered(srv, before)
    finally:
        if alive(driver):
            os.kill(driver, signal.SIGKILL)
    assert not alive(driver) and srv.rank_pid(0) != driver
    [line] = restart_lines(srv, since)
    assert f"canary failed {CANARY_RETRIES + 1} times in a row" in line, line
    print(f"\ncanary: ready again {took:.1f}s after it first dropped: {line}")


def control_address(srv) -> tuple[str, int]:
    """The control channel's address, from the driver rank's environment (where the launcher put it)."""
    environ = open(f"/proc/{srv.rank_pid(0)}/environ", "rb").read().split(b"\0")
    value = next(v for v in environ if v.startswith(b"HERD_CONTROL=")).split(b"=", 1)[1].decode()
    host, port = value.rsplit(":", 1)
    return host, int(port)


@slow
@pytest.mark.timeout(480)   # real ranks killed, stopped and restarted: up to ~3 min under load
def test_the_control_channel_refuses_a_wrong_token(healing):
    """Connections posing as the driver (wrong token, no token, not JSON) are closed and counted;
    the real driver keeps the channel: the server stays ready and answers."""
    srv, since = healing, log_size(healing)
    address = control_address(srv)
    hellos = [b'{"type":"hello","token":"0123456789abcdef0123456789abcdef"}\n',
              b'{"type":"hello"}\n', b'["hello"]\n', b"GET / HTTP/1.1\r\n\r\n"]
    for hello in hellos:
        with socket.create_connection(address, timeout=5) as conn:
            conn.sendall(hello)
            # Then behave like a driver. The supervisor may have closed already: the write may fail.
            with contextlib.suppress(OSError):
                conn.sendall(b'{"type":"done","id":"x","finish_reason":"stop"}\n')
            assert conn.recv(1024) == b"", f"{hello!r}: the connection was not closed"
    log = (srv.state_dir / "serve.log").read_bytes()[since:].decode(errors="replace")
    counts = [int(n) for n in re.findall(r"wrong or missing token \((\d+) rejected so far\)", log)]
    assert counts == list(range(counts[0], counts[0] + len(hellos))) if counts else False, log[-2000:]
    assert ready_status(srv.url)[0] == 200
    r = httpx.post(f"{srv.url}/v1/completions", json={**LONG, "max_tokens": 4, "return_token_ids": True},
                   timeout=30)
    assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) == 4, r.text


# ------------------------------------------------------------------ a spent budget
@slow
@pytest.mark.timeout(480)   # real ranks killed, stopped and restarted: up to ~3 min under load
def test_a_spent_budget_fails_the_stream_and_exits_with_the_documented_code(tiny_model, serve):
    """--max-restarts 1: the first kill is restarted, the second inside the window spends the budget:
    the stream in flight gets its error event, and herd serve exits 75 with a one-line reason."""
    srv = serve("--model-dir", str(tiny_model), "--tp", "2", "--served-model-name", "tiny",
                "--max-model-len", "4096", "--canary-interval", "1", "--max-restarts", "1",
                "--restart-window", "300")
    srv.wait_ready(timeout=180)
    os.kill(srv.rank_pid(1), signal.SIGKILL)
    wait_status(srv.url, 503, within=5, what="readiness after the first kill")
    srv.wait_ready(timeout=120)

    stream = Stream()
    reader = threading.Thread(target=stream.run, args=(srv.url, LONG))
    reader.start()
    assert stream.started.wait(30) and stream.outcome == "running", stream.outcome
    os.kill(srv.rank_pid(1), signal.SIGKILL)
    killed_at = time.monotonic()
    code = srv.proc.wait(timeout=30)
    exited_after = time.monotonic() - killed_at
    reader.join(10)
    assert code == EXIT_RESTARTS_SPENT, srv.log_text()
    assert stream.outcome == "error:engine_lost" and stream.ended_at - killed_at < 10, stream.outcome
    last = srv.log_text().strip().splitlines()[-1]
    assert last.startswith(f"herd serve: exiting {EXIT_RESTARTS_SPENT}: restart budget spent: "), last
    assert "failed 2 time(s) within 300s (--max-restarts 1 per --restart-window 300)" in last, last
    print(f"\nspent budget: exited {code} {exited_after:.2f}s after the second kill: {last}")


# ------------------------------------------------------------------ startup and multi-node
@slow
@pytest.mark.timeout(480)   # real ranks killed, stopped and restarted: up to ~3 min under load
def test_requests_before_ready_get_503_with_the_reason(tiny_model, serve):
    srv = serve("--model-dir", str(tiny_model), "--tp", "2", "--served-model-name", "tiny")
    seen, refused = set(), 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            status, health = ready_status(srv.url)
        except httpx.TransportError:
            time.sleep(0.05)
            continue
        if status == 200:
            break
        seen.add(health["reason"])
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
        if r.status_code == 200:  # became ready between the probe and the request
            assert ready_status(srv.url)[0] == 200
            break
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        refused += 1
        time.sleep(0.05)
    assert refused > 0
    assert httpx.get(f"{srv.url}/health/live").status_code == 200
    assert any("rank" in reason or "loaded" in reason or "canary" in reason for reason in seen), seen


@slow
@pytest.mark.timeout(480)   # real ranks killed, stopped and restarted: up to ~3 min under load
def test_two_node_launch_on_loopback_serves_the_same_tokens(tiny_model, serve):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    prompt = [5, 17, 99, 3]
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[0, len(prompt):].tolist()

    rdzv = f"127.0.0.1:{free_port()}"
    common = ["--model-dir", str(tiny_model), "--tp", "1", "--nnodes", "2", "--rdzv-endpoint", rdzv,
              "--node-addr", "127.0.0.1", "--served-model-name", "tiny"]
    head = serve(*common, "--role", "head", name="head")
    worker = serve(*common, "--role", "worker", name="worker")
    head.wait_ready(timeout=180)
    _, health = ready_status(head.url)
    assert health["world_size"] == 2 and health["ranks_loaded"] == 2
    r = httpx.post(f"{head.url}/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 16,
                                                        "temperature": 0, "ignore_eos": True,
                                                        "return_token_ids": True}, timeout=60)
    assert r.json()["choices"][0]["token_ids"] == ref
    assert worker.proc.poll() is None
