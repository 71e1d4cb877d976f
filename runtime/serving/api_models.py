"""The OpenAI-compatible API's request bodies, as pydantic models: they validate every request at the
front (bounds that keep a bad request from ever reaching a rank) and describe it in /openapi.json, so
generated clients and schema-driven fuzzers can use the API. Response bodies are documented with the
`openai` package's own types.

Fields herd does not implement are refused with a 400 that names them (`refused_fields`), never
silently ignored: a client asking for tools or a JSON schema must not believe it got them.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Bounds. Seeds are 64-bit (torch generators take 64 bits; OpenAI documents an integer); stop strings
# are matched over a bounded tail of the text, so their number and length are bounded too.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 512
MAX_LOGIT_BIAS = 1024
MAX_TOP_LOGPROBS = 20
MAX_PROMPT_TOKEN_IDS = 1 << 20


class ApiModel(BaseModel):
    # Unknown fields are ignored (as vLLM does); OpenAI fields herd does not implement are refused
    # explicitly below. NaN and infinities are refused everywhere (Python's json accepts them).
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(ApiModel):
    include_usage: bool = False


class TextPart(ApiModel):
    type: Literal["text"]
    text: str


class ResponseFormat(ApiModel):
    type: str = Field(description="only 'text' is supported")


class SamplingFields(ApiModel):
    model: str = Field(description="the served model name (GET /v1/models)")
    max_tokens: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 (or below 1e-5) is greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = Field(
        None, description=f"up to {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters")
    seed: Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request (send several requests for more)")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, max_length=MAX_LOGIT_BIAS, description="token id (as a string) -> bias in -100..100")
    user: str | None = Field(None, description="accepted and not used")
    # vLLM-compatible extensions: generate past end-of-sequence; return the generated ids.
    ignore_eos: bool = False
    return_token_ids: bool = False

    @field_validator("stop")
    @classmethod
    def _stop_lengths(cls, value):
        for stop in [value] if isinstance(value, str) else value or []:
            if len(stop) > MAX_STOP_CHARS:
                raise ValueError(f"a stop string has {len(stop)} characters; at most {MAX_STOP_CHARS}")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, value):
        for key in value or {}:
            if not key.isdigit():
                raise ValueError(f"logit_bias key {key[:40]!r} is not a token id")
        return value

    def stop_strings(self) -> list[str]:
        return [s for s in ([self.stop] if isinstance(self.stop, str) else self.stop or []) if s]

    def bias_pairs(self) -> list[tuple[int, float]]:
        return [(int(k), float(v)) for k, v in (self.logit_bias or {}).items()]

    @property
    def top_n(self) -> int | None:
        """Alternatives to report per token (logprobs); None: no logprobs. Each body reads its own fields."""
        return None


class CompletionBody(SamplingFields):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] | \
        Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=MAX_PROMPT_TOKEN_IDS)] = Field(
        description="one prompt: text, a list with one text, or token ids")
    max_tokens: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = 16   # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = Field(False, description="not supported: must be false")
    suffix: str | None = Field(None, description="not supported")
    best_of: int | None = Field(None, ge=1, le=1, description="not supported beyond 1")

    @property
    def top_n(self) -> int | None:
        return self.logprobs

    def prompt_text(self) -> str | None:
        """The prompt's text (given alone or as a list of one); None when it is token ids."""
        if isinstance(self.prompt, str):
            return self.prompt
        first = self.prompt[0]
        return first if isinstance(first, str) else None

    def prompt_ids(self) -> list[int]:
        """The prompt's token ids (none for a text prompt)."""
        return [t for t in self.prompt if isinstance(t, int)] if isinstance(self.prompt, list) else []


class ChatMessage(ApiModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = Field("", description="text, or content parts of type 'text'")
    name: str | None = None


class ChatBody(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # Refused when set (see refused_fields); declared so the schema shows them.
    tools: list[dict[str, Any]] | None = Field(None, description="not supported by the built-in engine")
    tool_choice: str | dict[str, Any] | None = Field(None, description="not supported")
    parallel_tool_calls: bool | None = Field(None, description="not supported")
    functions: list[dict[str, Any]] | None = Field(None, description="not supported")
    function_call: str | dict[str, Any] | None = Field(None, description="not supported")
    response_format: ResponseFormat | None = Field(None, description="only {'type': 'text'}")
    modalities: list[str] | None = Field(None, description="only ['text']")

    @property
    def top_n(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# OpenAI fields that would change what the answer means; each one is refused when used.
REFUSED = {
    "tools": "tool calling is not supported by herd's built-in engine (serve with engine: vllm)",
    "tool_choice": "tool calling is not supported by herd's built-in engine (serve with engine: vllm)",
    "parallel_tool_calls": "tool calling is not supported by herd's built-in engine",
    "functions": "function calling is not supported by herd's built-in engine",
    "function_call": "function calling is not supported by herd's built-in engine",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "this is not a reasoning model",
    "web_search_options": "web search is not supported",
}


def refused_fields(raw: dict, body: SamplingFields) -> tuple[str, str] | None:
    """(field, why) for the first requested feature herd would otherwise have to ignore."""
    for name, why in REFUSED.items():
        if raw.get(name) not in (None, [], {}, False, "none"):
            return name, why
    if isinstance(body, ChatBody):
        if body.response_format is not None and body.response_format.type != "text":
            return "response_format", (f"type {body.response_format.type!r} is not supported "
                                       "(structured output needs engine: vllm); allowed: 'text'")
        if body.modalities not in (None, ["text"]):
            return "modalities", "only ['text'] is supported"
    if isinstance(body, CompletionBody):
        if body.echo:
            return "echo", "echo is not supported; allowed: false"
        if body.suffix:
            return "suffix", "suffix (insertion) is not supported"
    return None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


def error_responses(*codes: int) -> dict:
    """OpenAPI entries for the error statuses an endpoint answers, all with OpenAI's error body."""
    meaning = {400: "invalid request (the message names the field)", 401: "missing or wrong API key",
               404: "unknown model", 413: "request body too large", 422: "invalid request",
               429: "queue full", 500: "this request failed inside the engine",
               503: "engine not ready or lost (retry)"}
    return {code: {"model": ErrorBody, "description": meaning[code]} for code in codes}
