"""The guard in front of an external engine (vLLM): what a forwarded body asks, and what its answer says.

herd's front forwards /v1 bodies to the engine as bytes; with a guard it reads them first. Only the two
generation endpoints can be screened, and only text can: any other POST, a batch of prompts, token ids,
prompt embeddings and non-text content parts are refused with a 400 that says so, rather than passed
unscreened (a guard that some requests walk around is no guard).

Answers are screened per choice (vLLM answers `n` of them): a flagged choice keeps its place, its text
is withheld (content null, no logprobs or token ids) and its finish_reason becomes content_filter.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from runtime.serving.guard import Guard, GuardRefusal

SCREENED_PATHS = {"/v1/chat/completions": True, "/v1/completions": False}   # path -> chat
# Fields that carry a choice's text to the client besides its content.
_EXTRA_TEXT_FIELDS = ("reasoning_content", "reasoning")
_WITHHELD_FIELDS = ("logprobs", "token_ids", *_EXTRA_TEXT_FIELDS, "tool_calls", "function_call", "refusal")


@dataclass(frozen=True)
class ScreenedRequest:
    chat: bool
    messages: list[dict[str, str]]   # what the guard sees (a completion's prompt as one user message)
    param: str                       # the field a refusal names
    stream: bool


def _refused(message: str, param: str | None = None) -> GuardRefusal:
    return GuardRefusal(400, message, "invalid_request_error", "guard_unscreenable", param)


def screened_request(method: str, path: str, body: bytes) -> ScreenedRequest | None:
    """What a forwarded request asks the engine, for the guard; None for a GET (models), which
    generates nothing. Raises GuardRefusal for what the guard cannot screen."""
    if method != "POST":
        return None
    if path not in SCREENED_PATHS:
        raise _refused(f"{path}: not served while serving.guard screens this endpoint (screened: "
                       f"{', '.join(SCREENED_PATHS)})")
    try:
        data = json.loads(body)
    except ValueError:
        raise _refused("request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise _refused("request body must be a JSON object")
    chat = SCREENED_PATHS[path]
    messages = _chat_messages(data) if chat else [{"role": "user", "content": _prompt_text(data)}]
    return ScreenedRequest(chat=chat, messages=messages, param="messages" if chat else "prompt",
                           stream=bool(data.get("stream")))


def _chat_messages(data: dict) -> list[dict[str, str]]:
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _refused("messages: required, a list of chat messages", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _refused(f"messages.{i}: must be an object", "messages")
        out.append({"role": str(message.get("role")), "content": _text_of(message.get("content"), f"messages.{i}")})
    return out


def _text_of(content: Any, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise _refused(f"{where}.content: must be text or a list of content parts", "messages")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise _refused(f"{where}.content: a {kind or 'malformed'!s} part cannot be screened by "
                           "serving.guard (text parts only)", "messages")
        texts.append(part["text"])
    return "".join(texts)


def _prompt_text(data: dict) -> str:
    if data.get("prompt_embeds") is not None:
        raise _refused("prompt_embeds: cannot be screened by serving.guard; send the prompt as text", "prompt")
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _refused("prompt: serving.guard screens one text prompt per request (not token ids nor a "
                       "batch of prompts)", "prompt")
    return prompt


# ------------------------------------------------------------------ answers
def choice_text(choice: dict, chat: bool, key: str) -> str:
    """The text a choice (or a streamed chunk of one, key="delta") gives the client."""
    if not chat:
        return str(choice.get("text") or "")
    message = choice.get(key)
    if not isinstance(message, dict):
        return ""
    parts = [message.get("content"), *(message.get(f) for f in _EXTRA_TEXT_FIELDS)]
    for call in message.get("tool_calls") or []:
        function = call.get("function") if isinstance(call, dict) else None
        parts.append(function.get("arguments") if isinstance(function, dict) else None)
    return "".join(p for p in parts if isinstance(p, str))


def withhold(choice: dict, chat: bool, key: str) -> dict:
    """The choice with its text withheld and finish_reason content_filter (where it had one)."""
    out = {k: v for k, v in choice.items() if k not in _WITHHELD_FIELDS}
    if chat:
        given = choice.get(key)
        message: dict = given if isinstance(given, dict) else {}
        if key == "message":
            out[key] = {"role": message.get("role", "assistant"), "content": None}
        else:   # a streamed chunk keeps only its role (the first chunk names it)
            out[key] = {"role": message["role"]} if "role" in message else {}
    else:
        out["text"] = ""
    out["logprobs"] = None
    if key == "message" or choice.get("finish_reason") is not None:
        out["finish_reason"] = "content_filter"
    return out


async def flagged_choices(guard: Guard, request: ScreenedRequest, texts: dict[int, str]) -> set[int]:
    """The indices of the choices the guard flags, screened together (one call per choice)."""
    indices = list(texts)
    verdicts = await asyncio.gather(*(guard.answer_verdict(request.messages, texts[i]) for i in indices))
    return {i for i, v in zip(indices, verdicts) if v is not None and not v.safe}


async def screen_json_answer(guard: Guard, request: ScreenedRequest, data: bytes) -> bytes:
    """A non-streamed answer, with flagged choices withheld; relayed as it is when nothing is flagged."""
    try:
        answer = json.loads(data)
    except ValueError:
        raise _unreadable() from None
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not isinstance(choices, list):
        raise _unreadable()
    texts = {_index(c, n): choice_text(c, request.chat, "message") for n, c in enumerate(choices)
             if isinstance(c, dict)}
    flagged = await flagged_choices(guard, request, texts)
    if not flagged:
        return data
    answer["choices"] = [withhold(c, request.chat, "message") if isinstance(c, dict) and _index(c, n) in flagged
                         else c for n, c in enumerate(choices)]
    return json.dumps(answer).encode()


def _unreadable() -> GuardRefusal:
    return GuardRefusal(502, "the engine's answer is not the JSON the guard can screen; withheld",
                        "server_error", "guard_unscreenable")


def _index(choice: dict, position: int) -> int:
    index = choice.get("index")
    return index if isinstance(index, int) else position


# ------------------------------------------------------------------ streamed answers
@dataclass
class SseEvent:
    raw: bytes
    data: dict | None        # the JSON of a `data:` event, None for [DONE], comments and the like


def sse_events(body: bytes) -> list[SseEvent]:
    events = []
    for raw in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        if not raw.strip():
            continue
        payload = b"\n".join(line[5:].strip() for line in raw.split(b"\n") if line.startswith(b"data:"))
        try:
            data = json.loads(payload) if payload and payload != b"[DONE]" else None
        except ValueError:
            data = None
        events.append(SseEvent(raw + b"\n\n", data if isinstance(data, dict) else None))
    return events


def streamed_texts(events: list[SseEvent], chat: bool) -> dict[int, str]:
    texts: dict[int, str] = {}
    for event in events:
        for n, choice in enumerate((event.data or {}).get("choices") or []):
            if isinstance(choice, dict):
                i = _index(choice, n)
                texts[i] = texts.get(i, "") + choice_text(choice, chat, "delta")
    return texts


def withhold_stream(events: list[SseEvent], flagged: set[int], chat: bool) -> bytes:
    """The stream again, each flagged choice's chunks emptied (a chunk left with nothing to say is
    dropped) and its last chunk's finish_reason content_filter."""
    out = []
    for event in events:
        choices = (event.data or {}).get("choices")
        if not isinstance(choices, list) or not any(isinstance(c, dict) and _index(c, n) in flagged
                                                    for n, c in enumerate(choices)):
            out.append(event.raw)
            continue
        kept = []
        for n, choice in enumerate(choices):
            if not (isinstance(choice, dict) and _index(choice, n) in flagged):
                kept.append(choice)
                continue
            emptied = withhold(choice, chat, "delta")
            if emptied.get("finish_reason") is not None or (chat and emptied["delta"]):
                kept.append(emptied)
        if kept or (event.data or {}).get("usage"):
            out.append(f"data: {json.dumps({**(event.data or {}), 'choices': kept})}\n\n".encode())
    return b"".join(out)


async def screen_stream(guard: Guard, request: ScreenedRequest, body: bytes) -> bytes:
    """A streamed answer, held back until complete (see create_proxy_app), then relayed: as it came
    when no choice is flagged, with the flagged ones withheld otherwise."""
    events = sse_events(body)
    flagged = await flagged_choices(guard, request, streamed_texts(events, request.chat))
    return body if not flagged else withhold_stream(events, flagged, request.chat)
