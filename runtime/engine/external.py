"""An engine in a process of its own (vLLM, or any server speaking the OpenAI API) behind herd's front.

herd starts it, restarts it when it dies (bounded, with backoff), and decides readiness itself:
ready only once the engine listens *and* a canary completion through its OpenAI API came back in
time; the canary repeats while idle. Requests are forwarded only while ready; when the engine dies,
requests in flight fail with 503 instead of hanging.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from runtime.serving.processes import stop_group
from runtime.serving.supervisor import Health, die_with_parent

log = logging.getLogger("herd.external")


@dataclass
class ExternalEngineConfig:
    argv: list[str]
    engine_url: str                      # e.g. http://127.0.0.1:8100
    served_model_name: str
    env: dict[str, str] = field(default_factory=dict)
    max_restarts: int = 3
    restart_backoff_s: float = 1.0
    restart_backoff_max_s: float = 30.0
    canary_interval_s: float = 10.0
    canary_timeout_s: float = 10.0
    startup_timeout_s: float = 1800.0    # 405B takes minutes to load; vLLM does not listen meanwhile
    # Fetching the engine's /metrics on each scrape of herd's: short, so that a hung engine costs a
    # scrape this long at most (Prometheus' default scrape timeout is 10 s) and herd's own still render.
    metrics_timeout_s: float = 2.0
    metrics_max_bytes: int = 32 * 2**20


class ExternalEngine:
    def __init__(self, cfg: ExternalEngineConfig):
        self.cfg = cfg
        self.health = Health(world=1)
        self.in_flight = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._tasks: list[asyncio.Task] = []
        self._client = httpx.AsyncClient(base_url=cfg.engine_url, timeout=httpx.Timeout(None, connect=5))
        self._lost = asyncio.Event()
        self.on_restart: Callable[[], None] | None = None   # hook for metrics
        self._metrics_failing: str | None = None

    @property
    def queue_depth(self) -> int:
        return self.in_flight

    async def start(self, front: bool = True) -> None:
        """front=False: a headless worker node, supervised but not probed (it serves no API)."""
        self._tasks = [asyncio.create_task(self._run())]
        if front:
            self._tasks.append(asyncio.create_task(self._watch()))

    async def stop(self) -> None:
        self._stopping = True
        self.health.phase, self.health.reason = "stopping", "shutting down"
        self._lost.set()
        await self._kill()
        for task in self._tasks:
            task.cancel()
        await self._client.aclose()

    async def _kill(self) -> None:
        await stop_group(self._proc, grace_s=30)  # vLLM frees GPU memory on a clean stop

    async def _run(self) -> None:
        while not self._stopping:
            self._lost = asyncio.Event()
            self.health.phase, self.health.reason, self.health.loaded = "loading", "starting the engine", 0
            log.info("starting engine: %s", " ".join(self.cfg.argv))
            self._proc = await asyncio.create_subprocess_exec(
                *self.cfg.argv, env={**os.environ, **self.cfg.env}, start_new_session=True,
                preexec_fn=die_with_parent)
            code = await self._proc.wait()
            if self._stopping:
                return
            why = f"engine exited with code {code}"
            self._mark_lost(why)
            if self.health.restarts >= self.cfg.max_restarts:
                self.health.phase = "failed"
                self.health.reason = f"{why}; gave up after {self.health.restarts} restarts"
                log.error("%s", self.health.reason)
                return
            self.health.restarts += 1
            if self.on_restart:
                self.on_restart()
            backoff = min(self.cfg.restart_backoff_s * 2 ** (self.health.restarts - 1), self.cfg.restart_backoff_max_s)
            log.warning("%s; restarting in %.1fs (%d/%d)", why, backoff, self.health.restarts, self.cfg.max_restarts)
            self.health.phase = "restarting"
            self.health.reason = f"{why}; restarting ({self.health.restarts}/{self.cfg.max_restarts})"
            await asyncio.sleep(backoff)

    def _mark_lost(self, reason: str) -> None:
        if self.health.phase in ("stopping", "failed"):
            return
        self.health.phase, self.health.reason = "not_ready", reason
        self._lost.set()  # wakes every forwarded request: they answer 503 now

    async def _watch(self) -> None:
        next_canary = 0.0
        started = time.monotonic()
        while not self._stopping:
            await asyncio.sleep(0.25)
            proc = self._proc
            if proc is None or proc.returncode is not None:
                started = time.monotonic()
                continue
            if self.health.phase == "loading":
                try:
                    r = await self._client.get("/v1/models", timeout=2)
                    listening = r.status_code in (200, 401)
                except httpx.TransportError:
                    listening = False
                if not listening:
                    waited = time.monotonic() - started
                    self.health.reason = f"engine loading, not listening yet ({waited:.0f}s)"
                    if waited > self.cfg.startup_timeout_s:
                        self._mark_lost(f"engine did not listen within {self.cfg.startup_timeout_s:.0f}s")
                        await self._kill()
                    continue
                self.health.reason = "engine listening; waiting for the canary"
                next_canary = 0.0
            now = time.monotonic()
            if self.health.phase in ("loading", "not_ready", "ready") and now >= next_canary and not self.in_flight:
                ok, why = await self._canary()
                next_canary = time.monotonic() + self.cfg.canary_interval_s
                if ok and self.health.phase != "ready":
                    log.info("ready: canary answered in %.2fs", self.health.last_canary_s)
                    self.health.phase, self.health.reason, self.health.loaded = "ready", "ready", 1
                elif not ok and self.health.phase == "ready":
                    self._mark_lost(why)

    async def _canary(self) -> tuple[bool, str]:
        started = time.monotonic()
        body = {"model": self.cfg.served_model_name, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
        headers = {}
        key = self.cfg.env.get("VLLM_API_KEY")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        try:
            r = await self._client.post("/v1/completions", json=body, headers=headers,
                                        timeout=self.cfg.canary_timeout_s)
        except httpx.TimeoutException:
            return False, f"canary timed out after {self.cfg.canary_timeout_s:.0f}s"
        except httpx.TransportError as err:
            return False, f"canary failed: {type(err).__name__}"
        if r.status_code != 200 or not r.json().get("choices"):
            return False, f"canary answered HTTP {r.status_code}"
        self.health.last_canary_s = time.monotonic() - started
        return True, "ok"

    async def scrape_metrics(self):
        """The engine's own Prometheus exposition (vLLM's `vllm:` families), for herd's /metrics to
        carry after its own: one scrape target per node. Never raises: a dead, hung or failing engine
        gives an EngineScrape without text (herd_engine_metrics_up 0) and herd's metrics render anyway."""
        from runtime.serving.metrics import EngineScrape
        started = time.monotonic()
        headers = {}
        key = self.cfg.env.get("VLLM_API_KEY")
        if key:
            headers["Authorization"] = f"Bearer {key}"

        async def fetch() -> str:
            async with self._client.stream("GET", "/metrics", headers=headers) as r:
                if r.status_code != 200:
                    raise _ScrapeFailed(f"HTTP {r.status_code}")
                body = bytearray()
                async for part in r.aiter_bytes():
                    body += part
                    if len(body) > self.cfg.metrics_max_bytes:
                        raise _ScrapeFailed(f"exposition larger than {self.cfg.metrics_max_bytes} bytes")
                return body.decode("utf-8", errors="replace")
        error = text = None
        try:
            # A total deadline: httpx's timeouts bound each read, not an engine that trickles bytes.
            text = await asyncio.wait_for(fetch(), self.cfg.metrics_timeout_s)
        except asyncio.TimeoutError:
            error = f"timed out after {self.cfg.metrics_timeout_s:g}s"
        except _ScrapeFailed as err:
            error = str(err)
        except (httpx.HTTPError, RuntimeError) as err:   # RuntimeError: the client closed (stopping)
            error = f"unreachable ({type(err).__name__})"
        if error != self._metrics_failing:   # log changes, not every scrape
            if error:
                log.warning("engine /metrics: %s; herd's own metrics are served without it", error)
            elif self._metrics_failing:
                log.info("engine /metrics answers again")
            self._metrics_failing = error
        return EngineScrape(text, time.monotonic() - started, error)

    async def forward(self, method: str, path: str, headers: dict, body: bytes):
        """Send one request to the engine; returns (status, headers, async byte iterator)."""
        lost = self._lost
        request = self._client.build_request(method, path, headers=headers, content=body)
        response = await self._client.send(request, stream=True)

        async def chunks():
            self.in_flight += 1
            try:
                iterator = response.aiter_raw().__aiter__()
                while True:
                    next_chunk = asyncio.ensure_future(iterator.__anext__())
                    waiter = asyncio.ensure_future(lost.wait())
                    done, _ = await asyncio.wait({next_chunk, waiter}, return_when=asyncio.FIRST_COMPLETED)
                    if next_chunk not in done:
                        next_chunk.cancel()
                        raise EngineLost(self.health.reason)
                    waiter.cancel()
                    try:
                        yield next_chunk.result()
                    except StopAsyncIteration:
                        return
            except (httpx.TransportError, StopAsyncIteration) as err:
                if isinstance(err, StopAsyncIteration):
                    return
                raise EngineLost(f"engine connection lost ({type(err).__name__})") from None
            finally:
                self.in_flight -= 1
                await response.aclose()
        return response.status_code, dict(response.headers), chunks()


class EngineLost(Exception):
    pass


class _ScrapeFailed(Exception):
    pass
