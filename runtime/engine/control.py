"""The control channel between the supervisor (HTTP front) and the driver rank.

Line-delimited JSON over loopback TCP. The driver connects and proves itself with a per-launch token
(a random secret in its environment), so another local process cannot pose as the engine.

driver -> supervisor: hello{token, world}, loading{loaded, world}, loaded{world},
                      token{id, token[, logprob, top]}, done{id, finish_reason, completion_tokens}, error{id, message}
supervisor -> driver: generate{id, input_ids, max_tokens, temperature, top_p, seed, stop_token_ids, logprobs,
                      priority}, cancel{id}

A generate with priority (the supervisor's canary) is admitted before every request already waiting:
the canary measures the engine, not the queue in front of it.
"""
from __future__ import annotations

import itertools
import json
import queue
import socket
import threading
import time
from dataclasses import fields

from runtime.engine.request import Row


def encode(message: dict) -> bytes:
    return (json.dumps(message, separators=(",", ":")) + "\n").encode()


class Requests:
    """The driver's waiting requests: priority ones first, then the others in arrival order. None
    (shut down) waits in line like a request, so what arrived before it is still served."""

    def __init__(self):
        self._queue: queue.PriorityQueue[tuple[int, int, Row | None]] = queue.PriorityQueue()
        self._arrivals = itertools.count()   # unique: ties never compare rows

    def put(self, row: Row | None, priority: bool = False) -> None:
        self._queue.put((0 if priority else 1, next(self._arrivals), row))

    def get(self, timeout: float | None = None) -> Row | None:
        """Blocks (up to `timeout`); queue.Empty when none came."""
        return self._queue.get(timeout=timeout)[2]

    def get_nowait(self) -> Row | None:
        return self._queue.get_nowait()[2]

    def __len__(self) -> int:
        return self._queue.qsize()


class DriverChannel:
    """The driver rank's end: a reader thread fills a request queue and a cancelled-id set."""

    def __init__(self, address: str, token: str, connect_timeout: float = 60.0):
        host, port = address.rsplit(":", 1)
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                self.sock = socket.create_connection((host, int(port)), timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.sock.settimeout(None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._lock = threading.Lock()
        self.requests = Requests()
        self.cancelled: set[str] = set()
        self.send({"type": "hello", "token": token})
        threading.Thread(target=self._read, daemon=True, name="herd-control").start()

    def send(self, message: dict) -> None:
        with self._lock:
            self.sock.sendall(encode(message))

    def _read(self) -> None:
        try:
            for line in self.sock.makefile("rb"):
                message = json.loads(line)
                if message["type"] == "generate":
                    # The message carries the supervisor's request fields; Row keeps the defaults.
                    row = Row(**{f.name: message[f.name] for f in fields(Row) if f.name in message})
                    self.requests.put(row, priority=bool(message.get("priority")))
                elif message["type"] == "cancel":
                    self.cancelled.add(message["id"])
        except OSError:
            pass
        self.requests.put(None)  # the supervisor went away: the driver shuts the group down

    def take(self, limit: int, block: bool, window_s: float) -> list[Row] | None:
        """Requests to join the batch: when idle, block for one and gather what else arrives within a
        short window; when busy, take what is waiting without blocking. None: shut down."""
        batch: list[Row] = []
        if limit <= 0:
            return batch
        if block:
            first = self.requests.get()
            if first is None:
                return None
            batch.append(first)
            deadline = time.monotonic() + window_s
        while len(batch) < limit:
            try:
                timeout = max(0.0, deadline - time.monotonic()) if block else 0
                row = self.requests.get(timeout=timeout) if timeout else self.requests.get_nowait()
            except queue.Empty:
                break
            if row is None:  # noticed again when the batch runs dry
                self.requests.put(None)
                break
            batch.append(row)
        return [r for r in batch if r.id not in self.cancelled]
