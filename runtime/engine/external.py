"""An engine in a process of its own (vLLM, or any server speaking the OpenAI API) behind herd's front.

herd starts it, restarts it when it dies or hangs, and decides readiness itself: ready only once the
engine listens *and* a canary completion through its OpenAI API came back in time. The canary repeats
every canary_interval_s, busy or idle; canary_retries + 1 failures in a row (none of them while other
requests were receiving bytes from the engine: a busy engine is not a broken one) kill the engine's
process group, and it is started again. Requests are forwarded only while ready; when the engine is
lost, requests in flight fail with 503 instead of hanging.

Restarts are budgeted as for herd's own engine (RestartBudget): at most max_restarts within
restart_window_s. When the budget is spent the engine gives up (phase `failed`, `gave_up` set) and
`herd serve` exits with EXIT_RESTARTS_SPENT, so its service manager starts it afresh.

The engine's stdout and stderr pass through to herd's own, and their last lines are kept, so that an
engine that exits says why in one line: `engine exited with code 1: ValueError: ...`.
"""
from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import os
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import BinaryIO

import httpx

from runtime.serving.processes import exit_of, stop_group
from runtime.serving.supervisor import Health, RestartBudget, die_with_parent

log = logging.getLogger("herd.external")
# vLLM's counters of tokens processed: while they move, the engine works (whatever its canary says).
WORK_COUNTERS = ("vllm:prompt_tokens_total", "vllm:generation_tokens_total")

TRACEBACK = "Traceback (most recent call last):"


@dataclass
class ExternalEngineConfig:
    argv: list[str]
    engine_url: str                      # e.g. http://127.0.0.1:8100
    served_model_name: str
    env: dict[str, str] = field(default_factory=dict)
    max_restarts: int = 3                # restarts allowed within restart_window_s
    restart_window_s: float = 300.0
    restart_backoff_s: float = 1.0
    restart_backoff_max_s: float = 30.0
    canary_interval_s: float = 10.0
    canary_timeout_s: float = 10.0
    canary_retries: int = 2              # failed canaries retried before the engine is killed and restarted
    # Between SIGTERM and SIGKILL when herd kills a hung engine: short, as a stopped or wedged process
    # ignores SIGTERM, and requests wait meanwhile. (A requested stop gives vLLM longer: see _kill.)
    kill_grace_s: float = 5.0
    startup_timeout_s: float = 1800.0    # 405B takes minutes to load; vLLM does not listen meanwhile
    # Fetching the engine's /metrics on each scrape of herd's: short, so that a hung engine costs a
    # scrape this long at most (Prometheus' default scrape timeout is 10 s) and herd's own still render.
    metrics_timeout_s: float = 2.0
    metrics_max_bytes: int = 32 * 2**20
    output_tail_lines: int = 50          # the engine's last lines kept, to say why it exited
    # A process this node runs beside the engine, started first and supervised on its own (restarted when
    # it exits, under its own budget): a TPU slice head's Ray head, which vLLM's Ray executor joins.
    before: ExternalEngineConfig | None = None


@dataclass
class OutputTail:
    """The last lines the engine wrote, stdout and stderr together (vLLM logs to stdout, Python's
    uncaught tracebacks go to stderr). Fed raw bytes as they come: lines may span reads, and progress
    bars end theirs with a bare carriage return."""
    max_lines: int = 50
    max_line_chars: int = 1000
    lines: deque[str] = field(init=False)
    _partial: dict[str, str] = field(default_factory=dict)          # per stream: a line not ended yet
    _decoders: dict[str, codecs.IncrementalDecoder] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.lines = deque(maxlen=self.max_lines)

    def feed(self, stream: str, data: bytes) -> None:
        decoder = self._decoders.setdefault(stream, codecs.getincrementaldecoder("utf-8")(errors="replace"))
        *complete, rest = re.split(r"\r\n|\r|\n", self._partial.pop(stream, "") + decoder.decode(data))
        self._keep(complete)
        self._partial[stream] = rest[-self.max_line_chars:]   # bounded, even for output without newlines

    def close(self, stream: str) -> None:
        """The stream ended: its unfinished line counts too (a last message without a newline)."""
        decoder = self._decoders.pop(stream, None)
        self._keep([self._partial.pop(stream, "") + (decoder.decode(b"", final=True) if decoder else "")])

    def _keep(self, lines: Iterable[str]) -> None:
        # Blank lines say nothing and would push the ones that do out of the tail.
        self.lines.extend(line.rstrip()[:self.max_line_chars] for line in lines if line.strip())

    def summary(self) -> str | None:
        return summary_line(list(self.lines))


def summary_line(lines: list[str]) -> str | None:
    """The line of an engine's output that says what went wrong: a Python traceback's exception line
    (`ValueError: ...`), else the last line that is not blank. Lines may carry a prefix of their own
    (vLLM prefixes each line of a record with its level and source, and a worker's with its process):
    the one before `Traceback` is stripped from the lines after it."""
    lines = [line for line in lines if line.strip()]
    for at in range(len(lines) - 1, -1, -1):
        start = lines[at].find(TRACEBACK)
        if start < 0:
            continue
        found = _exception_line(lines[at + 1:], lines[at][:start])
        # vLLM's API server ends with "RuntimeError: Engine core initialization failed. See root cause
        # above.": the cause is the traceback before it, when the tail still holds it.
        if found and "root cause above" not in found.lower():
            return found
    return lines[-1].strip() if lines else None


def _exception_line(after: list[str], prefix: str) -> str | None:
    """In the lines after `Traceback ...`: the first one not indented (frames and code are), which
    is the exception, with the indented lines that continue its message (pydantic's ValidationError
    names what failed on the next line); None when the tail ends inside the frames."""
    bodies = [line[len(prefix):] if prefix and line.startswith(prefix) else line for line in after]
    for at, body in enumerate(bodies):
        if body.strip() and not body[0].isspace():
            message = [body.strip()]
            for more in bodies[at + 1:]:
                if not more[:1].isspace() or more.strip().startswith("For further information"):
                    break
                message.append(more.strip())
            return _one_line(" ".join(message))
    return None


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _has_choices(r: httpx.Response) -> bool:
    try:
        body = r.json()
    except ValueError:   # not JSON: not an OpenAI answer
        return False
    return isinstance(body, dict) and bool(body.get("choices"))


def _binary(stream) -> BinaryIO | None:
    """Where the engine's bytes go: herd's own stdout or stderr (the terminal, journald, serve.log)."""
    return getattr(stream, "buffer", None)


class ExternalEngine:
    def __init__(self, cfg: ExternalEngineConfig):
        self.cfg = cfg
        self.budget = RestartBudget(cfg.max_restarts, cfg.restart_window_s, cfg.restart_backoff_s,
                                    cfg.restart_backoff_max_s)
        self.health = Health(world=1, max_restarts=cfg.max_restarts, restart_window_s=cfg.restart_window_s)
        self.gave_up = asyncio.Event()   # the restart budget is spent: `herd serve` should exit
        self.exit_reason = ""            # one line: why it gave up
        self.in_flight = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._launches = 0               # which start of the engine this is: a canary's answer is for one
        self._launched_at = time.monotonic()
        self._doomed = False             # herd is killing this engine: nothing may call it ready
        self._killed_for: str | None = None   # why herd killed it (it then exits by a signal, which says less)
        self._previous_failure: str | None = None   # why the engine before this one ended, until ready
        self._tail = OutputTail()
        self._relays: set[asyncio.Task] = set()
        # When the engine last sent bytes to anyone (a forwarded request): a canary that fails meanwhile
        # finds an engine busy, not broken.
        self._last_progress = float("-inf")
        self._stopping = False
        self._tasks: list[asyncio.Task] = []
        self._client = httpx.AsyncClient(base_url=cfg.engine_url, timeout=httpx.Timeout(None, connect=5))
        self._lost = asyncio.Event()
        self.on_restart: Callable[[], None] | None = None   # hook for metrics
        self._metrics_failing: str | None = None

    @property
    def queue_depth(self) -> int:
        return self.in_flight

    # ------------------------------------------------------------------ lifecycle
    async def start(self, front: bool = True) -> None:
        """front=False: a headless worker node, supervised but not probed (it serves no API)."""
        self.before = ExternalEngine(self.cfg.before) if self.cfg.before is not None else None
        if self.before is not None:
            await self.before.start(front=False)
        self._tasks = [asyncio.create_task(self._run())]
        if front:
            self._tasks.append(asyncio.create_task(self._watch()))

    async def stop(self) -> None:
        before = getattr(self, "before", None)
        if before is not None:
            await before.stop()
        self._stopping = True
        self.health.phase, self.health.reason = "stopping", "shutting down"
        self._lost.set()
        await self._kill()
        for task in [*self._tasks, *self._relays]:
            task.cancel()
        await self._client.aclose()

    async def _kill(self) -> None:
        await stop_group(self._proc, grace_s=30)  # vLLM frees GPU memory on a clean stop

    async def _restart(self, reason: str) -> None:
        """Kill this engine's process group now (it hangs, or never came up); _run then counts the
        restart against the budget. In-flight requests fail at once with the reason."""
        if self._doomed or self.health.phase not in ("loading", "ready", "not_ready"):
            return
        self._doomed, self._killed_for = True, reason
        self._mark_lost(reason)
        log.warning("killing the engine: %s", reason)
        await stop_group(self._proc, grace_s=self.cfg.kill_grace_s)

    async def _run(self) -> None:
        while not self._stopping:
            why = await self._run_once()
            if self._stopping:
                return
            self._previous_failure = why
            self._mark_lost(why)
            now = time.monotonic()
            if not self.budget.allows(now):
                self._give_up(why)
                return
            await asyncio.sleep(self._count_restart(why, now))

    async def _run_once(self) -> str:
        """Start the engine and wait for it to end; returns why it did, in one line."""
        self._lost = asyncio.Event()
        self._launches += 1
        self._launched_at = time.monotonic()
        self._doomed, self._killed_for = False, None
        self._tail = OutputTail(max_lines=self.cfg.output_tail_lines)
        self.health.phase, self.health.loaded, self.health.canary_failures = "loading", 0, 0
        self._loading("starting the engine")
        log.info("starting engine: %s", " ".join(self.cfg.argv))
        try:
            proc = self._proc = await asyncio.create_subprocess_exec(
                *self.cfg.argv, env={**os.environ, **self.cfg.env}, start_new_session=True,
                preexec_fn=die_with_parent, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        except OSError as err:   # not installed, not executable: as much a failed start as an exit
            return _one_line(f"engine could not start: {err}")
        relays = {self._relay(proc.stdout, "stdout", sys.stdout), self._relay(proc.stderr, "stderr", sys.stderr)}
        code = await exit_of(proc)
        # What it started and left behind (vLLM's engine core, when its API server was killed) goes with
        # it: it would hold the cache's memory and the pipes. The last lines may still be in the pipes.
        await stop_group(proc, grace_s=0)
        await asyncio.wait(relays, timeout=2)
        return self._killed_for or self._exited(code)

    def _relay(self, pipe: asyncio.StreamReader | None, name: str, to) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(self._copy(pipe, name, _binary(to), self._tail))
        self._relays.add(task)   # the loop keeps only weak references to tasks
        task.add_done_callback(self._relays.discard)
        return task

    @staticmethod
    async def _copy(pipe: asyncio.StreamReader | None, name: str, sink: BinaryIO | None, tail: OutputTail) -> None:
        """The engine's output into herd's own, as it comes, and into the tail. Reads on whatever
        happens to the sink: an engine whose pipe fills stops with it."""
        if pipe is None:
            return
        while chunk := await pipe.read(65536):
            tail.feed(name, chunk)
            if sink is not None:
                with contextlib.suppress(OSError, ValueError):   # herd's output closed: keep draining
                    sink.write(chunk)
                    sink.flush()
        tail.close(name)

    def _exited(self, code: int) -> str:
        """`engine exited with code N: <its last meaningful line>`."""
        why = f"engine exited with code {code}"
        if code < 0:
            with contextlib.suppress(ValueError):
                why += f" (killed by {signal.Signals(-code).name})"
        last = self._tail.summary()
        return _one_line(f"{why}: {last}" if last else why)

    def _count_restart(self, why: str, now: float) -> float:
        """Take a restart from the budget; returns the backoff to wait before starting again."""
        backoff = self.budget.take(now)
        self.health.restarts += 1
        self.health.restarts_in_window = self.budget.recent(now)
        of = self.budget.usage(now)
        log.warning("restarting the engine in %.1fs (restart %d, %s): %s", backoff, self.health.restarts, of, why)
        self.health.phase, self.health.reason = "restarting", f"{why}; restarting ({of})"
        if self.on_restart:
            self.on_restart()
        return backoff

    def _give_up(self, why: str) -> None:
        """The budget is spent: fail everything in flight, say why in one line, and let serve exit."""
        self.exit_reason = _one_line(self.budget.spent_reason("the engine", why), limit=1000)
        self.health.phase, self.health.reason = "failed", self.exit_reason
        self._lost.set()
        log.error("giving up: %s", self.exit_reason)
        self.gave_up.set()

    def _mark_lost(self, reason: str) -> None:
        if self.health.phase in ("stopping", "failed"):
            return
        if self.health.phase != "not_ready":
            log.warning("not ready: %s", reason)
        self.health.phase, self.health.reason = "not_ready", reason
        self._lost.set()  # wakes every forwarded request: they answer 503 now

    def _loading(self, reason: str) -> None:
        # While a restarted engine loads (minutes, for vLLM), readiness still says why the last one ended.
        after = f"; previous start: {self._previous_failure}" if self._previous_failure else ""
        self.health.reason = reason + after

    # ------------------------------------------------------------------ watching
    async def _watch(self) -> None:
        """Every 0.25 s: is the engine listening yet (within the startup timeout), and is a canary due."""
        next_canary = 0.0
        while not self._stopping:
            await asyncio.sleep(0.25)
            self.health.restarts_in_window = self.budget.recent(time.monotonic())
            proc = self._proc
            if proc is None or proc.returncode is not None or self._doomed \
                    or self.health.phase not in ("loading", "ready", "not_ready"):
                continue
            if self.health.phase == "loading" and not await self._listening():
                continue
            if time.monotonic() >= next_canary:
                next_canary = await self._probe()

    async def _listening(self) -> bool:
        """While loading: whether the engine answers HTTP yet; past the startup timeout it is killed."""
        try:
            r = await self._client.get("/v1/models", timeout=2)
            if r.status_code in (200, 401):
                return True
        except httpx.HTTPError:
            pass
        waited = time.monotonic() - self._launched_at
        self._loading(f"engine loading, not listening yet ({waited:.0f}s)")
        await self._startup_overdue("did not listen")
        return False

    async def _startup_overdue(self, what: str) -> None:
        """Past startup_timeout_s since the start: kill it, saying what it last wrote (where it got stuck)."""
        if time.monotonic() - self._launched_at <= self.cfg.startup_timeout_s:
            return
        last = self._tail.summary()
        await self._restart(_one_line(f"engine {what} within {self.cfg.startup_timeout_s:g}s"
                                      + (f": {last}" if last else "")))

    async def _probe(self) -> float:
        """One canary, and what its outcome means; returns when the next one is due: after
        canary_interval_s when it answered, soon when it failed (a retry)."""
        launch = self._launches
        work_before = await self._work_done()
        ok, why = await self._canary()
        now = time.monotonic()
        retry = now + min(1.0, self.cfg.canary_interval_s)
        if launch != self._launches or self._doomed or self._stopping:
            return now   # that engine is gone or going; the next one starts afresh
        if ok:
            self._answered()
            return now + self.cfg.canary_interval_s
        if self.health.phase == "loading":   # listening, not answering yet: the startup timeout decides
            self._loading(f"engine listening; canary {why}")
            await self._startup_overdue(f"did not answer its canary ({why})")
            return retry
        if now - self._last_progress < self.cfg.canary_timeout_s or await self._worked_since(work_before):
            # Requests got bytes from the engine meanwhile, or its own counters say it processed tokens
            # (long non-streamed generations send no byte until they end): it is busy, not broken. A slow
            # canary on a loaded engine must neither turn clients away nor have it killed; the streak
            # starts over.
            self.health.canary_failures = 0
            log.warning("canary %s while the engine is busy with other requests: retrying", why)
            return retry
        return await self._canary_failed(why, retry)

    async def _canary_failed(self, why: str, retry: float) -> float:
        attempts = self.cfg.canary_retries + 1
        self.health.canary_failures += 1
        if self.health.canary_failures >= attempts:
            await self._restart(f"canary failed {attempts} times in a row, no bytes to any request meanwhile "
                                f"(last: {why})")
            return retry
        # Readiness follows the restart decision (a probe's failure threshold): one slow canary on a
        # loaded machine must not turn every balancer away from an engine that answers the next one. The
        # requests in flight stay: a slow engine may still finish them (a restart, if it comes, fails them).
        log.warning("canary %s (%d/%d)", why, self.health.canary_failures, attempts)
        if self.health.phase != "ready":
            self.health.reason = f"canary {why} ({self.health.canary_failures}/{attempts})"
        return retry

    def _answered(self) -> None:
        self.health.canary_failures = 0
        if self.health.phase != "ready":
            log.info("ready: canary answered in %.2fs", self.health.last_canary_s)
            self.health.phase, self.health.reason, self.health.loaded = "ready", "ready", 1
            self._previous_failure = None

    async def _work_done(self) -> float | None:
        """Tokens the engine says it has processed (vLLM's prompt and generation token counters, from its
        /metrics), or None where it exposes none or does not answer: then no evidence of work."""
        scrape = await self.scrape_metrics()
        if scrape.text is None:
            return None
        total, found = 0.0, False
        for line in scrape.text.splitlines():
            if line.startswith(WORK_COUNTERS):
                try:
                    total += float(line.rsplit(" ", 1)[1])
                    found = True
                except (IndexError, ValueError):
                    continue
        return total if found else None

    async def _worked_since(self, before: float | None) -> bool:
        after = await self._work_done() if before is not None else None
        return before is not None and after is not None and after > before

    async def _canary(self) -> tuple[bool, str]:
        started = time.monotonic()
        body = {"model": self.cfg.served_model_name, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
        headers = {}
        key = self.cfg.env.get("VLLM_API_KEY")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        try:
            # A total deadline: httpx's timeout bounds each read, not an engine that trickles bytes.
            async with asyncio.timeout(self.cfg.canary_timeout_s):
                r = await self._client.post("/v1/completions", json=body, headers=headers,
                                            timeout=self.cfg.canary_timeout_s)
        except (TimeoutError, httpx.TimeoutException):
            return False, f"timed out after {self.cfg.canary_timeout_s:g}s"
        except httpx.HTTPError as err:   # refused, reset, garbled: any of them is a failed canary
            return False, f"failed: {type(err).__name__}"
        if r.status_code != 200 or not _has_choices(r):
            return False, f"answered HTTP {r.status_code}"
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
        # Bytes of work done (a POST: a generation) tell a busy engine from a hung one. A GET does
        # not: vLLM's API server answers /v1/models itself, even while its engine core hangs.
        work = method.upper() == "POST"
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
                        chunk = next_chunk.result()
                    except StopAsyncIteration:
                        return
                    if work:
                        self._last_progress = time.monotonic()
                    yield chunk
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
