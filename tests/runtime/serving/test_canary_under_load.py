"""No restart while requests make progress (herd #24): a worker group slowed on purpose and loaded
past its concurrency stays ready and is never restarted, while its canary keeps running; the same
group with its driver stopped (no token for anyone) is restarted by the canary.

One `herd serve` for the module (tiny model, 2 ranks over gloo), every decode step slowed by
HERD_TEST_STEP_DELAY_S so that requests run for seconds and queue behind each other. The busy test
leaves it healthy; the stall test restarts it, so it runs last.
"""
from __future__ import annotations

import concurrent.futures as futures
import os
import signal
import time

import httpx
import pytest

from tests.runtime.conftest import alive
from tests.runtime.serving.test_supervision import (Stream, log_size, ready_status, restart_lines, restarts,
                                                    wait_status)

slow = pytest.mark.slow

# 8 streams on 2 batch slots: 6 wait at first, and the queue is full (a canary in flight must not
# push a stream out with a 429).
CONCURRENCY, STREAMS = 2, 8
STEP_DELAY_S = 0.05                      # per decode step, on top of the model's own time
CANARY_TIMEOUT_S, CANARY_RETRIES, CANARY_INTERVAL_S = 2, 2, 0.5
# 80 tokens: >= 4 s per request, so a canary that arrives while both slots are taken times out
# waiting for one (retried, never counted), and the first three waves end while others still wait.
BUSY = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 80, "ignore_eos": True, "temperature": 0}
LONG = {**BUSY, "max_tokens": 4000}      # runs until the test breaks the group under it
EXCUSED = "while requests are making progress: not counted"


@pytest.fixture(scope="module")
def slowed(tiny_model, serve_module):
    srv = serve_module("--model-dir", str(tiny_model), "--tp", "2", "--served-model-name", "tiny",
                       "--max-model-len", "4096", "--concurrency", str(CONCURRENCY), "--max-queue", str(STREAMS),
                       "--canary-interval", str(CANARY_INTERVAL_S), "--canary-timeout", str(CANARY_TIMEOUT_S),
                       "--canary-retries", str(CANARY_RETRIES), "--max-restarts", "3",
                       "--restart-window", "300", env={"HERD_TEST_STEP_DELAY_S": str(STEP_DELAY_S)},
                       name="slowed")
    srv.wait_ready(timeout=180)
    return srv


def watch_health(url: str, streams: list[Stream]) -> tuple[set[int], list[float | None]]:
    """Poll /health/ready until every stream has ended: (statuses seen, and the last canary times
    seen after the first stream started and before the last one ended, in order)."""
    statuses: set[int] = set()
    canary_times: list[float | None] = []
    deadline = time.monotonic() + 300
    while any(s.ended_at is None for s in streams):
        assert time.monotonic() < deadline, [s.outcome for s in streams]
        status, health = ready_status(url)
        statuses.add(status)
        if any(s.started.is_set() for s in streams) and any(s.ended_at is None for s in streams):
            canary_times.append(health["last_canary_seconds"])
        time.sleep(0.1)
    return statuses, canary_times


@slow
@pytest.mark.timeout(480)   # a model load, then ~20 s of slowed load (minutes on a loaded host)
def test_a_busy_group_that_makes_progress_is_never_restarted(slowed):
    """8 slowed streams on 2 slots: canaries time out waiting for a slot while the streams get
    tokens, and none of that counts. Zero restarts, readiness 200 throughout, every stream runs to
    its length, and the canary kept running (some answered, jumping the queue, before the load
    ended; the others' timeouts were logged as not counted)."""
    srv, before, since = slowed, restarts(slowed.url), log_size(slowed)
    streams = [Stream(timeout=120) for _ in range(STREAMS)]
    with futures.ThreadPoolExecutor(STREAMS) as pool:
        for stream in streams:
            pool.submit(stream.run, srv.url, BUSY)
        statuses, canary_times = watch_health(srv.url, streams)
    log = (srv.state_dir / "serve.log").read_bytes()[since:].decode(errors="replace")
    excused = log.count(EXCUSED)
    answered = len({t for t in canary_times}) - 1   # new canary times while the load ran

    assert [(s.outcome, s.finish_reason) for s in streams] == [("done", "length")] * STREAMS
    assert restarts(srv.url) == before and not restart_lines(srv, since), log[-3000:]
    assert statuses == {200}, f"readiness dropped under load: {statuses}; {log[-3000:]}"
    assert answered >= 1, f"no canary answered under load ({excused} timed out): {log[-3000:]}"
    print(f"\nbusy: {STREAMS} streams done, 0 restarts, ready throughout; canaries under load: "
          f"{answered} answered (last {canary_times[-1]}s), {excused} timed out while others were served")


@slow
@pytest.mark.timeout(480)   # a model load and a restart (minutes on a loaded host)
def test_a_stalled_group_under_load_is_restarted(slowed):
    """The same load, then SIGSTOP the driver (rank 0): no token for anyone, and no rank reports it
    (the driver's heartbeat watch is stopped too). The canary's failures now count: readiness drops,
    the group restarts once, every request in flight or queued fails, and it is ready again."""
    srv, before, since, driver = slowed, restarts(slowed.url), log_size(slowed), slowed.rank_pid(0)
    streams = [Stream(timeout=120) for _ in range(STREAMS)]
    with futures.ThreadPoolExecutor(STREAMS) as pool:
        for stream in streams:
            pool.submit(stream.run, srv.url, LONG)
        deadline = time.monotonic() + 120
        while sum(s.started.is_set() for s in streams) < CONCURRENCY:   # the slots are busy
            assert time.monotonic() < deadline, [s.outcome for s in streams]
            time.sleep(0.05)
        assert all(s.outcome == "running" for s in streams), [s.outcome for s in streams]
        running = [s.started.is_set() for s in streams]
        os.kill(driver, signal.SIGSTOP)
        try:
            # At most one canary in flight was excused (tokens came before the stop), then
            # CANARY_RETRIES + 1 count; generous on a loaded host.
            within = (CANARY_RETRIES + 3) * CANARY_TIMEOUT_S + 60
            _, reasons = wait_status(srv.url, 503, within=within, what="a driver stopped under load")
            srv.wait_ready(timeout=180)
        finally:
            if alive(driver):   # never leave a stopped process behind, whatever failed
                os.kill(driver, signal.SIGKILL)
    assert restarts(srv.url) == before + 1 and not alive(driver)
    [line] = restart_lines(srv, since)
    assert f"canary failed {CANARY_RETRIES + 1} times in a row" in line, line
    # Streams that had tokens get the error event; those still queued, a 503 before their first byte.
    outcomes = [s.outcome for s in streams]
    assert outcomes == ["error:engine_lost" if r else "http 503" for r in running], (running, outcomes)
    ok = httpx.post(f"{srv.url}/v1/completions", json={**BUSY, "max_tokens": 4}, timeout=60)
    assert ok.status_code == 200, ok.text
    print(f"\nstalled: readiness went {reasons}, then one restart: {line}")
