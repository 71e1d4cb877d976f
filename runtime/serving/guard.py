"""A guard model at the front: every prompt (and, if asked, every answer) is screened by a Llama Guard
3-style model before it reaches the engine (or the client).

The guard is any OpenAI-compatible server (vLLM serving meta-llama/Llama-Guard-3-8B, typically) given
by serving.guard.url. herd sends it the conversation as chat messages and lets the guard model's own
chat template wrap them in Llama Guard's prompt (its task, categories and "assess the last message"
instruction), so herd never copies that prompt and follows whatever version the guard serves. The
answer is Llama Guard 3's format: a first line `safe` or `unsafe`, and for unsafe a second line of
comma-separated category codes (S1..S14).

A guard that cannot say (down, timed out, answered something else) fails closed by default: the request
is refused with 503 and the reason. With on_error: open it passes unscreened, logged and counted.
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from runtime.errors import UserError

if TYPE_CHECKING:
    from runtime.planning.spec import GuardSection
    from runtime.serving.metrics import Metrics

log = logging.getLogger("herd.guard")

# Llama Guard 3's hazard taxonomy (MLCommons), by the codes its answers use.
CATEGORIES = {
    "S1": "Violent Crimes", "S2": "Non-Violent Crimes", "S3": "Sex-Related Crimes",
    "S4": "Child Sexual Exploitation", "S5": "Defamation", "S6": "Specialized Advice", "S7": "Privacy",
    "S8": "Intellectual Property", "S9": "Indiscriminate Weapons", "S10": "Hate",
    "S11": "Suicide & Self-Harm", "S12": "Sexual Content", "S13": "Elections", "S14": "Code Interpreter Abuse",
}
# Metric label for a code outside that list (the label set stays bounded whatever the guard says).
OTHER_CATEGORY = "other"
# "unsafe\nS1,S2,...,S14" is about 45 tokens; the verdict itself is the first one or two. A category
# list cut short still decides (the first line says unsafe).
GUARD_MAX_TOKENS = 40
CHAT_PATH = "/v1/chat/completions"
_CODE = re.compile(r"S\d{1,2}")
# Llama Guard 3's answer format as a regular expression (vLLM's structured output holds a served guard
# to it): `safe`, or `unsafe`, a newline and comma-separated codes.
VERDICT_REGEX = r"safe|unsafe\nS([1-9]|1[0-4])(,S([1-9]|1[0-4]))*"


# ------------------------------------------------------------------ settings and verdicts
@dataclass(frozen=True)
class GuardSettings:
    url: str                     # the guard server's base URL, without /v1
    screen_prompts: bool
    screen_answers: bool
    fail_open: bool
    timeout_s: float
    model_name: str | None = None    # None: the first model the guard's /v1/models lists
    api_key: str | None = None
    # A guard herd serves is vLLM: its answer is held to Llama Guard's format by vLLM's structured
    # output, so a model's greedy answer is always a verdict (a guard served apart may be any server).
    constrain_format: bool = False
    # The health of the guard herd serves (its supervised vLLM), where it serves one.
    served_health: Callable[[], Any] | None = field(default=None, compare=False)

    @classmethod
    def from_section(cls, section: GuardSection, served_at: str | None = None) -> GuardSettings:
        """served_at: where herd serves the guard itself (serving.guard.model), else section.url."""
        url = served_at or section.url
        if url is None:   # the spec refuses this; the check keeps the type exact
            raise UserError("serving.guard.url: required")
        api_key = None
        if section.api_key_env:
            api_key = os.environ.get(section.api_key_env)
            if not api_key:
                raise UserError(f"serving.guard.api_key_env: ${section.api_key_env} is not set (the guard's API key)")
        name = section.served_model_name or (section.model if served_at else None)
        return cls(url=base_url(url), screen_prompts="prompt" in section.screen,
                   screen_answers="answer" in section.screen, fail_open=section.on_error == "open",
                   timeout_s=section.timeout_s, model_name=name, api_key=api_key,
                   constrain_format=served_at is not None)

    @property
    def screens(self) -> tuple[str, ...]:
        return tuple(s for s, on in (("prompt", self.screen_prompts), ("answer", self.screen_answers)) if on)

    @property
    def shown_url(self) -> str:
        """The guard's endpoint as logs, errors and /health show it: without any user:password@."""
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, netloc, parts.path, "", "")) + CHAT_PATH


def base_url(url: str) -> str:
    """serving.guard.url as written (http://h:8200, .../, or an OpenAI client's .../v1) to the base."""
    url = url.rstrip("/")
    return url.removesuffix("/v1")


def guard_settings(spec, served_at: str | None = None) -> GuardSettings | None:
    """The guard a deployment spec names, or None (no spec, or no serving.guard). served_at: the URL of
    the guard herd serves itself, when the spec names serving.guard.model."""
    section = spec.serving.guard if spec is not None else None
    return GuardSettings.from_section(section, served_at) if section is not None else None


@dataclass(frozen=True)
class Verdict:
    safe: bool
    categories: tuple[str, ...] = ()

    def named(self) -> str:
        """"S1 (Violent Crimes), S10 (Hate)": the codes a client can look up, with their meaning."""
        if not self.categories:
            return "no category given"
        return ", ".join(f"{c} ({CATEGORIES.get(c, 'not a Llama Guard 3 category')})" for c in self.categories)

    def labels(self) -> tuple[str, ...]:
        return tuple(c if c in CATEGORIES else OTHER_CATEGORY for c in self.categories)


class GuardFailed(Exception):
    """The guard gave no verdict: unreachable, timed out, an HTTP error, or an answer not in its format."""


def parse_verdict(text: str) -> Verdict:
    """Llama Guard 3's answer: `safe`, or `unsafe` then a line of codes. The first line decides; an
    unsafe verdict stays a flag whatever its second line holds (unknown codes are named as such), so
    that a guard with more categories than herd knows cannot turn a flag into an error that on_error:
    open would let through."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    first = lines[0].lower() if lines else ""
    if first == "safe" and len(lines) == 1:
        return Verdict(safe=True)
    if first == "unsafe":
        codes = _CODE.findall(lines[1].upper()) if len(lines) > 1 else []
        return Verdict(safe=False, categories=tuple(dict.fromkeys(codes)))
    raise GuardFailed(f"answered {text.strip()[:80]!r}, not a Llama Guard verdict (safe, or unsafe and "
                      "its categories)")


# ------------------------------------------------------------------ what the guard is shown
def guard_conversation(messages: Sequence[Mapping[str, object]]) -> list[dict[str, str]]:
    """Chat messages as Llama Guard's template takes them: user and assistant turns, alternating, from
    a user turn. System, developer and tool messages are written by the API's client as much as its user
    messages are, so they join the user turn they stand in (dropped, they would hide a request from
    the guard); consecutive turns of one role are joined likewise. User and assistant text is sent
    as it is: the guard's template does the formatting."""
    turns: list[dict[str, str]] = []
    for message in messages:
        role = "assistant" if message.get("role") == "assistant" else "user"
        text = str(message.get("content") or "")
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] = "\n\n".join(t for t in (turns[-1]["content"], text) if t)
        else:
            turns.append({"role": role, "content": text})
    if turns and turns[0]["role"] == "assistant":
        turns.insert(0, {"role": "user", "content": ""})
    return turns


def with_answer(messages: Sequence[Mapping[str, object]], answer: str) -> list[dict[str, str]]:
    """The conversation whose last (assistant) turn the guard assesses when it screens an answer."""
    return guard_conversation([*messages, {"role": "assistant", "content": answer}])


# ------------------------------------------------------------------ what the front answers instead
class GuardRefusal(Exception):
    """An OpenAI-shaped error the front answers in place of the engine's answer."""

    def __init__(self, status: int, message: str, kind: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param


def flagged(verdict: Verdict, what: str, param: str) -> GuardRefusal:
    return GuardRefusal(400, f"the {what} was flagged by the guard as unsafe: {verdict.named()}",
                        "invalid_request_error", "content_filter", param)


# ------------------------------------------------------------------ the guard's client
class Guard:
    """Screens conversations with the guard; shared by every request of one front."""

    def __init__(self, settings: GuardSettings, metrics: Metrics | None = None):
        self.settings = settings
        self.metrics = metrics
        headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        # No proxy from the environment: the guard is the deployment's own service, on its network.
        self._client = httpx.AsyncClient(base_url=settings.url, headers=headers, trust_env=False,
                                         timeout=httpx.Timeout(settings.timeout_s))
        self._model_name = settings.model_name
        self.last_error: str | None = None
        if metrics is not None:
            metrics.enable_guard(settings.screens, (*CATEGORIES, OTHER_CATEGORY))

    async def aclose(self) -> None:
        await self._client.aclose()

    def holding_back(self) -> str | None:
        """Why the front is not ready because of its guard, else None. Only a guard herd serves and that
        fails closed holds readiness back while it is not ready itself: every request would be refused
        (so a balancer takes this replica out, and herd up waits for it). A guard served apart is never
        probed: its state is what the requests find."""
        s = self.settings
        if s.served_health is None or s.fail_open:
            return None
        health = s.served_health()
        return None if health.ready else f"guard {s.model_name} not ready: {health.reason}"

    def health(self) -> dict:
        """For /health: where the guard is and how its latest screening went (a guard served apart is
        never probed: its state is what the requests found)."""
        s = self.settings
        return {"url": s.shown_url, "screen": list(s.screens), "on_error": "open" if s.fail_open else "closed",
                "last_error": self.last_error}

    async def screen_prompt(self, messages: Sequence[Mapping[str, object]], param: str) -> None:
        """Raises GuardRefusal: 400 content_filter when the prompt is flagged, 503 when the guard fails
        closed. Returns when the prompt may go to the engine."""
        verdict = await self.screen("prompt", guard_conversation(messages))
        if verdict is not None and not verdict.safe:
            raise flagged(verdict, "prompt", param)

    async def answer_verdict(self, messages: Sequence[Mapping[str, object]], answer: str) -> Verdict | None:
        """The verdict on an answer, None when it may go out unscreened (nothing to screen, or the guard
        failed open); raises GuardRefusal (503) when the guard fails closed."""
        if not answer.strip():
            return None
        return await self.screen("answer", with_answer(messages, answer))

    async def screen(self, what: str, conversation: list[dict[str, str]]) -> Verdict | None:
        started = time.monotonic()
        try:
            verdict = await asyncio.wait_for(self._ask(conversation), self.settings.timeout_s)
        except (GuardFailed, asyncio.TimeoutError, httpx.HTTPError) as err:
            reason = _reason(err, self.settings.timeout_s)
            self._count(what, started, "error")
            self._note(reason)
            if self.settings.fail_open:
                return None
            raise GuardRefusal(503, f"guard {self.settings.shown_url} {reason}; the request is refused "
                                    "(serving.guard.on_error: closed)", "service_unavailable",
                               "guard_unavailable") from None
        self._count(what, started, "safe" if verdict.safe else "unsafe", verdict.labels())
        self._note(None)
        return verdict

    async def _ask(self, conversation: list[dict[str, str]]) -> Verdict:
        # Greedy and short: the verdict is a few tokens, and the same conversation gets the same one.
        body: dict[str, object] = {"model": await self._name(), "messages": conversation, "temperature": 0,
                                   "max_tokens": GUARD_MAX_TOKENS}
        if self.settings.constrain_format:
            body["structured_outputs"] = {"regex": VERDICT_REGEX}
        response = await self._client.post(CHAT_PATH, json=body)
        return parse_verdict(_content(response))

    async def _name(self) -> str:
        """The guard's served model name: configured, or the first its /v1/models lists (asked once)."""
        if self._model_name is None:
            response = await self._client.get("/v1/models")
            try:
                self._model_name = str(_json(response)["data"][0]["id"])
            except (KeyError, IndexError, TypeError):
                raise GuardFailed("lists no model at /v1/models (set serving.guard.served_model_name)") from None
        return self._model_name

    def _count(self, what: str, started: float, outcome: str, categories: tuple[str, ...] = ()) -> None:
        if self.metrics is not None:
            self.metrics.guard_screened(what, time.monotonic() - started, outcome, categories)

    def _note(self, error: str | None) -> None:
        """Log when the guard starts or stops failing (every failure is counted; logging each one
        would flood the log at the request rate)."""
        if error is not None and self.last_error is None:
            action = "passing requests unscreened (on_error: open)" if self.settings.fail_open else \
                "refusing requests (on_error: closed)"
            log.warning("guard %s %s; %s", self.settings.shown_url, error, action)
        elif error is None and self.last_error is not None:
            log.info("guard %s answers again", self.settings.shown_url)
        self.last_error = error


def _json(response: httpx.Response) -> dict:
    if response.status_code != 200:
        first = response.text.strip().splitlines()[0][:120] if response.text.strip() else ""
        raise GuardFailed(f"answered HTTP {response.status_code}" + (f": {first}" if first else ""))
    try:
        data = response.json()
    except ValueError:
        raise GuardFailed("answered something that is not JSON") from None
    if not isinstance(data, dict):
        raise GuardFailed("answered JSON that is not an object")
    return data


def _content(response: httpx.Response) -> str:
    try:
        content = _json(response)["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise GuardFailed("answered without choices[0].message.content") from None
    if not isinstance(content, str):
        raise GuardFailed("answered a message without text")
    return content


def _reason(err: Exception, timeout_s: float) -> str:
    if isinstance(err, asyncio.TimeoutError | httpx.TimeoutException):
        return f"timed out after {timeout_s:g}s"
    if isinstance(err, httpx.HTTPError):
        return f"is unreachable ({type(err).__name__})"
    return str(err)
