"""`herd smoke`: prove an endpoint can generate, not just that it answers /health.

Waits for readiness (showing what it waits for), then sends real prompts through the OpenAI API:
a factual question with a known answer, a Korean prompt, a multi-turn chat and a streamed completion.
Reports time to first token and tokens/s; exits 0 only when every check passed.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import httpx
from rich.console import Console
from rich.table import Table

from runtime.errors import UserError
from runtime.serving.tls import Verify


@dataclass
class Check:
    name: str
    passed: bool
    detail: str
    answer: str = ""
    ttft_s: float | None = None
    tokens_per_s: float | None = None


@dataclass
class SmokeReport:
    endpoint: str
    model: str = ""
    passed: bool = False
    ready_after_s: float = 0.0
    checks: list[Check] = field(default_factory=list)


def add_client_options(p, what: str) -> None:
    """The deployment, endpoint and trust options every client command shares (smoke, generate)."""
    p.add_argument("environment", nargs="?", help="environments/NAME.yaml: its endpoint (local, on-prem), "
                                                  "API key and CA are the defaults")
    p.add_argument("--endpoint", help=f"base URL {what}, e.g. https://10.0.0.11:8000 (default: from the "
                                      "environment, local and on-prem targets)")
    p.add_argument("--ca-file", help="CA certificate (PEM) to trust, and only it, for an https:// endpoint "
                                     "(default: the deployment CA in the environment's state; else the "
                                     "system's trust store)")


def client_settings(args) -> tuple[str, Verify, str | None]:
    """(endpoint, httpx verify, API key) from a client command's options and, where given, its
    environment file: flags first, then the spec and the deployment's state."""
    from runtime.serving import tls
    from runtime.api_keys import key_from_env, read_api_key
    spec = None
    if args.environment:
        from runtime.planning.spec import load_spec
        spec = load_spec(args.environment)
    endpoint = args.endpoint or (tls.endpoint_for(spec) if spec else None)
    if not endpoint:
        why = (f" (target {spec.target!r}: its address is the stack output `endpoint`, see herd status)"
               if spec else " (or give the environment file)")
        raise UserError(f"--endpoint: required{why}")
    if not endpoint.lower().startswith(("http://", "https://")):
        raise UserError(f"--endpoint: {endpoint!r}: not a URL (allowed: http://HOST:PORT on loopback, "
                        "https://HOST:PORT)")
    ca = args.ca_file or (tls.client_ca(spec) if spec and endpoint.lower().startswith("https://") else None)
    verify = tls.client_verify(ca, endpoint, "--ca-file" if args.ca_file else "deployment CA")
    if args.api_key_env:
        key = key_from_env(args.api_key_env, "--api-key-env")
    else:
        key = read_api_key(spec.serving.api_key_env, spec.serving.api_key_file) if spec else None
    return endpoint, verify, key


def add_smoke(sub) -> None:
    p = sub.add_parser("smoke", help="send real prompts to an endpoint and check the answers")
    add_client_options(p, "to smoke")
    p.add_argument("--api-key-env", help="environment variable holding the API key")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for readiness")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_smoke)


def cmd_smoke(args) -> int:
    endpoint, verify, key = client_settings(args)
    console = Console(stderr=args.json)
    report = run_smoke(endpoint, key, args.timeout, console, verify=verify)
    if args.json:
        print(json.dumps(asdict(report), indent=2))
    else:
        render(report, console)
    return 0 if report.passed else 1


class ServerExited(Exception):
    """The server process being waited for is gone."""


def wait_ready(client: httpx.Client, timeout: float, console: Console, exited=None) -> float:
    """Poll /health/ready, showing what is being waited for. `exited()`, when given, says whether the
    server process has died (then waiting is pointless)."""
    started = time.monotonic()
    reason = "connecting"
    with console.status(f"waiting for readiness: {reason}") as status:
        while True:
            if exited is not None and exited():
                raise ServerExited("the server exited while starting")
            try:
                r = client.get("/health/ready", timeout=5)
                if r.status_code == 200:
                    return time.monotonic() - started
                reason = r.json().get("reason", f"HTTP {r.status_code}")
                if r.json().get("phase") == "failed":
                    raise UserError(f"endpoint gave up: {reason}")
            except httpx.TransportError as err:
                # A certificate that does not verify will not start verifying: say so now, not at the timeout.
                from runtime.serving.tls import verify_failure
                if (failed := verify_failure(err)) is not None:
                    raise UserError(f"TLS: the endpoint's certificate is not trusted: {failed} (pass "
                                    "--ca-file with the deployment CA that herd serve / herd up printed)")
                reason = f"not answering yet ({type(err).__name__})"
            except ValueError:
                reason = f"HTTP {r.status_code} without a JSON body"
            elapsed = time.monotonic() - started
            if elapsed > timeout:
                raise TimeoutError(f"not ready after {timeout:.0f}s: {reason}")
            status.update(f"waiting for readiness ({elapsed:.0f}s): {reason}")
            time.sleep(0.5)


def _chat(client, model, messages, max_tokens=48) -> tuple[str, float]:
    started = time.monotonic()
    r = client.post("/v1/chat/completions", json={"model": model, "messages": messages,
                                                   "max_tokens": max_tokens, "temperature": 0})
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"] or "", time.monotonic() - started


def _streamed(client, model, prompt, max_tokens=32) -> tuple[str, float | None, float | None]:
    started, first, pieces, chunks = time.monotonic(), None, [], 0
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    tokens = 0
    with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                raise RuntimeError(data["error"]["message"])
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
            for choice in data.get("choices", []):
                if choice.get("text"):
                    first = first or time.monotonic()
                    pieces.append(choice["text"])
                    chunks += 1
    total = time.monotonic() - started
    ttft = first - started if first else None
    rate = (tokens - 1) / (total - ttft) if ttft is not None and tokens > 1 and total > ttft else None
    return "".join(pieces), ttft, rate


def run_smoke(endpoint: str, api_key: str | None, timeout: float, console: Console,
              verify: Verify = True) -> SmokeReport:
    """`verify`: httpx's, e.g. runtime.serving.tls.client_verify(ca_file) to trust a deployment CA only."""
    report = SmokeReport(endpoint=endpoint)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=endpoint.rstrip("/"), headers=headers, timeout=120, verify=verify) as client:
        try:
            report.ready_after_s = wait_ready(client, timeout, console)
        except (TimeoutError, UserError) as err:
            report.checks.append(Check("ready", False, str(err)))
            return report
        report.checks.append(Check("ready", True, f"ready after {report.ready_after_s:.1f}s"))
        models = client.get("/v1/models")
        if models.status_code != 200:
            report.checks.append(Check("models", False, f"/v1/models: HTTP {models.status_code}"))
            return report
        report.model = models.json()["data"][0]["id"]

        def attempt(name, fn):
            try:
                report.checks.append(fn())
            except (httpx.HTTPError, RuntimeError, KeyError, ValueError) as err:
                report.checks.append(Check(name, False, f"{type(err).__name__}: {err}"))

        def factual():
            answer, took = _chat(client, report.model, [{"role": "user", "content": "What is the capital of France?"}])
            ok = "paris" in answer.lower()
            return Check("factual", ok, "mentions Paris" if ok else "expected 'Paris' in the answer",
                         answer, ttft_s=took)

        def korean():
            answer, took = _chat(client, report.model, [{"role": "user", "content": "안녕하세요! 한국의 수도는 어디인가요?"}])
            ok = bool(answer.strip())
            return Check("korean", ok, "non-empty answer" if ok else "empty answer", answer, ttft_s=took)

        def chat():
            answer, took = _chat(client, report.model, [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Name a primary colour."},
                {"role": "assistant", "content": "Red."},
                {"role": "user", "content": "Name another one."}])
            ok = bool(answer.strip())
            return Check("chat", ok, "non-empty multi-turn answer" if ok else "empty answer", answer, ttft_s=took)

        def streamed():
            text, ttft, rate = _streamed(client, report.model, "The three primary colours are")
            ok = bool(text.strip())
            detail = f"streamed {len(text)} chars" if ok else "stream produced no text"
            return Check("stream", ok, detail, text, ttft_s=ttft, tokens_per_s=rate)

        for name, fn in (("factual", factual), ("korean", korean), ("chat", chat), ("stream", streamed)):
            attempt(name, fn)
    report.passed = all(c.passed for c in report.checks)
    return report


def render(report: SmokeReport, console: Console) -> None:
    table = Table("check", "result", "detail", "answer", "TTFT / latency", "tok/s",
                  title=f"smoke: {report.endpoint} ({report.model})")
    for c in report.checks:
        table.add_row(c.name, "[green]pass[/]" if c.passed else "[red]FAIL[/]", c.detail,
                      (c.answer[:60] + "...") if len(c.answer) > 60 else c.answer,
                      f"{c.ttft_s:.2f}s" if c.ttft_s is not None else "",
                      f"{c.tokens_per_s:.1f}" if c.tokens_per_s else "")
    console.print(table)
    console.print("[bold green]smoke passed[/]" if report.passed else "[bold red]smoke FAILED[/]")
