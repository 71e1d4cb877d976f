"""`herd generate`: batch generation against any OpenAI-compatible endpoint (synthetic data, teacher
outputs for distillation).

- N requests in flight (async HTTP); 429 and 503 are ridden out with exponential backoff and jitter
  (Retry-After respected), other transient errors retried a bounded number of times, and permanent
  failures recorded as rows with their error, never stopping the job.
- Resumable: ids already in the output are skipped; every output row is one whole line appended with
  a single write and flushed, so a killed job loses at most the rows in flight, and a torn last line
  (the disk filled mid-write) is cut away on the next run.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from runtime.errors import UserError

OVERRIDES = ("max_tokens", "temperature", "top_p", "stop", "seed", "top_logprobs", "logprobs")
RETRY_STATUSES = {429, 503}          # the server says: later
TRANSIENT_STATUSES = {500, 502, 504}


@dataclass
class Row:
    id: str
    line: int
    prompt: str | None = None
    messages: list | None = None
    overrides: dict = field(default_factory=dict)


@dataclass
class BadRow:
    line: int
    reason: str


@dataclass
class Settings:
    endpoint: str
    model: str | None = None
    concurrency: int = 8
    max_tokens: int = 256
    temperature: float = 0.0
    logprobs: int | None = None
    api_key: str | None = None
    max_attempts: int = 8            # for 429/503 phases
    max_transient_attempts: int = 4  # for connection errors and other 5xx
    backoff_s: float = 0.5
    backoff_max_s: float = 20.0
    timeout_s: float = 600.0


@dataclass
class Summary:
    rows: int = 0
    skipped: int = 0
    succeeded: int = 0
    failed: int = 0
    bad_rows: list[BadRow] = field(default_factory=list)
    completion_tokens: int = 0
    wall_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.wall_s if self.wall_s else 0.0


# ------------------------------------------------------------------ input and output files
def read_rows(path: Path) -> tuple[list[Row], list[BadRow]]:
    rows, bad, seen = [], [], set()
    try:
        handle = open(path, encoding="utf-8")
    except OSError as err:
        raise UserError(f"--input: {path}: {err.strerror}") from None
    with handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as err:
                bad.append(BadRow(number, f"not valid JSON ({err.msg})"))
                continue
            if not isinstance(data, dict):
                bad.append(BadRow(number, "expected a JSON object"))
                continue
            row_id = data.get("id")
            if row_id is None or row_id == "":
                bad.append(BadRow(number, "missing id"))
                continue
            row_id = str(row_id)
            if row_id in seen:
                bad.append(BadRow(number, f"duplicate id {row_id!r}"))
                continue
            prompt, messages = data.get("prompt"), data.get("messages")
            if (prompt is None) == (messages is None):
                bad.append(BadRow(number, f"id {row_id!r}: needs exactly one of prompt or messages"))
                continue
            if messages is not None and not (isinstance(messages, list) and messages):
                bad.append(BadRow(number, f"id {row_id!r}: messages must be a non-empty list"))
                continue
            seen.add(row_id)
            rows.append(Row(row_id, number, prompt, messages, {k: data[k] for k in OVERRIDES if k in data}))
    return rows, bad


def done_ids(path: Path) -> set[str]:
    """Ids already written; cuts a torn last line so appends start on a clean line."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(keep)
        data = data[:keep]
    ids = set()
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            ids.add(str(json.loads(line)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return ids


class Appender:
    """One whole line per write(2) on an O_APPEND descriptor: rows never interleave or tear."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, record: dict) -> None:
        os.write(self.fd, (json.dumps(record, ensure_ascii=False) + "\n").encode())

    def close(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)


# ------------------------------------------------------------------ requests
def _payload(row: Row, s: Settings) -> tuple[str, dict]:
    body = {"model": s.model, "max_tokens": s.max_tokens, "temperature": s.temperature}
    if row.messages is not None:
        path, body["messages"] = "/v1/chat/completions", row.messages
        if s.logprobs is not None:
            body["logprobs"], body["top_logprobs"] = True, s.logprobs
    else:
        path, body["prompt"] = "/v1/completions", row.prompt
        if s.logprobs is not None:
            body["logprobs"] = s.logprobs
    body.update(row.overrides)
    return path, body


def _delay(attempt: int, s: Settings, retry_after: str | None) -> float:
    if retry_after:
        try:
            return min(float(retry_after), s.backoff_max_s)
        except ValueError:
            pass
    # Full jitter: many clients backing off together must not return together.
    return random.uniform(0, min(s.backoff_max_s, s.backoff_s * 2 ** attempt))


async def _one(client: httpx.AsyncClient, row: Row, s: Settings) -> dict:
    path, body = _payload(row, s)
    attempts = transient = 0
    started = time.monotonic()
    while True:
        attempts += 1
        try:
            r = await client.post(path, json=body)
        except httpx.TransportError as err:
            transient += 1
            if transient >= s.max_transient_attempts:
                return {"id": row.id, "error": {"status": None, "message": f"{type(err).__name__}: {err}"},
                        "attempts": attempts}
            await asyncio.sleep(_delay(transient, s, None))
            continue
        if r.status_code == 200:
            data = r.json()
            choice = data["choices"][0]
            record = {"id": row.id, "text": choice.get("text") if "text" in choice
                      else (choice.get("message") or {}).get("content"),
                      "finish_reason": choice.get("finish_reason"), "usage": data.get("usage"),
                      "latency_s": round(time.monotonic() - started, 3), "attempts": attempts}
            if choice.get("logprobs") is not None:
                record["logprobs"] = choice["logprobs"]
            return record
        retryable = r.status_code in RETRY_STATUSES and attempts < s.max_attempts
        if r.status_code in TRANSIENT_STATUSES:
            transient += 1
            retryable = transient < s.max_transient_attempts
        if not retryable:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text[:500]
            return {"id": row.id, "error": {"status": r.status_code, "message": message}, "attempts": attempts}
        await asyncio.sleep(_delay(attempts, s, r.headers.get("retry-after")))


async def _run(rows: list[Row], s: Settings, out: Appender, summary: Summary, console: Console) -> None:
    headers = {"Authorization": f"Bearer {s.api_key}"} if s.api_key else {}
    limits = httpx.Limits(max_connections=s.concurrency, max_keepalive_connections=s.concurrency)
    queue: asyncio.Queue[Row] = asyncio.Queue()
    for row in rows:
        queue.put_nowait(row)
    started = time.monotonic()
    columns = [TextColumn("[bold]generate"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]} tok/s  {task.fields[failed]} failed"), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("rows", total=len(rows), rate="0", failed=0)

        async def worker(client):
            while True:
                try:
                    row = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                record = await _one(client, row, s)
                out.write(record)
                if "error" in record:
                    summary.failed += 1
                else:
                    summary.succeeded += 1
                    summary.completion_tokens += (record.get("usage") or {}).get("completion_tokens", 0)
                elapsed = time.monotonic() - started
                progress.update(task, advance=1, failed=summary.failed,
                                rate=f"{summary.completion_tokens / elapsed:.1f}" if elapsed else "0")

        async with httpx.AsyncClient(base_url=s.endpoint.rstrip("/"), headers=headers, limits=limits,
                                     timeout=s.timeout_s) as client:
            await asyncio.gather(*(worker(client) for _ in range(min(s.concurrency, len(rows)) or 1)))
    summary.wall_s = time.monotonic() - started


def check_endpoint(s: Settings) -> str:
    """Fail before starting if the endpoint cannot be reached; return the model to use."""
    headers = {"Authorization": f"Bearer {s.api_key}"} if s.api_key else {}
    try:
        r = httpx.get(f"{s.endpoint.rstrip('/')}/v1/models", headers=headers, timeout=10)
    except httpx.TransportError as err:
        raise UserError(f"--endpoint: {s.endpoint}: unreachable ({type(err).__name__}: {err})") from None
    if r.status_code == 401:
        raise UserError(f"--endpoint: {s.endpoint}: the API key was refused (set --api-key-env)")
    if r.status_code != 200:
        raise UserError(f"--endpoint: {s.endpoint}: /v1/models answered HTTP {r.status_code}")
    models = [m["id"] for m in r.json().get("data", [])]
    if s.model:
        if models and s.model not in models:
            raise UserError(f"--model: {s.model!r} is not served there (served: {', '.join(models)})")
        return s.model
    if not models:
        raise UserError(f"--endpoint: {s.endpoint}: serves no model")
    return models[0]


def generate(input_path: Path, output_path: Path, s: Settings, console: Console) -> Summary:
    rows, bad = read_rows(input_path)
    s.model = check_endpoint(s)
    already = done_ids(output_path)
    todo = [r for r in rows if r.id not in already]
    summary = Summary(rows=len(rows), skipped=len(rows) - len(todo), bad_rows=bad)
    for b in bad:
        console.print(f"[yellow]{input_path}:{b.line}: skipped: {b.reason}[/]")
    if summary.skipped:
        console.print(f"resuming: {summary.skipped} of {len(rows)} rows already in {output_path}")
    out = Appender(output_path)
    try:
        asyncio.run(_run(todo, s, out, summary, console))
    finally:
        out.close()
    return summary


# ------------------------------------------------------------------ CLI
def add_generate(sub) -> None:
    from runtime.cli import positive_int
    p = sub.add_parser("generate", help="batch generation from a JSONL file against an endpoint")
    p.add_argument("--endpoint", required=True)
    p.add_argument("--input", required=True, type=Path, help="JSONL: id + prompt or messages per line")
    p.add_argument("--output", required=True, type=Path, help="JSONL, appended; rerun to resume")
    p.add_argument("--model", help="served model name (default: the endpoint's first)")
    p.add_argument("--concurrency", type=positive_int, default=8)
    p.add_argument("--max-tokens", type=positive_int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--logprobs", type=int, choices=range(0, 21), metavar="N",
                   help="also record the top N logprobs per token (0..20)")
    p.add_argument("--api-key-env", help="environment variable holding the API key")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from runtime.serve import key_from_env
    key = key_from_env(args.api_key_env, "--api-key-env") if args.api_key_env else None
    console = Console(stderr=True)
    s = Settings(endpoint=args.endpoint, model=args.model, concurrency=args.concurrency,
                 max_tokens=args.max_tokens, temperature=args.temperature, logprobs=args.logprobs, api_key=key)
    summary = generate(args.input, args.output, s, console)
    result = {"rows": summary.rows, "skipped": summary.skipped, "succeeded": summary.succeeded,
              "failed": summary.failed, "bad_rows": [b.__dict__ for b in summary.bad_rows],
              "completion_tokens": summary.completion_tokens, "wall_s": round(summary.wall_s, 2),
              "tokens_per_s": round(summary.tokens_per_s, 1)}
    if args.json:
        print(json.dumps(result))
    else:
        console.print(f"{summary.succeeded} generated, {summary.failed} failed, {summary.skipped} already done, "
                      f"{len(summary.bad_rows)} bad rows; {summary.completion_tokens} tokens in "
                      f"{summary.wall_s:.1f}s ({summary.tokens_per_s:.1f} tok/s)")
    return 0 if summary.failed == 0 and not summary.bad_rows else 1
