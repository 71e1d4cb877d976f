"""The supervisor: owns the worker group of one node, and on the head node the engine's front.

It starts torchrun, watches every local rank, restarts the whole group when a rank dies (bounded,
with backoff, the reason logged), and keeps an honest readiness state: ready only when every rank has
loaded and a canary generation came back in time. Requests reach the driver rank over the control
channel; when the group is lost, requests in flight fail at once instead of hanging.
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
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from runtime.engine.control import encode
from runtime.engine.request import GenerationRequest
from runtime.launch import LaunchConfig, torchrun_command, worker_env
from runtime.processes import pid_alive, stop_group

log = logging.getLogger("herd.supervisor")


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
    restarts: int = 0
    last_canary_s: float | None = None
    loads: list = field(default_factory=list)   # per rank: seconds, shard bytes, bytes read from disk

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


class Supervisor:
    def __init__(self, cfg: LaunchConfig, pad_id: int = 0, canary_ids: list[int] | None = None,
                 max_queue: int | None = None):
        self.cfg = cfg
        self.pad_id = pad_id
        self.canary_ids = canary_ids or [1]
        self.max_queue = max_queue or 4 * cfg.max_batch
        self.health = Health(world=cfg.world_size)
        self._pending: dict[str, asyncio.Queue] = {}
        self._driver: asyncio.StreamWriter | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._token = ""
        self._control_addr: str | None = None
        self._stopping = False
        self._last_progress = time.monotonic()
        self._tasks: list[asyncio.Task] = []
        self._group_generation = 0
        self.on_restart = None  # hook for metrics
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
        self.health.phase, self.health.reason = "stopping", "shutting down"
        self._fail_pending("server is shutting down")
        await self._kill_group()
        for task in self._tasks:
            task.cancel()
        if self.cfg.is_head:
            self._server.close()

    async def _launch(self) -> None:
        ranks = self.cfg.state_dir / "ranks"
        ranks.mkdir(parents=True, exist_ok=True)
        for stale in ranks.glob("*.pid"):
            stale.unlink()
        self._token = secrets.token_hex(16)
        self._group_generation += 1
        self.health.loaded = 0
        self.health.phase = "loading"
        self.health.reason = f"starting {self.cfg.world_size} ranks"
        cmd = torchrun_command(self.cfg)
        log.info("launching: %s", " ".join(cmd))
        self._proc = await asyncio.create_subprocess_exec(
            *cmd, env=worker_env(self.cfg, self._control_addr, self._token, self.pad_id),
            start_new_session=True, preexec_fn=die_with_parent)

    async def _kill_group(self) -> None:
        await stop_group(self._proc, grace_s=10)
        # torchrun terminates its workers on SIGTERM; any it left (it was killed) go now.
        if leftovers := kill_ranks(self.cfg.state_dir):
            log.warning("killed %d rank(s) torchrun left behind", len(leftovers))

    async def _run_group(self) -> None:
        while not self._stopping:
            await self._launch()
            code = await self._proc.wait()
            if self._stopping:
                return
            await self._kill_group()
            why = self.health.reason if self.health.phase == "not_ready" else f"worker group exited ({code})"
            self._lost(f"{why}; worker group exited with code {code}")
            if self.health.restarts >= self.cfg.max_restarts:
                self.health.phase = "failed"
                self.health.reason = (f"{why}; gave up after {self.health.restarts} restarts "
                                      "(see the log)")
                log.error("worker group failed for good: %s", self.health.reason)
                return
            self.health.restarts += 1
            backoff = min(self.cfg.restart_backoff_s * 2 ** (self.health.restarts - 1),
                          self.cfg.restart_backoff_max_s)
            log.warning("restarting worker group in %.1fs (restart %d/%d): %s", backoff,
                        self.health.restarts, self.cfg.max_restarts, why)
            self.health.phase = "restarting"
            self.health.reason = f"{why}; restarting ({self.health.restarts}/{self.cfg.max_restarts})"
            if self.on_restart:
                self.on_restart()
            await asyncio.sleep(backoff)

    def _lost(self, reason: str) -> None:
        if self.health.phase in ("stopping", "failed"):
            return
        if self.health.phase != "not_ready":
            log.warning("not ready: %s", reason)
        self.health.phase, self.health.reason = "not_ready", reason
        self._fail_pending(reason)

    def _fail_pending(self, reason: str) -> None:
        for queue in self._pending.values():
            queue.put_nowait(EngineUnavailable(reason))
        self._pending.clear()

    # ------------------------------------------------------------------ watching
    async def _watch(self) -> None:
        """Rank liveness (pid files) every 0.25 s, the canary when idle, stalls under load."""
        next_canary = time.monotonic() + self.cfg.canary_interval_s
        while not self._stopping:
            await asyncio.sleep(0.25)
            dead = self._dead_ranks()
            if dead and self.health.phase in ("loading", "ready"):
                self._lost(f"rank {dead[0]} exited")
                await self._kill_group()
                continue
            if self.health.phase == "ready":
                now = time.monotonic()
                stalled = self._pending and now - self._last_progress > self.cfg.stall_timeout_s
                if stalled:
                    self._lost(f"engine stalled: no token for {self.cfg.stall_timeout_s:.0f}s")
                    await self._kill_group()
                elif not self._pending and now >= next_canary:
                    await self._canary(self.cfg.canary_timeout_s)
                    next_canary = time.monotonic() + self.cfg.canary_interval_s
                elif self._pending:
                    next_canary = now + self.cfg.canary_interval_s

    def _dead_ranks(self) -> list[int]:
        return sorted(rank for rank, pid in rank_pids(self.cfg.state_dir).items() if not pid_alive(pid))

    async def _canary(self, timeout: float) -> bool:
        started = time.monotonic()
        request = GenerationRequest(input_ids=self.canary_ids, max_tokens=2)
        try:
            async with asyncio.timeout(timeout):
                tokens = [e async for e in self._submit(request, canary=True) if e.kind == "token"]
            ok = bool(tokens)
        except (EngineUnavailable, QueueFull) as err:
            log.warning("canary failed: %s", err)
            return False
        except TimeoutError:
            self._lost(f"canary timed out after {timeout:.0f}s")
            return False
        self.health.last_canary_s = time.monotonic() - started
        if ok and self.health.phase in ("loading", "not_ready"):
            log.info("ready: every rank loaded, canary answered in %.2fs", self.health.last_canary_s)
            self.health.phase, self.health.reason = "ready", "ready"
        return ok

    # ------------------------------------------------------------------ control channel
    async def _on_driver(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello = json.loads(await asyncio.wait_for(reader.readline(), 10) or b"{}")
        except (asyncio.TimeoutError, json.JSONDecodeError):
            writer.close()
            return
        if not secrets.compare_digest(str(hello.get("token", "")), self._token):
            log.warning("control: rejected a connection with a wrong token")
            writer.close()
            return
        generation = self._group_generation
        self._driver = writer
        try:
            while line := await reader.readline():
                self._on_message(json.loads(line))
        except (ConnectionError, json.JSONDecodeError):
            pass
        finally:
            if self._driver is writer:
                self._driver = None
            if generation == self._group_generation and not self._stopping:
                self._lost("driver rank disconnected (a rank exited)")

    def _on_message(self, msg: dict) -> None:
        kind = msg["type"]
        if kind == "loading":
            self.health.loaded = msg["loaded"]
            self.health.reason = f"loading {msg['loaded']}/{msg['world']} ranks"
        elif kind == "loaded":
            self.health.loaded = msg["world"]
            self.health.loads = msg.get("loads", [])
            self.health.reason = "all ranks loaded; waiting for the canary"
            asyncio.get_running_loop().create_task(self._canary(self.cfg.startup_canary_timeout_s))
        elif kind == "rank_lost":
            self._lost(f"rank {msg['rank']} stopped answering (no heartbeat for {msg['seconds']}s)")
            asyncio.get_running_loop().create_task(self._kill_group())
        elif kind == "batch":
            self.batches += 1
            self.batched_rows += msg["size"]
        elif kind == "error":   # one request failed inside the engine; the others go on
            queue = self._pending.get(msg["id"])
            if queue is not None:
                queue.put_nowait(RequestFailed(msg["message"]))
        elif kind in ("token", "done"):
            self._last_progress = time.monotonic()
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
        if not canary and len(self._pending) >= self.max_queue:
            raise QueueFull(f"{len(self._pending)} requests waiting (limit {self.max_queue})")
        request_id = uuid.uuid4().hex
        queue: asyncio.Queue = asyncio.Queue()
        self._pending[request_id] = queue
        if len(self._pending) == 1:  # the stall clock starts when work arrives
            self._last_progress = time.monotonic()
        self._driver.write(encode({"type": "generate", "id": request_id, **request.__dict__}))
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

    @property
    def queue_depth(self) -> int:
        return len(self._pending)
