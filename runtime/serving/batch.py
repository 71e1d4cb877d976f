"""`herd generate`: batch generation against any OpenAI-compatible endpoint (synthetic data, teacher
outputs for distillation).

- N requests in flight (async HTTP); 429 and 503 are ridden out with exponential backoff and jitter
  (Retry-After respected), other transient errors retried a bounded number of times, and failures
  recorded as rows (`{"id", "error": {"status", "kind", "message"}, "attempts"}`), never stopping the job.
  kind "transient": HTTP 408, 409, 429, 5xx, or no answer at all (status null: refused, reset, timed
  out), including a restart that outlasted the backoff. kind "permanent": any other 4xx, or a 200 whose
  body is not a completion (not JSON, no choices, wrong types; status 200, the reason in the message).
- Resumable: ids already in the output are skipped, except rows whose failure was transient: those are
  sent again (and permanent failures too with --retry-failed), their failure rows dropped from the
  output first, so every id keeps one line. Every output row is one whole line appended with a single
  write and flushed, so a killed job loses at most the rows in flight, and a torn last line (the disk
  filled mid-write) is cut away on the next run.
- Exit status: 0 when every input row has a result in the output; 1 when some row failed (in this run
  or kept from an earlier one) or some input line was unusable; 2 for bad arguments or an endpoint
  that cannot be used, before anything is sent.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from runtime.errors import UserError
from runtime.serving.tls import Verify

OVERRIDES = ("max_tokens", "temperature", "top_p", "stop", "seed", "top_logprobs", "logprobs")
RETRY_STATUSES = {429, 503}          # the server says: later (a full queue, a rank restarting)
TRANSIENT_4XX = {408, 409}           # timeout, conflict: the same request may well succeed later
TRANSIENT, PERMANENT = "transient", "permanent"


def failure_kind(status: int | None) -> str:
    """Whether a failed request is worth sending again later; None means no HTTP answer came."""
    if status is None or status in RETRY_STATUSES or status in TRANSIENT_4XX or status >= 500:
        return TRANSIENT
    return PERMANENT


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
class Failure:
    """Why a row has no result; written into its output row."""
    status: int | None   # the HTTP status, None when no answer came
    kind: str            # TRANSIENT (retried on resume) or PERMANENT (only with --retry-failed)
    message: str

    @classmethod
    def of(cls, status: int | None, message: str) -> Failure:
        return cls(status, failure_kind(status), message)


class MalformedResponse(Exception):
    """A 200 whose body is not a completion."""


@dataclass
class Previous:
    """What earlier runs left in the output file."""
    done: set[str] = field(default_factory=set)    # ids with a result, or with a failure that stays
    retry: set[str] = field(default_factory=set)   # ids whose failure this run sends again
    kept: set[str] = field(default_factory=set)    # ids whose permanent failure stays (no --retry-failed)


@dataclass
class Settings:
    endpoint: str
    model: str | None = None
    concurrency: int = 8
    max_tokens: int = 256
    temperature: float = 0.0
    logprobs: int | None = None
    api_key: str | None = None
    verify: Verify = True            # httpx's verify: True (system trust) or a context pinning a CA
    max_attempts: int = 8            # for 429/503 phases
    max_transient_attempts: int = 4  # for connection errors and other 5xx
    backoff_s: float = 0.5
    backoff_max_s: float = 20.0
    timeout_s: float = 600.0


@dataclass
class Summary:
    rows: int = 0
    skipped: int = 0
    retried: int = 0          # rows that had failed in an earlier run, sent again
    kept_failed: int = 0      # rows whose earlier permanent failure was kept (see --retry-failed)
    succeeded: int = 0
    failed: int = 0
    failed_transient: int = 0
    failed_permanent: int = 0
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


def cut_torn_line(path: Path) -> None:
    """A last line without its newline was torn mid-write: cut it so appends start on a clean line."""
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        keep = size
        while keep > 0:  # back to the previous newline, a block at a time (no need to read the file)
            start = max(0, keep - 65536)
            f.seek(start)
            block = f.read(keep - start)
            at = block.rfind(b"\n")
            if at >= 0:
                keep = start + at + 1
                break
            keep = start
        f.truncate(keep)


def output_records(path: Path):
    """(line, parsed record or None) for every line of an output file."""
    with open(path, "rb") as f:
        for line in f:
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                record = None
            yield line, record if isinstance(record, dict) and "id" in record else None


def recorded_kind(record: dict) -> str | None:
    """None for a result; the failure's kind for a failure row (older rows carry no kind: derive it)."""
    error = record.get("error")
    if error is None:
        return None
    if isinstance(error, dict) and error.get("kind") in (TRANSIENT, PERMANENT):
        return error["kind"]
    status = error.get("status") if isinstance(error, dict) else None
    return failure_kind(status if isinstance(status, int) else None)


def previous_run(path: Path, retry_failed: bool) -> Previous:
    """Which ids are done and which failures this run sends again; a result for an id always wins."""
    if not path.exists():
        return Previous()
    cut_torn_line(path)
    results, failures = set(), {}
    for _, record in output_records(path):
        if record is None:
            continue
        kind, row_id = recorded_kind(record), str(record["id"])
        if kind is None:
            results.add(row_id)
        else:
            failures[row_id] = kind
    prev = Previous(done=set(results))
    for row_id, kind in failures.items():
        if row_id in results:
            continue
        if kind == TRANSIENT or retry_failed:
            prev.retry.add(row_id)
        else:
            prev.kept.add(row_id)
            prev.done.add(row_id)
    return prev


def drop_failures(path: Path, ids: set[str]) -> None:
    """Rewrite the output without the failure rows of `ids` (about to be sent again), so each id keeps
    one line. Written beside it and renamed over it: a kill mid-way leaves the old file or the new."""
    tmp = path.with_name(path.name + ".rewrite")
    with open(tmp, "wb") as out:
        for line, record in output_records(path):
            if record is not None and str(record["id"]) in ids and recorded_kind(record) is not None:
                continue
            out.write(line)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


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


def parse_completion(r: httpx.Response) -> dict:
    """The fields recorded from a 200; MalformedResponse when the body is not a completion."""
    try:
        data = r.json()
    except ValueError:
        raise MalformedResponse(f"body is not JSON: {r.text[:200]!r}") from None
    if not isinstance(data, dict):
        raise MalformedResponse(f"body is a JSON {type(data).__name__}, not an object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise MalformedResponse(f"no choices (choices: {str(choices)[:100]})")
    choice = choices[0]
    if "text" in choice:
        text = choice["text"]
        if not isinstance(text, str):
            raise MalformedResponse(f"choices[0].text is a {type(text).__name__}, not a string")
    elif isinstance(choice.get("message"), dict):
        text = choice["message"].get("content")
        if text is not None and not isinstance(text, str):  # null: a refusal or tool call, still an answer
            raise MalformedResponse(f"choices[0].message.content is a {type(text).__name__}, not a string")
    else:
        raise MalformedResponse("choices[0] has neither text nor a message object")
    finish = choice.get("finish_reason")
    if finish is not None and not isinstance(finish, str):
        raise MalformedResponse(f"choices[0].finish_reason is a {type(finish).__name__}, not a string")
    usage = data.get("usage")
    tokens = (usage.get("completion_tokens") or 0) if isinstance(usage, dict) else 0  # summed in the summary
    if (usage is not None and not isinstance(usage, dict)) or isinstance(tokens, bool) or not isinstance(tokens, int):
        raise MalformedResponse(f"usage is not an object with a whole completion_tokens: {str(usage)[:100]}")
    record = {"text": text, "finish_reason": finish, "usage": usage}
    if choice.get("logprobs") is not None:
        record["logprobs"] = choice["logprobs"]
    return record


def _error_message(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return r.text[:500]


def _failed(row: Row, failure: Failure, attempts: int) -> dict:
    return {"id": row.id, "error": asdict(failure), "attempts": attempts}


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
                return _failed(row, Failure.of(None, f"{type(err).__name__}: {err}"), attempts)
            await asyncio.sleep(_delay(transient, s, None))
            continue
        except httpx.RequestError as err:  # an undecodable body, a redirect loop: sending again won't help
            return _failed(row, Failure(None, PERMANENT, f"{type(err).__name__}: {err}"), attempts)
        if r.status_code == 200:
            try:
                fields = parse_completion(r)
            except MalformedResponse as err:
                return _failed(row, Failure(200, PERMANENT, f"malformed response: {err}"), attempts)
            return {"id": row.id, **fields, "latency_s": round(time.monotonic() - started, 3), "attempts": attempts}
        if r.status_code in RETRY_STATUSES:
            retryable = attempts < s.max_attempts
        elif failure_kind(r.status_code) == TRANSIENT:
            transient += 1
            retryable = transient < s.max_transient_attempts
        else:
            retryable = False
        if not retryable:
            return _failed(row, Failure.of(r.status_code, _error_message(r)), attempts)
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
                    if record["error"]["kind"] == TRANSIENT:
                        summary.failed_transient += 1
                    else:
                        summary.failed_permanent += 1
                else:
                    summary.succeeded += 1
                    summary.completion_tokens += (record.get("usage") or {}).get("completion_tokens") or 0
                elapsed = time.monotonic() - started
                progress.update(task, advance=1, failed=summary.failed,
                                rate=f"{summary.completion_tokens / elapsed:.1f}" if elapsed else "0")

        async with httpx.AsyncClient(base_url=s.endpoint.rstrip("/"), headers=headers, limits=limits,
                                     timeout=s.timeout_s, verify=s.verify) as client:
            await asyncio.gather(*(worker(client) for _ in range(min(s.concurrency, len(rows)) or 1)))
    summary.wall_s = time.monotonic() - started


def check_endpoint(s: Settings) -> str:
    """Fail before starting if the endpoint cannot be reached; return the model to use."""
    headers = {"Authorization": f"Bearer {s.api_key}"} if s.api_key else {}
    try:
        r = httpx.get(f"{s.endpoint.rstrip('/')}/v1/models", headers=headers, timeout=10, verify=s.verify)
    except httpx.TransportError as err:
        from runtime.serving.tls import verify_failure
        if (failed := verify_failure(err)) is not None:
            raise UserError(f"--endpoint: {s.endpoint}: its certificate is not trusted: {failed} (pass --ca-file "
                            "with the deployment CA that herd serve / herd up printed)") from None
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


def generate(input_path: Path, output_path: Path, s: Settings, console: Console,
             retry_failed: bool = False) -> Summary:
    rows, bad = read_rows(input_path)
    s.model = check_endpoint(s)
    prev = previous_run(output_path, retry_failed)
    todo = [r for r in rows if r.id not in prev.done]
    retry = {r.id for r in todo} & prev.retry
    summary = Summary(rows=len(rows), skipped=len(rows) - len(todo), retried=len(retry),
                      kept_failed=sum(r.id in prev.kept for r in rows), bad_rows=bad)
    for b in bad:
        console.print(f"[yellow]{input_path}:{b.line}: skipped: {b.reason}[/]")
    if summary.skipped:
        console.print(f"resuming: {summary.skipped} of {len(rows)} rows already in {output_path}")
    if summary.kept_failed:
        console.print(f"[yellow]{summary.kept_failed} rows failed permanently before and are kept "
                      f"(--retry-failed sends them again)[/]")
    if retry:
        console.print(f"retrying {len(retry)} rows that failed before")
        drop_failures(output_path, retry)
    out = Appender(output_path)
    try:
        asyncio.run(_run(todo, s, out, summary, console))
    finally:
        out.close()
    return summary


# ------------------------------------------------------------------ CLI
def add_generate(sub) -> None:
    from runtime.arg_types import positive_int
    p = sub.add_parser("generate", help="batch generation from a JSONL file against an endpoint",
                       epilog="exit status: 0 every row has a result; 1 some row failed or some input line "
                              "was unusable (rerun to retry transient failures); 2 bad arguments or endpoint")
    from runtime.serving.smoke import add_client_options
    add_client_options(p, "to send to")
    p.add_argument("--input", required=True, type=Path, help="JSONL: id + prompt or messages per line")
    p.add_argument("--output", required=True, type=Path, help="JSONL, appended; rerun to resume")
    p.add_argument("--model", help="served model name (default: the endpoint's first)")
    p.add_argument("--concurrency", type=positive_int, default=8)
    p.add_argument("--max-tokens", type=positive_int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--logprobs", type=int, choices=range(0, 21), metavar="N",
                   help="also record the top N logprobs per token (0..20)")
    p.add_argument("--api-key-env", help="environment variable holding the API key")
    p.add_argument("--retry-failed", action="store_true",
                   help="on resume, also send again the rows whose failure was permanent (4xx, malformed "
                        "answers); transient failures (429, 5xx, timeouts) are always sent again")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from runtime.serving.smoke import client_settings
    endpoint, verify, key = client_settings(args)
    console = Console(stderr=True)
    s = Settings(endpoint=endpoint, model=args.model, concurrency=args.concurrency, max_tokens=args.max_tokens,
                 temperature=args.temperature, logprobs=args.logprobs, api_key=key, verify=verify)
    summary = generate(args.input, args.output, s, console, retry_failed=args.retry_failed)
    result = {"rows": summary.rows, "skipped": summary.skipped, "retried": summary.retried,
              "kept_failed": summary.kept_failed, "succeeded": summary.succeeded, "failed": summary.failed,
              "failed_transient": summary.failed_transient, "failed_permanent": summary.failed_permanent,
              "bad_rows": [b.__dict__ for b in summary.bad_rows],
              "completion_tokens": summary.completion_tokens, "wall_s": round(summary.wall_s, 2),
              "tokens_per_s": round(summary.tokens_per_s, 1)}
    if args.json:
        print(json.dumps(result))
    else:
        console.print(f"{summary.succeeded} generated, {summary.failed} failed ({summary.failed_transient} "
                      f"transient), {summary.skipped} already done ({summary.kept_failed} failed before), "
                      f"{len(summary.bad_rows)} bad rows; {summary.completion_tokens} tokens in "
                      f"{summary.wall_s:.1f}s ({summary.tokens_per_s:.1f} tok/s)")
    return 0 if summary.failed == 0 and summary.kept_failed == 0 and not summary.bad_rows else 1
