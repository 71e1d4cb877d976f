"""herd's front before an engine in its own process (the vLLM path), with a real stand-in engine:
herd's own server on a tiny model, started by the sidecar as its engine command (or, for engines that
fail on their own, a few lines of Python)."""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest

from runtime.engine.external import summary_line
from runtime.serving.supervisor import EXIT_RESTARTS_SPENT
from tests.runtime.conftest import alive, free_port


def engine_pid(state_dir) -> int:
    """The stand-in engine writes its own pid file (it is `herd serve` too)."""
    return int((state_dir / "engine-serve.pid").read_text())


def stand_in_engine(tiny_model, engine_state, engine_port: int, *extra: str) -> str:
    """herd's own server on the tiny model as the engine command: a wrapper that records its pid,
    waits 2 s (vLLM loads before it listens), then serves."""
    return shlex.join([sys.executable, "-c",
                       "import os,sys,time,runpy; open(sys.argv[1],'w').write(str(os.getpid())); time.sleep(2); "
                       "sys.argv=['herd']+sys.argv[2:]; runpy.run_module('infra.cli', run_name='__main__')",
                       str(engine_state / "engine-serve.pid"), "serve", "--model-dir", str(tiny_model),
                       "--port", str(engine_port), "--served-model-name", "tiny", "--state-dir", str(engine_state),
                       "--canary-interval", "1", *extra])


def failing_engine(code: str) -> str:
    """An engine command that is a Python program failing its own way (it never listens)."""
    return shlex.join([sys.executable, "-c", code])


def wait_for(what: str, check, within: float, every: float = 0.1):
    """Poll `check` until it returns something true (which is returned); fail after `within` s."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(every)
    raise AssertionError(f"{what}: not within {within:g}s")


def health(front) -> httpx.Response | None:
    try:
        return httpx.get(f"{front.url}/health/ready", timeout=5)
    except httpx.TransportError:   # not listening yet (or any more)
        return None


def serve_log(front) -> str:
    return (front.state_dir / "serve.log").read_text(errors="replace")


# Prompt ids for a stream that outlasts a few canaries: the busy test slows every decode step of its
# stand-in engine by STEP_DELAY_S (HERD_TEST_STEP_DELAY_S), so 4000 tokens take >= 200 s however fast
# the host is: longer than the test waits for the stream's first bytes and then for the canaries, so
# the stream cannot end first (the test lets it go once the canaries have failed).
LONG = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 4000, "ignore_eos": True, "temperature": 0,
        "stream": True}
STEP_DELAY_S = 0.05
FIRST_BYTES_WITHIN_S, CANARIES_WITHIN_S = 60, 90
assert LONG["max_tokens"] * STEP_DELAY_S > FIRST_BYTES_WITHIN_S + CANARIES_WITHIN_S
BUSY = "while the engine is busy with other requests"   # herd's log, on a canary failing behind them


@dataclass
class Relayed:
    """One streaming completion through the front, in a thread, until it ends or the test lets it go."""
    outcome: str = "running"   # done | error:<code> | cut | let go | exception:<type>
    events: int = 0
    _enough: threading.Event = field(default_factory=threading.Event)

    def start(self, url: str) -> Relayed:
        threading.Thread(target=self._run, args=(url,), daemon=True).start()
        return self

    def let_go(self) -> None:
        self._enough.set()

    def _run(self, url: str) -> None:
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=LONG, timeout=60) as r:
                self.outcome = self._read(r.iter_lines())
        except httpx.HTTPError as err:
            self.outcome = f"exception:{type(err).__name__}"

    def _read(self, lines) -> str:
        for line in lines:
            if self._enough.is_set():
                return "let go"
            if line == "data: [DONE]":
                return "done"
            if line.startswith("data: "):
                if "error" in (event := json.loads(line[len("data: "):])):
                    return f"error:{event['error']['code']}"
                self.events += 1
        return "cut"


def test_the_reason_names_the_engines_own_error():
    """The line an engine's exit is summed up by: a traceback's exception, through vLLM's line prefixes,
    past a warning printed after it, and not the API server's "see root cause above"."""
    vllm = ["(EngineCore_DP0 pid=7) ERROR 05-01 10:00:00 [core.py:700] EngineCore failed to start.",
            "(EngineCore_DP0 pid=7) ERROR 05-01 10:00:00 [core.py:700] Traceback (most recent call last):",
            '(EngineCore_DP0 pid=7) ERROR 05-01 10:00:00 [core.py:700]   File "gpu_worker.py", line 3, in load',
            "(EngineCore_DP0 pid=7) ERROR 05-01 10:00:00 [core.py:700]     raise ValueError(msg)",
            "(EngineCore_DP0 pid=7) ERROR 05-01 10:00:00 [core.py:700] ValueError: 512 GiB do not fit in 80 GiB",
            "Traceback (most recent call last):", '  File "api_server.py", line 9, in run',
            "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}",
            "resource_tracker.py:254: UserWarning: There appear to be 1 leaked shared_memory objects"]
    assert summary_line(vllm) == "ValueError: 512 GiB do not fit in 80 GiB"
    chained = ["Traceback (most recent call last):", '  File "a.py", line 1', "KeyError: 'x'", "",
               "The above exception was the direct cause of the following exception:", "",
               "Traceback (most recent call last):", '  File "a.py", line 3', "    load()", "    ^^^^^^",
               "OSError: no such file: config.json"]
    assert summary_line(chained) == "OSError: no such file: config.json"
    assert summary_line(["Loading weights", "error: CUDA driver too old", "  "]) == "error: CUDA driver too old"
    assert summary_line(["Traceback (most recent call last):", '  File "a.py", line 1']) == 'File "a.py", line 1'
    assert summary_line([]) is None


@pytest.mark.slow
@pytest.mark.timeout(120)   # a front and a few short-lived engines: ~10 s, more under load
def test_an_engine_failing_at_start_says_its_error_and_a_spent_budget_exits_75(serve):
    """A start that fails is one line naming the engine's own error, in readiness and herd's log; when
    the budget is spent, herd serve exits 75 with that reason as its last line."""
    error = "ValueError: no such model: tiny-typo"
    crash = ("import sys\nprint('engine: loading the model', flush=True)\nprint('engine: warming up', file=sys.stderr)\n"
             "def load(name):\n    raise ValueError(f'no such model: {name}')\nload('tiny-typo')\n")
    front = serve("--engine-cmd", failing_engine(crash), "--engine-url", f"http://127.0.0.1:{free_port()}",
                  "--served-model-name", "tiny", "--max-restarts", "2", "--restart-window", "300", name="front")

    def refused_with_the_error():
        r = health(front)
        return r is not None and r.status_code == 503 and error in r.json()["reason"] and r.json()
    seen = wait_for("/health/ready naming the engine's error", refused_with_the_error, within=60, every=0.05)
    assert f"engine exited with code 1: {error}" in seen["reason"], seen

    code = front.proc.wait(timeout=90)
    log = serve_log(front)
    assert code == EXIT_RESTARTS_SPENT, log[-3000:]
    last = log.strip().splitlines()[-1]
    assert last == (f"herd serve: exiting {EXIT_RESTARTS_SPENT}: restart budget spent: the engine failed 3 time(s) "
                    f"within 300s (--max-restarts 2 per --restart-window 300); last: engine exited with code 1: "
                    f"{error}"), last
    # herd's log says it on the restart's line, and still carries the engine's own output, both streams.
    assert re.search(rf"restarting the engine in .*: engine exited with code 1: {re.escape(error)}$", log, re.M), log[-3000:]
    assert "engine: loading the model" in log and "engine: warming up" in log and "raise ValueError" in log


@pytest.mark.slow
@pytest.mark.timeout(120)   # engines that live 3 s, restarted a few times: ~25 s, more under load
def test_restarts_spread_over_more_than_the_window_do_not_spend_the_budget(serve):
    """--max-restarts 1 per --restart-window 2: an engine that dies 3 s into each start is restarted
    again and again (a lifetime cap of 1 would have given up at its second death)."""
    flaky = "import time\ntime.sleep(3)\nraise RuntimeError('lost the device')\n"
    front = serve("--engine-cmd", failing_engine(flaky), "--engine-url", f"http://127.0.0.1:{free_port()}",
                  "--served-model-name", "tiny", "--max-restarts", "1", "--restart-window", "2", name="front")

    def restarted_thrice():
        assert front.proc.poll() is None, f"herd serve exited {front.proc.returncode}: {serve_log(front)[-3000:]}"
        r = health(front)
        if r is None:
            return None
        body = r.json()
        assert body["restarts_in_window"] <= 1 and body["max_restarts"] == 1, body
        return body["restarts"] >= 3 and body
    body = wait_for("three restarts", restarted_thrice, within=90, every=0.2)
    assert body["restart_window_s"] == 2 and "RuntimeError: lost the device" in serve_log(front)
    assert "restart budget spent" not in serve_log(front)


@pytest.mark.slow
@pytest.mark.timeout(400)   # the tiny engine loads twice: 60-150 s under load
def test_a_busy_engine_is_left_alone_and_a_stopped_one_is_killed_and_started_again(tiny_model, serve, tmp_path):
    """The canary runs while requests are in flight too. Behind a long stream (the engine runs one
    request at a time) it fails, but the stream gets bytes: busy, not broken, so nothing restarts.
    Then SIGSTOP the engine under a stream (it still accepts connections, answers nothing; SIGCONT
    never comes): not ready within the canary's deadline, its group killed, the stream failed with
    engine_lost, a new engine ready."""
    engine_port = free_port()
    engine_state = tmp_path / "engine"
    engine_state.mkdir()
    interval, timeout, retries = 1, 2, 1
    front = serve("--engine-cmd", stand_in_engine(tiny_model, engine_state, engine_port,
                                                  "--concurrency", "1", "--max-model-len", "4096"),
                  "--engine-url", f"http://127.0.0.1:{engine_port}", "--served-model-name", "tiny",
                  "--canary-interval", str(interval), "--canary-timeout", str(timeout),
                  "--canary-retries", str(retries), env={"HERD_TEST_STEP_DELAY_S": str(STEP_DELAY_S)},
                  name="front")   # the engine inherits the front's environment: its steps are slowed
    front.wait_ready(timeout=180)

    busy = Relayed().start(front.url)
    wait_for("the stream's first bytes", lambda: busy.events or busy.outcome != "running",
             within=FIRST_BYTES_WITHIN_S)
    # As many canaries failed behind the stream as would restart an engine that got no bytes out.
    wait_for("canaries failing while the stream gets bytes",
             lambda: serve_log(front).count(BUSY) >= retries + 1 or busy.outcome != "running",
             within=CANARIES_WITHIN_S)
    assert busy.outcome == "running", f"the stream ended first ({busy.outcome}): too fast to test the canary"
    assert httpx.get(f"{front.url}/health/ready").json()["restarts"] == 0
    busy.let_go()

    hung = Relayed().start(front.url)
    wait_for("the second stream's first bytes", lambda: hung.events or hung.outcome != "running", within=60)
    assert hung.outcome == "running", hung.outcome
    stopped = engine_pid(engine_state)
    os.kill(stopped, signal.SIGSTOP)

    # Not ready once a canary timed out with no bytes to anyone: due within the interval, failed after
    # its timeout (slack: a loaded host).
    def refused():
        r = health(front)
        return r is not None and r.status_code == 503 and r.json()
    seen = wait_for("readiness 503 after SIGSTOP", refused, within=interval + timeout + 30)
    assert "canary" in seen["reason"], seen

    # Killed after retries + 1 canaries and a short grace (a stopped process ignores SIGTERM); the
    # stream in flight fails, and the engine starts again.
    def restarted():
        try:
            return engine_pid(engine_state) != stopped
        except ValueError:   # the new engine is writing its pid file
            return False
    wait_for("a new engine", restarted, within=(retries + 1) * (interval + timeout) + 5 + 60, every=0.2)
    wait_for("the stream failed", lambda: hung.outcome != "running", within=30)
    assert hung.outcome == "error:engine_lost", hung.outcome
    wait_for("the stopped engine gone", lambda: not alive(stopped), within=30)
    front.wait_ready(timeout=180)
    body = httpx.get(f"{front.url}/health/ready").json()
    assert body["restarts"] == 1 and body["canary_failures"] == 0, body
    assert f"canary failed {retries + 1} times in a row" in serve_log(front)
    r = httpx.post(f"{front.url}/v1/completions", json={"model": "tiny", "prompt": [5, 6], "max_tokens": 2},
                   timeout=60)
    assert r.status_code == 200, r.text


@pytest.mark.slow
@pytest.mark.timeout(400)   # a fake engine restarted under herd: 100-150 s under load
def test_front_is_ready_only_after_the_canary_and_survives_an_engine_death(tiny_model, serve, tmp_path):
    engine_port = free_port()
    engine_state = tmp_path / "engine"
    engine_state.mkdir()
    front = serve("--engine-cmd", stand_in_engine(tiny_model, engine_state, engine_port),
                  "--engine-url", f"http://127.0.0.1:{engine_port}",
                  "--served-model-name", "tiny", "--canary-interval", "1", name="front")
    # While the engine does not listen: live, not ready, API refused with the reason.
    seen_not_ready = False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{front.url}/health/ready", timeout=2)
        except httpx.TransportError:
            time.sleep(0.1)
            continue
        if r.status_code == 200:
            break
        seen_not_ready = True
        assert "engine" in r.json()["reason"] or "canary" in r.json()["reason"]
        api = httpx.post(f"{front.url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 1})
        if api.status_code != 200:
            assert api.status_code == 503 and api.json()["error"]["code"] == "not_ready"
        time.sleep(0.1)
    assert seen_not_ready and r.status_code == 200
    assert r.json()["last_canary_seconds"] is not None

    # The OpenAI API passes through, streaming included.
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    via_front = httpx.post(f"{front.url}/v1/completions", json=body, timeout=60).json()
    direct = httpx.post(f"http://127.0.0.1:{engine_port}/v1/completions", json=body, timeout=60).json()
    assert via_front["choices"][0]["token_ids"] == direct["choices"][0]["token_ids"]
    with httpx.stream("POST", f"{front.url}/v1/completions", json={**body, "stream": True}, timeout=60) as s:
        events = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) > 2

    # The engine dies: not ready within 5 s, then restarted and ready again.
    os.kill(engine_pid(engine_state), signal.SIGKILL)
    killed = time.monotonic()
    while httpx.get(f"{front.url}/health/ready").status_code == 200:
        assert time.monotonic() - killed < 5, "front still ready 5 s after the engine died"
        time.sleep(0.05)
    refused = httpx.post(f"{front.url}/v1/completions", json=body)
    assert refused.status_code == 503
    front.wait_ready(timeout=120)
    assert httpx.get(f"{front.url}/health/ready").json()["restarts"] >= 1
    assert httpx.post(f"{front.url}/v1/completions", json=body, timeout=60).status_code == 200
