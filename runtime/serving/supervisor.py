"""The supervisor: owns the worker group of one node, and on the head node the engine's front.

It starts torchrun, watches every local rank, restarts the whole group when a rank dies, stops
answering (heartbeat), stalls under load or keeps failing the canary, and keeps an honest readiness
state: ready only when every rank has loaded and a canary generation came back in time. Requests reach
the driver rank over the control channel; when the group is lost, requests in flight fail at once.

The canary runs every canary_interval_s, idle or busy. The driver admits it ahead of the requests
waiting (in the next free batch slot), so it measures the engine rather than the queue. Under load it
may still time out waiting for a slot; a timeout while real requests got tokens shows a busy group,
not a broken one, and counts for nothing. Only canaries that fail while nobody else is served count.

Restarts are budgeted per time window (RestartBudget): at most `max_restarts` within
`restart_window_s`, with a backoff that doubles inside the window and starts over with it. When the
budget is spent the supervisor gives up (phase `failed`, `gave_up` set) and `herd serve` exits with
EXIT_RESTARTS_SPENT, so the service manager (systemd, or the local target's keeper) starts it afresh.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import secrets
import signal
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from runtime.engine.control import encode
from runtime.engine.request import GenerationRequest
from runtime.serving.launch import LaunchConfig, torchrun_command, worker_env
from runtime.serving.processes import exit_of, pid_alive, stop_group

log = logging.getLogger("herd.supervisor")

# `herd serve` exits with this when the worker group failed more often than the restart budget allows
# within the window. 75 is EX_TEMPFAIL (sysexits.h): a temporary failure, worth starting again; the
# systemd unit's Restart=on-failure and the local target's keeper both do.
EXIT_RESTARTS_SPENT = 75

TIMED_OUT = "timed out"   # how a canary's outcome starts when no answer came in time
CANARY_ID = "canary-"     # how a canary's request id starts: even its late tokens are not progress


def is_canary(request_id: str) -> bool:
    return request_id.startswith(CANARY_ID)


class EngineUnavailable(Exception):
    """The engine cannot take or finish this request (not ready, or the worker group was lost)."""


class QueueFull(Exception):
    pass


class RequestFailed(Exception):
    """The engine could not run this one request (its own fault); the group is fine."""


@dataclass
class Event:
    kind: str                    # "token" | "done"
    token: int | None = None
    finish_reason: str | None = None
    logprob: float | None = None
    top: list | None = None      # [[token id, logprob], ...]


@dataclass
class Health:
    phase: str = "starting"      # starting | loading | ready | not_ready | restarting | failed | stopping
    reason: str = "starting the worker group"
    loaded: int = 0
    world: int = 0
    restarts: int = 0            # since this process started
    last_canary_s: float | None = None
    loads: list = field(default_factory=list)   # per rank: seconds, shard bytes, bytes read from disk
    restarts_in_window: int = 0  # restarts counted against the budget now (the last restart_window_s)
    max_restarts: int = 0        # the budget: restarts allowed within restart_window_s
    restart_window_s: float = 0.0
    canary_failures: int = 0     # canaries failed in a row with no token for anyone else either;
                                 # reset by one that answers, or one that timed out while others were served
    control_rejected: int = 0    # control-channel connections refused (wrong, missing or garbled token)

    @property
    def ready(self) -> bool:
        return self.phase == "ready"


def die_with_parent() -> None:
    """In a child: get SIGTERM when the parent dies, so nothing outlives its supervisor."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def rank_pids(state_dir: Path) -> dict[int, int]:
    """rank -> pid, from the pid files the ranks write at start."""
    pids = {}
    for pid_file in (state_dir / "ranks").glob("*.pid"):
        with contextlib.suppress(ValueError, OSError):
            pids[int(pid_file.stem)] = int(pid_file.read_text())
    return pids


def kill_ranks(state_dir: Path) -> list[int]:
    """SIGKILL every rank still alive (torchrun puts each in its own session, out of our group)."""
    killed = []
    for pid in rank_pids(state_dir).values():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return killed


@dataclass
class RestartBudget:
    """At most `limit` restarts within any `window_s`. Restarts older than the window no longer count,
    so a group that fails now and then is restarted forever, while one that keeps failing is given up
    on. The backoff doubles with each restart still in the window, and so starts over with it."""
    limit: int
    window_s: float
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0
    _times: deque = field(default_factory=deque)

    def recent(self, now: float) -> int:
        while self._times and now - self._times[0] >= self.window_s:
            self._times.popleft()
        return len(self._times)

    def allows(self, now: float) -> bool:
        return self.recent(now) < self.limit

    def take(self, now: float) -> float:
        """Count a restart at `now`; returns how long to wait before it."""
        backoff = min(self.backoff_s * 2 ** self.recent(now), self.backoff_max_s)
        self._times.append(now)
        return backoff

    def usage(self, now: float) -> str:
        """How much of the budget the window holds, as the logs and /health say it."""
        return f"{self.recent(now)}/{self.limit} within {self.window_s:g}s"

    def spent_reason(self, what: str, why: str) -> str:
        """The one line herd serve exits with when `what` (the worker group, the engine) kept failing."""
        failures = self.recent(time.monotonic()) + 1  # the restarts still counted, and this failure
        return " ".join(f"restart budget spent: {what} failed {failures} time(s) within {self.window_s:g}s "
                        f"(--max-restarts {self.limit} per --restart-window {self.window_s:g}); last: {why}".split())


class Supervisor:
    def __init__(self, cfg: LaunchConfig, pad_id: int = 0, canary_ids: list[int] | None = None,
                 max_queue: int | None = None):
        self.cfg = cfg
        self.pad_id = pad_id
        self.canary_ids = canary_ids or [1]
        self.max_queue = max_queue or 4 * cfg.max_batch
        self.budget = RestartBudget(cfg.max_restarts, cfg.restart_window_s, cfg.restart_backoff_s,
                                    cfg.restart_backoff_max_s)
        self.health = Health(world=cfg.world_size, max_restarts=cfg.max_restarts,
                             restart_window_s=cfg.restart_window_s)
        self.gave_up = asyncio.Event()   # the restart budget is spent: `herd serve` should exit
        self.exit_reason = ""            # one line: why it gave up
        self._pending: dict[str, asyncio.Queue] = {}
        self._driver: asyncio.StreamWriter | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._token = ""
        self._control_addr: str | None = None
        self._stopping = False
        self._doomed = False             # this group is being torn down: no canary may call it ready
        self._phase_since = time.monotonic()
        self._probe: asyncio.Task | None = None
        self._last_progress = time.monotonic()   # the stall clock: the last token for anyone
        self._served_at = float("-inf")          # the last token (or end) of a real request, not a canary
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()
        self._group_generation = 0
        self.on_restart: Callable[[], None] | None = None  # hook for metrics
        self.batches = 0        # batches the driver ran, and the rows in them
        self.batched_rows = 0

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self.cfg.is_head:
            server = await asyncio.start_server(self._on_driver, "127.0.0.1", 0)
            self._control_addr = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
            self._server = server
        self._tasks = [asyncio.create_task(self._run_group()), asyncio.create_task(self._watch())]

    async def stop(self) -> None:
        self._stopping = True
        self._set_phase("stopping", "shutting down")
        self._fail_pending("server is shutting down")
        await self._kill_group()
        for task in [*self._tasks, self._probe]:
            if task is not None:
                task.cancel()
        if self.cfg.is_head:
            self._server.close()

    def _spawn(self, coro) -> None:
        # The loop keeps only weak references to tasks: hold this one until it is done.
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _set_phase(self, phase: str, reason: str) -> None:
        if phase != self.health.phase:
            self._phase_since = time.monotonic()
        self.health.phase, self.health.reason = phase, reason

    async def _launch(self) -> asyncio.subprocess.Process:
        ranks = self.cfg.state_dir / "ranks"
        ranks.mkdir(parents=True, exist_ok=True)
        for stale in ranks.glob("*.pid"):
            stale.unlink()
        self._token = secrets.token_hex(16)
        self._group_generation += 1
        self._doomed = False
        self.health.loaded = 0
        self.health.canary_failures = 0
        self._set_phase("loading", f"starting {self.cfg.world_size} ranks")
        cmd = torchrun_command(self.cfg)
        log.info("launching: %s", " ".join(cmd))
        self._proc = await asyncio.create_subprocess_exec(
            *cmd, env=worker_env(self.cfg, self._control_addr, self._token, self.pad_id),
            start_new_session=True, preexec_fn=die_with_parent)
        return self._proc

    async def _kill_group(self) -> None:
        await stop_group(self._proc, grace_s=10)
        # torchrun terminates its workers on SIGTERM; any it left (it was killed) go now.
        if leftovers := kill_ranks(self.cfg.state_dir):
            log.warning("killed %d rank(s) torchrun left behind", len(leftovers))

    async def _restart(self, reason: str) -> None:
        """Tear this group down now; _run_group then counts the restart against the budget. The ranks
        get SIGKILL first: a stopped or hung rank ignores SIGTERM, and torchrun would wait for it."""
        if self._doomed or self.health.phase in ("stopping", "failed", "restarting"):
            return
        self._doomed = True
        self._lost(reason)
        kill_ranks(self.cfg.state_dir)
        await stop_group(self._proc, grace_s=5)

    async def _run_group(self) -> None:
        while not self._stopping:
            proc = await self._launch()
            code = await exit_of(proc)
            if self._stopping:
                return
            self._doomed = True
            await self._kill_group()
            why = self.health.reason if self.health.phase == "not_ready" else f"worker group exited ({code})"
            self._lost(f"{why}; worker group exited with code {code}")
            now = time.monotonic()
            if not self.budget.allows(now):
                self._give_up(why)
                return
            await asyncio.sleep(self._count_restart(why, now))

    def _count_restart(self, why: str, now: float) -> float:
        """Take a restart from the budget; returns the backoff to wait before launching again."""
        backoff = self.budget.take(now)
        self.health.restarts += 1
        self.health.restarts_in_window = self.budget.recent(now)
        of = self.budget.usage(now)
        log.warning("restarting worker group in %.1fs (restart %d, %s): %s", backoff,
                    self.health.restarts, of, why)
        self._set_phase("restarting", f"{why}; restarting ({of})")
        if self.on_restart:
            self.on_restart()
        return backoff

    def _give_up(self, why: str) -> None:
        """The budget is spent: fail everything waiting, say why in one line, and let serve exit."""
        self.exit_reason = self.budget.spent_reason("the worker group", why)
        self._set_phase("failed", self.exit_reason)
        self._fail_pending(self.exit_reason)
        log.error("giving up: %s", self.exit_reason)
        self.gave_up.set()

    def _lost(self, reason: str) -> None:
        if self.health.phase in ("stopping", "failed"):
            return
        if self.health.phase != "not_ready":
            log.warning("not ready: %s", reason)
        self._set_phase("not_ready", reason)
        self._fail_pending(reason)

    def _fail_pending(self, reason: str) -> None:
        for queue in self._pending.values():
            queue.put_nowait(EngineUnavailable(reason))
        self._pending.clear()

    # ------------------------------------------------------------------ watching
    async def _watch(self) -> None:
        """Every 0.25 s: rank liveness (pid files), readiness stuck off, stalls under load, and the
        canary when due. Each check that finds the group broken restarts it."""
        next_canary = time.monotonic() + self.cfg.canary_interval_s
        while not self._stopping:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            self.health.restarts_in_window = self.budget.recent(now)
            if self._doomed or self.health.phase not in ("loading", "ready", "not_ready"):
                continue
            if problem := self._dead_rank() or self._stuck_not_ready(now) or self._stall(now):
                await self._restart(problem)
            elif self.health.phase == "ready":
                next_canary = self._due_canary(now, next_canary)

    def _dead_rank(self) -> str | None:
        dead = sorted(rank for rank, pid in rank_pids(self.cfg.state_dir).items() if not pid_alive(pid))
        return f"rank {dead[0]} exited" if dead else None

    def _stuck_not_ready(self, now: float) -> str | None:
        """Not ready for longer than the canary's retries can take, with no restart under way: a state
        nothing else would leave, so readiness could stay 503 while the process idles. Restart."""
        if self.health.phase != "not_ready" or (self._probe and not self._probe.done()):
            return None
        limit = (self.cfg.canary_retries + 1) * self.cfg.canary_timeout_s + 10
        if now - self._phase_since > limit:
            return f"not ready for {limit:.0f}s ({self.health.reason})"
        return None

    def _stall(self, now: float) -> str | None:
        if self.health.phase == "ready" and self._pending \
                and now - self._last_progress > self.cfg.stall_timeout_s:
            return f"engine stalled: no token for {self.cfg.stall_timeout_s:.0f}s"
        return None

    def _due_canary(self, now: float, next_canary: float) -> float:
        """Start a canary when one is due and none is running, idle or busy (it is admitted ahead of
        queued requests, so under load it still measures the engine); returns when the next is due."""
        if now >= next_canary and (self._probe is None or self._probe.done()):
            self._start_probe(self.cfg.canary_timeout_s)
            return now + self.cfg.canary_interval_s
        return next_canary

    def _start_probe(self, timeout: float) -> None:
        # A task of its own, so the watch loop keeps checking ranks while a canary waits.
        self._probe = asyncio.get_running_loop().create_task(self._probe_canary(timeout))

    async def _probe_canary(self, timeout: float) -> None:
        """The canary, retried until it answers, which makes the group ready (again). Only failures
        while no real request got a token either count: after canary_retries + 1 of those in a row
        the group restarts (counted in the budget). A timeout while real requests got tokens counts
        for nothing and leaves readiness as it is: the group is busy, not broken, and turning clients
        away or restarting would lose the work in flight. (A group busy with nothing to show for it
        is a stall: no token for anyone, which counts here and in _stall.)"""
        generation, attempts, failures = self._group_generation, self.cfg.canary_retries + 1, 0
        last = ""
        while failures < attempts:
            started = time.monotonic()
            outcome = await self._canary(timeout)
            if outcome in ("ok", "lost") or generation != self._group_generation or self._doomed:
                return  # answered, or the group is already being restarted for another reason
            if outcome.startswith(TIMED_OUT) and self._served_at > started:
                failures = self.health.canary_failures = 0   # not in a row any more: counting starts over
                log.warning("canary %s while requests are making progress: not counted, retrying", outcome)
                continue
            failures = self.health.canary_failures = failures + 1
            last = f"canary {outcome} ({failures}/{attempts})"
            # Readiness follows the restart decision, as a probe's failure threshold does: one slow canary
            # on a loaded machine turned the group away from every balancer (HAProxy and the clouds' check
            # the same /health/ready) though it answered the next one. Until the last attempt the group
            # stays as it is; a group still loading stays not ready and says why.
            if self.health.phase != "ready":
                self._set_phase(self.health.phase, last)
        await self._restart(f"canary failed {attempts} times in a row (last: {last})")

    async def _canary(self, timeout: float) -> str:
        """One canary generation: "ok", "lost" (the group went away), or what went wrong (a timeout
        starts with TIMED_OUT)."""
        started = time.monotonic()
        request = GenerationRequest(input_ids=self.canary_ids, max_tokens=2)
        try:
            async with asyncio.timeout(timeout):
                tokens = [e async for e in self._submit(request, canary=True) if e.kind == "token"]
        except (EngineUnavailable, QueueFull) as err:
            log.warning("canary failed: %s", err)
            return "lost"
        except TimeoutError:
            log.warning("canary timed out after %gs", timeout)
            return f"{TIMED_OUT} after {timeout:g}s"
        if not tokens:
            return "returned no token"
        self.health.last_canary_s = time.monotonic() - started
        self.health.canary_failures = 0
        if self.health.phase in ("loading", "not_ready") and not self._doomed:
            log.info("ready: every rank loaded, canary answered in %.2fs", self.health.last_canary_s)
            self._set_phase("ready", "ready")
        return "ok"

    # ------------------------------------------------------------------ control channel
    async def _on_driver(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = await self._read_hello(reader)
        # No token yet (before the first launch) must not match an empty one.
        if hello is None or not self._token or \
                not secrets.compare_digest(str(hello.get("token", "")), self._token):
            self._reject(writer)
            return
        generation = self._group_generation
        self._driver = writer
        try:
            while line := await reader.readline():
                self._on_message(json.loads(line))
        except (ConnectionError, ValueError):
            pass
        finally:
            if self._driver is writer:
                self._driver = None
            if generation == self._group_generation and not self._stopping:
                await self._restart("driver rank disconnected (a rank exited)")

    @staticmethod
    async def _read_hello(reader: asyncio.StreamReader) -> dict | None:
        """The first line, as a JSON object; None when it is late, not JSON, or over the line limit."""
        try:
            hello = json.loads(await asyncio.wait_for(reader.readline(), 10) or b"{}")
        except (TimeoutError, ValueError, ConnectionError):  # ValueError: bad JSON or line too long
            return None
        return hello if isinstance(hello, dict) else None

    def _reject(self, writer: asyncio.StreamWriter) -> None:
        self.health.control_rejected += 1
        peer = writer.get_extra_info("peername")
        log.warning("control: rejected a connection from %s with a wrong or missing token "
                    "(%d rejected so far)", peer, self.health.control_rejected)
        writer.close()

    def _on_message(self, msg: dict) -> None:
        kind = msg["type"]
        if kind == "loading":
            self.health.loaded = msg["loaded"]
            self.health.reason = f"loading {msg['loaded']}/{msg['world']} ranks"
        elif kind == "loaded":
            self.health.loaded = msg["world"]
            self.health.loads = msg.get("loads", [])
            self.health.reason = "all ranks loaded; waiting for the canary"
            self._start_probe(self.cfg.startup_canary_timeout_s)
        elif kind == "rank_lost":
            self._spawn(self._restart(
                f"rank {msg['rank']} stopped answering (no heartbeat for {msg['seconds']}s)"))
        elif kind == "batch":
            self.batches += 1
            self.batched_rows += msg["size"]
        elif kind == "error":   # one request failed inside the engine; the others go on
            queue = self._pending.get(msg["id"])
            if queue is not None:
                queue.put_nowait(RequestFailed(msg["message"]))
        elif kind in ("token", "done"):
            self._last_progress = time.monotonic()
            if not is_canary(msg["id"]):   # the canary's own tokens show nobody else is served
                self._served_at = self._last_progress
            queue = self._pending.get(msg["id"])
            if queue is not None:
                queue.put_nowait(Event("token", token=msg["token"], logprob=msg.get("logprob"),
                                       top=msg.get("top")) if kind == "token"
                                 else Event("done", finish_reason=msg["finish_reason"]))
    # ------------------------------------------------------------------ requests
    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        async for event in self._submit(request, canary=False):
            yield event

    async def cancel(self, request_id: str) -> None:
        if self._driver is not None:
            self._driver.write(encode({"type": "cancel", "id": request_id}))

    async def _submit(self, request: GenerationRequest, canary: bool) -> AsyncIterator[Event]:
        if not canary and not self.health.ready:
            raise EngineUnavailable(self.health.reason)
        if self._driver is None:
            raise EngineUnavailable(self.health.reason)
        if not canary and (waiting := self._real_pending()) >= self.max_queue:
            raise QueueFull(f"{waiting} requests waiting (limit {self.max_queue})")
        request_id = (CANARY_ID if canary else "") + uuid.uuid4().hex
        queue: asyncio.Queue = asyncio.Queue()
        self._pending[request_id] = queue
        if len(self._pending) == 1:  # the stall clock starts when work arrives
            self._last_progress = time.monotonic()
        # priority: the driver admits the canary before the requests waiting (see control.py).
        self._driver.write(encode({"type": "generate", "id": request_id, **request.__dict__,
                                   "priority": canary}))
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.kind == "done":
                    finished = True
                    return
        finally:
            self._pending.pop(request_id, None)
            if not finished:  # the client left, a stop string matched, or a deadline passed
                await self.cancel(request_id)

    def _real_pending(self) -> int:
        """Requests waiting or running, canaries aside: a canary, now sent under load too, must not
        take a client's place in the queue."""
        return sum(1 for request_id in self._pending if not is_canary(request_id))

    @property
    def queue_depth(self) -> int:
        return len(self._pending)
