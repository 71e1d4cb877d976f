"""The canary's rules without processes: the driver admits it before the requests waiting, and the
supervisor counts only canaries that fail while nobody else is served. The same rules with real
ranks under load are in test_canary_under_load.py."""
from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from pathlib import Path

from runtime.engine.control import DriverChannel, Requests, encode
from runtime.engine.request import GenerationRequest, Row
from runtime.serving.launch import LaunchConfig
from runtime.serving.supervisor import QueueFull, Supervisor, is_canary

TIMEOUT_S, RETRIES = 0.2, 1   # a canary attempt's window; 2 counted failures in a row restart


# ------------------------------------------------------------------ the driver's admission order
def row(request_id: str) -> Row:
    return Row(input_ids=[1], max_tokens=2, id=request_id)


def test_priority_rows_come_out_first_and_the_rest_in_arrival_order():
    requests = Requests()
    for name in ("a", "b"):
        requests.put(row(name))
    requests.put(row("canary"), priority=True)
    requests.put(None)                        # shut down: after what came before it
    requests.put(row("canary-2"), priority=True)
    taken = [requests.get_nowait() for _ in range(len(requests))]
    assert [r.id if r else None for r in taken] == ["canary", "canary-2", "a", "b", None]


def test_the_driver_takes_a_canary_before_the_requests_waiting_within_the_batch_limit():
    """Over a real control socket: three requests wait, then a canary arrives; the next admission
    (room for 2) takes the canary and the oldest request, the one after it the rest."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        channel = DriverChannel(f"127.0.0.1:{server.getsockname()[1]}", token="t")
        conn, _ = server.accept()
        with conn, contextlib.closing(channel.sock):
            assert json.loads(conn.makefile("rb").readline())["type"] == "hello"
            generate = {"type": "generate", "input_ids": [1], "max_tokens": 2}
            for name in ("r0", "r1", "r2"):
                conn.sendall(encode({**generate, "id": name, "priority": False}))
            conn.sendall(encode({**generate, "id": "canary", "priority": True}))
            deadline = time.monotonic() + 30
            while len(channel.requests) < 4:   # the reader thread has queued all four
                assert time.monotonic() < deadline, f"{len(channel.requests)} of 4 requests queued"
                time.sleep(0.01)
            assert [r.id for r in channel.take(2, block=True, window_s=0)] == ["canary", "r0"]
            assert [r.id for r in channel.take(8, block=False, window_s=0)] == ["r1", "r2"]


# ------------------------------------------------------------------ the supervisor's count
class FakeDriver:
    """The control channel's far end: records what the supervisor sends; `serve` streams a token to
    every real request in flight every 10 ms while `serving` is set (the canary never gets one)."""

    def __init__(self, sup: Supervisor):
        self.sup, self.serving = sup, False
        self.sent: list[dict] = []

    def write(self, data: bytes) -> None:
        self.sent.extend(json.loads(line) for line in data.splitlines())

    def canaries(self) -> list[dict]:
        return [m for m in self.sent if m["type"] == "generate" and m["priority"]]

    async def serve(self) -> None:
        while True:
            await asyncio.sleep(0.01)
            if self.serving:
                for request_id in [r for r in self.sup._pending if not is_canary(r)]:
                    self.sup._on_message({"type": "token", "id": request_id, "token": 7})


def ready_supervisor() -> tuple[Supervisor, FakeDriver, list[str]]:
    """A supervisor whose group is ready, talking to a FakeDriver; the list collects restarts."""
    sup = Supervisor(LaunchConfig(model_dir=Path("unused"), canary_timeout_s=TIMEOUT_S,
                                  canary_retries=RETRIES))
    driver = FakeDriver(sup)
    sup._driver = driver   # type: ignore[assignment]  # the supervisor only writes to it
    sup._set_phase("ready", "ready")
    restarts: list[str] = []

    async def restart(reason: str) -> None:
        restarts.append(reason)
    sup._restart = restart  # type: ignore[method-assign]
    return sup, driver, restarts


async def consume(sup: Supervisor) -> None:
    """One real request that runs for as long as the test needs it."""
    async for _ in sup.generate(GenerationRequest(input_ids=[5], max_tokens=10**6)):
        pass


async def probe_while(sup: Supervisor, driver: FakeDriver, *, busy: bool, answer_after: int | None,
                      serving=lambda canaries: True) -> list[str]:
    """Run one probe (the canary, retried) with a real request in flight when `busy`; `serving(n)`
    says whether real requests get tokens while canary n (from 1) waits. Canary `answer_after` + 1
    gets its answer. Returns the phases seen meanwhile."""
    phases: list[str] = []
    tasks = [asyncio.create_task(driver.serve())] + ([asyncio.create_task(consume(sup))] if busy else [])

    async def answer_when_due() -> None:
        while True:
            await asyncio.sleep(0.005)
            canaries = driver.canaries()
            driver.serving = busy and serving(len(canaries))
            phases.append(sup.health.phase)
            if answer_after is not None and len(canaries) > answer_after:
                last = canaries[-1]["id"]
                sup._on_message({"type": "token", "id": last, "token": 3})
                sup._on_message({"type": "done", "id": last, "finish_reason": "length"})
    tasks.append(asyncio.create_task(answer_when_due()))
    try:
        await asyncio.wait_for(sup._probe_canary(TIMEOUT_S), timeout=60)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return phases


def test_timeouts_while_requests_get_tokens_never_count():
    """Five canaries in a row time out (more than the retries allow) while a real request gets
    tokens: no restart, readiness stays, nothing counted; the sixth answers and ends the probe."""
    sup, driver, restarts = ready_supervisor()
    phases = asyncio.run(probe_while(sup, driver, busy=True, answer_after=5))
    assert restarts == [] and set(phases) == {"ready"}, (restarts, set(phases))
    assert sup.health.canary_failures == 0 and sup.health.last_canary_s is not None
    assert len(driver.canaries()) == 6
    real = [m for m in driver.sent if m["type"] == "generate" and not m["priority"]]
    assert len(real) == 1   # the real request went without priority


def test_timeouts_with_no_token_for_anyone_restart():
    """Idle (nothing else to serve), the canary unanswered: after canary_retries + 1 in a row the group
    restarts; readiness follows that decision, as a probe's failure threshold does (one slow canary
    must not take the group out of every balancer), so it stays until the restart takes it down."""
    sup, driver, restarts = ready_supervisor()
    phases = asyncio.run(probe_while(sup, driver, busy=False, answer_after=None))
    assert restarts == [f"canary failed {RETRIES + 1} times in a row "
                        f"(last: canary timed out after {TIMEOUT_S:g}s ({RETRIES + 1}/{RETRIES + 1}))"]
    assert set(phases) == {"ready"} and sup.health.canary_failures == RETRIES + 1


def test_a_stall_under_load_counts():
    """A real request waits but gets no token: busy with nothing to show for it, so it counts."""
    sup, driver, restarts = ready_supervisor()
    asyncio.run(probe_while(sup, driver, busy=True, answer_after=None, serving=lambda n: False))
    assert len(restarts) == 1 and "canary failed 2 times in a row" in restarts[0], restarts


def test_the_canarys_own_tokens_even_late_ones_are_not_progress():
    """Every canary keeps getting tokens but never its end, also after it timed out (the cancel
    still on its way): nobody else was served, so every timeout counts."""
    sup, driver, restarts = ready_supervisor()

    async def canaries_get_tokens() -> None:
        while True:
            await asyncio.sleep(0.005)
            for canary in driver.canaries():
                sup._on_message({"type": "token", "id": canary["id"], "token": 3})

    async def probe() -> None:
        task = asyncio.create_task(canaries_get_tokens())
        try:
            await sup._probe_canary(TIMEOUT_S)
        finally:
            task.cancel()
    asyncio.run(asyncio.wait_for(probe(), timeout=60))
    assert len(restarts) == 1 and len(driver.canaries()) == RETRIES + 1, restarts


def test_only_failures_in_a_row_with_no_progress_count():
    """Canary 1 fails with nobody served (1 counted), canary 2 while a request gets tokens (the
    count starts over), canary 3 with nobody served again (1 counted, not 2): no restart; canary 4
    answers and the group is ready again."""
    sup, driver, restarts = ready_supervisor()
    phases = asyncio.run(probe_while(sup, driver, busy=True, answer_after=3, serving=lambda n: n == 2))
    assert restarts == [], restarts
    assert set(phases) == {"ready"} and sup.health.canary_failures == 0


def test_a_canary_in_flight_takes_no_clients_place_in_the_queue():
    """--max-queue 2 with a canary waiting: two real requests still get in, a third gets QueueFull."""
    sup, _, _ = ready_supervisor()
    sup.max_queue = 2

    async def fill() -> str:
        canary = sup._submit(GenerationRequest(input_ids=[1], max_tokens=2), canary=True)
        real = [sup.generate(GenerationRequest(input_ids=[5], max_tokens=2)) for _ in range(3)]
        entered = [asyncio.ensure_future(anext(stream)) for stream in [canary, *real[:2]]]
        await asyncio.sleep(0)    # each one submitted (none answered: they wait)
        assert len(sup._pending) == 3
        try:
            await anext(real[2])
        except QueueFull as err:
            return str(err)
        finally:
            for task in entered:
                task.cancel()
        return "admitted"
    assert asyncio.run(asyncio.wait_for(fill(), timeout=30)) == "2 requests waiting (limit 2)"
