"""The HTTP front on the head node: OpenAI-compatible API, honest health, Prometheus metrics.

It talks to a backend with the Supervisor's shape (health, generate, queue_depth), so another engine
plugs in behind the same API and the same readiness semantics.
"""
from __future__ import annotations

import hmac
import json
import time
import uuid
from dataclasses import dataclass

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from runtime.metrics import Metrics
from runtime.engine.request import GenerationRequest
from runtime.supervisor import EngineUnavailable, QueueFull
from runtime.text import Detokenizer, StopStrings, TextCodec


# ------------------------------------------------------------------ request bodies
class SamplingFields(BaseModel):
    # Clients send many optional OpenAI fields; unknown ones are ignored, as OpenAI's server does.
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    # vLLM-compatible extensions: generate past end-of-sequence; return the generated ids.
    ignore_eos: bool = False
    return_token_ids: bool = False


class CompletionBody(SamplingFields):
    prompt: str | list[str] | list[int]   # OpenAI also takes a prompt as token ids
    max_tokens: int | None = 16   # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=20)

    @property
    def top_n(self) -> int | None:
        return self.logprobs


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[dict] | None = ""


class ChatBody(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @property
    def top_n(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


@dataclass
class ServerConfig:
    served_model_name: str
    max_model_len: int
    api_key: str | None = None


def _text_of(content) -> str:
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        return "".join(part.get("text", "") for part in content if part.get("type") == "text")
    return content or ""


# ------------------------------------------------------------------ the front every engine shares
def _front(backend, cfg: ServerConfig, metrics: Metrics) -> FastAPI:
    """Errors, API key, health and metrics: the same whatever engine is behind."""
    app = FastAPI(title="herd", docs_url=None, redoc_url=None)
    app.state.metrics = metrics

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return err.response()

    @app.middleware("http")
    async def _auth_and_count(request: Request, call_next):
        path = request.url.path
        if cfg.api_key and not path.startswith("/health"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {cfg.api_key}".encode()):
                response = ApiError(401, "invalid or missing API key (Authorization: Bearer ...)",
                                    "authentication_error", code="invalid_api_key").response()
                metrics.request(path, 401)
                return response
        response = await call_next(request)
        if not path.startswith("/health"):
            metrics.request(path, response.status_code)
        return response

    def _health_body() -> dict:
        h = backend.health
        return {"status": "ready" if h.ready else "not_ready", "phase": h.phase, "reason": h.reason,
                "ranks_loaded": h.loaded, "world_size": h.world, "restarts": h.restarts,
                "last_canary_seconds": h.last_canary_s, "rank_loads": h.loads}

    @app.get("/health/live")
    async def live():
        return {"status": "live"}

    @app.get("/health/ready")
    @app.get("/health")
    async def ready():
        return JSONResponse(_health_body(), status_code=200 if backend.health.ready else 503)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(backend.queue_depth, backend.health.ready,
                                                getattr(backend, "batches", 0),
                                                getattr(backend, "batched_rows", 0)),
                                 media_type="text/plain; version=0.0.4")
    return app


def not_ready_error(reason: str) -> ApiError:
    return ApiError(503, f"engine not ready: {reason}", "service_unavailable", code="not_ready")


# ------------------------------------------------------------------ herd's own engine
def create_app(backend, codec: TextCodec, cfg: ServerConfig, metrics: Metrics | None = None) -> FastAPI:
    metrics = metrics or Metrics()
    app = _front(backend, cfg, metrics)

    # ---------------- OpenAI API
    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": cfg.served_model_name, "object": "model",
                                            "created": 0, "owned_by": "herd"}]}

    async def _body(request: Request, model: type[BaseModel]):
        try:
            data = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object")
        try:
            body = model.model_validate(data)
        except ValidationError as invalid:
            first = invalid.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            raise ApiError(400, f"{field}: {first['msg']}", param=field) from None
        if body.model != cfg.served_model_name:
            raise ApiError(404, f"model {body.model!r} does not exist; this server serves "
                                f"{cfg.served_model_name!r}", param="model", code="model_not_found")
        if body.stream and body.top_n is not None:
            raise ApiError(400, "logprobs: supported without stream only", param="logprobs")
        return body

    def _request(ids: list[int], body: SamplingFields, max_tokens: int | None) -> GenerationRequest:
        room = cfg.max_model_len - len(ids)
        if room < 1:
            raise ApiError(400, f"prompt is {len(ids)} tokens; this model's context is {cfg.max_model_len}",
                           param="messages" if isinstance(body, ChatBody) else "prompt",
                           code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = room
        if max_tokens < 1 or max_tokens > room:
            raise ApiError(400, f"max_tokens: {max_tokens} is outside 1..{room} (context "
                                f"{cfg.max_model_len} minus the {len(ids)}-token prompt)", param="max_tokens")
        return GenerationRequest(input_ids=ids, max_tokens=max_tokens, temperature=body.temperature,
                                 top_p=body.top_p, seed=body.seed,
                                 stop_token_ids=[] if body.ignore_eos else codec.eos_ids,
                                 logprobs=body.top_n)

    async def _start(req: GenerationRequest):
        """Submit and wait for the first event, so errors still get a proper status code."""
        events = backend.generate(req)
        try:
            first = await events.__anext__()
        except EngineUnavailable as err:
            raise not_ready_error(str(err)) from None
        except QueueFull as err:
            raise ApiError(429, f"server busy: {err}", "rate_limit_error", code="queue_full") from None
        except StopAsyncIteration:
            raise ApiError(503, "engine returned nothing", "service_unavailable") from None
        return first, events

    async def _texts(req: GenerationRequest, body: SamplingFields, first, events, ids=None):
        """Yield (text delta, finish_reason or None, completion_tokens); stop strings applied here."""
        stops = StopStrings([body.stop] if isinstance(body.stop, str) else body.stop or [])
        detok = Detokenizer(codec, skip=set(req.stop_token_ids))
        started, last, count = time.monotonic(), None, 0
        metrics.prompt_tokens += len(req.input_ids)

        async def all_events():
            yield first
            async for e in events:
                yield e
        try:
            async for event in all_events():
                if event.kind == "token":
                    now = time.monotonic()
                    (metrics.ttft.observe(now - started) if last is None else metrics.per_token.observe(now - last))
                    last, count = now, count + 1
                    if ids is not None:
                        ids.append(event)
                    metrics.tokens_generated += 1
                    out, hit = stops.feed(detok.add(event.token))
                    if hit:
                        yield out, "stop", count
                        return  # closing `events` cancels the rest on the engine
                    if out:
                        yield out, None, count
                else:
                    out, _ = stops.feed("", final=True)
                    yield out, event.finish_reason, count
                    return
        finally:
            await events.aclose()

    def _logprobs_body(events, chat: bool) -> dict:
        def piece(token_id: int) -> str:
            return codec.tokenizer.decode([token_id])
        if chat:
            return {"content": [{
                "token": piece(e.token), "logprob": e.logprob, "bytes": list(piece(e.token).encode()),
                "top_logprobs": [{"token": piece(t), "logprob": lp, "bytes": list(piece(t).encode())}
                                 for t, lp in e.top or []]} for e in events]}
        offsets, at = [], 0
        for e in events:
            offsets.append(at)
            at += len(piece(e.token))
        def top(pairs) -> dict:
            # Keyed by text, as OpenAI's format is; ids that decode alike keep the best (first) one.
            out: dict[str, float] = {}
            for t, lp in pairs or []:
                out.setdefault(piece(t), lp)
            return out
        return {"tokens": [piece(e.token) for e in events], "token_logprobs": [e.logprob for e in events],
                "top_logprobs": [top(e.top) for e in events], "text_offset": offsets}

    def _usage(prompt: int, completion: int) -> dict:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def _respond(body: SamplingFields, req: GenerationRequest, chat: bool):
        first, events = await _start(req)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        if not body.stream:
            parts, reason, count, ids = [], None, 0, []
            try:
                async for text, finish, count in _texts(req, body, first, events, ids):
                    parts.append(text)
                    reason = finish or reason
            except EngineUnavailable as err:
                raise ApiError(503, f"generation failed: {err}", "service_unavailable", code="engine_lost") from None
            text = "".join(parts)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
                      if chat else {"index": 0, "text": text, "finish_reason": reason, "logprobs": None})
            if body.return_token_ids:
                choice["token_ids"] = [e.token for e in ids]
            if body.top_n is not None:
                choice["logprobs"] = _logprobs_body([e for e in ids if e.token not in req.stop_token_ids], chat)
            return {"id": rid, "object": obj, "created": created, "model": cfg.served_model_name,
                    "choices": [choice], "usage": _usage(len(req.input_ids), count)}

        include_usage = bool((body.stream_options or {}).get("include_usage"))

        def chunk(text: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            data = {"id": rid, "object": obj + ".chunk" if chat else obj, "created": created,
                    "model": cfg.served_model_name, "choices": [choice]}
            return f"data: {json.dumps(data)}\n\n"

        async def sse():
            count = 0
            if chat:
                yield chunk(None, None, role=True)
            try:
                async for text, finish, count in _texts(req, body, first, events):
                    if text or finish:
                        yield chunk(text, finish)
            except EngineUnavailable as err:
                error = {"message": f"generation failed: {err}", "type": "service_unavailable",
                         "param": None, "code": "engine_lost"}
                yield f"data: {json.dumps({'error': error})}\n\n"
                return
            if include_usage:
                usage = {"id": rid, "object": obj + ".chunk" if chat else obj, "created": created,
                         "model": cfg.served_model_name, "choices": [],
                         "usage": _usage(len(req.input_ids), count)}
                yield f"data: {json.dumps(usage)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _body(request, CompletionBody)
        if isinstance(body.prompt, list) and body.prompt and all(isinstance(t, int) for t in body.prompt):
            vocab = len(codec.tokenizer)
            if any(not 0 <= t < vocab for t in body.prompt):
                raise ApiError(400, f"prompt: token ids must lie in 0..{vocab - 1}", param="prompt")
            ids = list(body.prompt)
        else:
            prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
            if len(prompts) != 1:
                raise ApiError(400, "prompt: exactly one prompt per request", param="prompt")
            ids = codec.encode(prompts[0])
        return await _respond(body, _request(ids, body, body.max_tokens), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _body(request, ChatBody)
        messages = [{"role": m.role, "content": _text_of(m.content)} for m in body.messages]
        try:
            ids = codec.encode_chat(messages)
        except Exception as err:  # the model's template rejects the conversation (roles, order)
            raise ApiError(400, f"messages: {err}", param="messages") from None
        return await _respond(body, _request(ids, body, body.max_completion_tokens or body.max_tokens), chat=True)

    return app


# ------------------------------------------------------------------ an engine in its own process
def create_proxy_app(engine, cfg: ServerConfig, metrics: Metrics | None = None) -> FastAPI:
    """herd's front before an external engine (vLLM): same health, metrics and key; /v1 forwarded."""
    from fastapi.responses import Response

    from runtime.engine.external import EngineLost
    app = _front(engine, cfg, metrics or Metrics())
    passed_headers = ("content-type", "accept", "authorization")

    @app.api_route("/v1/{path:path}", methods=["GET", "POST"])
    async def forward(path: str, request: Request):
        if not engine.health.ready:
            raise not_ready_error(engine.health.reason)
        headers = {k: v for k, v in request.headers.items() if k.lower() in passed_headers}
        try:
            status, out_headers, chunks = await engine.forward(request.method, f"/v1/{path}", headers,
                                                               await request.body())
        except httpx.TransportError as err:
            raise ApiError(503, f"engine unreachable ({type(err).__name__})", "service_unavailable",
                           code="engine_lost") from None
        media = out_headers.get("content-type", "application/json")
        if not media.startswith("text/event-stream"):
            try:
                data = b"".join([c async for c in chunks])
            except EngineLost as err:
                raise ApiError(503, f"generation failed: {err}", "service_unavailable", code="engine_lost") from None
            return Response(data, status_code=status, media_type=media)

        async def relay():
            try:
                async for chunk in chunks:
                    yield chunk
            except EngineLost as err:
                error = {"message": f"generation failed: {err}", "type": "service_unavailable",
                         "param": None, "code": "engine_lost"}
                yield f"data: {json.dumps({'error': error})}\n\n".encode()
        return StreamingResponse(relay(), status_code=status, media_type=media)

    return app
