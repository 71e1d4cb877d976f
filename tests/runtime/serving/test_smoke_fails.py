"""`herd smoke` fails when an endpoint answers wrongly, and says which check failed.

The endpoint is a stand-in OpenAI-compatible server: a real HTTP server on loopback, in a thread of the
test process (/health/ready, /v1/models, /v1/chat/completions, streamed /v1/completions), told per test
what to answer to each of smoke's prompts. `herd smoke` is the real CLI in a child process. The same
stand-in answering rightly passes, so each test can fail both ways. (Against the real model, smoke runs
in tests/provisioning/test_up_local.py and tests/runtime/serving/test_tls.py.)
"""
from __future__ import annotations

import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import run_herd

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]   # a `herd smoke` process each: ~2 s apiece

GENERATION_CHECKS = {"factual", "korean", "chat", "stream"}
JSON = "application/json"
SSE = "text/event-stream"


# ------------------------------------------------------------------ the stand-in server
def chat_body(content) -> bytes:
    return json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "stand-in",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                    "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}).encode()


def event(data) -> str:
    return f"data: {json.dumps(data)}\n\n"


def sse_body(pieces, done: bool = True) -> bytes:
    """A streamed completion as an OpenAI server sends it: a chunk per piece, usage, then [DONE]."""
    chunks = [event({"id": "x", "object": "text_completion", "model": "stand-in",
                     "choices": [{"index": 0, "text": p, "finish_reason": None}]}) for p in pieces]
    chunks.append(event({"id": "x", "object": "text_completion", "model": "stand-in", "choices": [],
                         "usage": {"prompt_tokens": 6, "completion_tokens": len(pieces),
                                   "total_tokens": 6 + len(pieces)}}))
    return ("".join(chunks) + ("data: [DONE]\n\n" if done else "")).encode()


def reply(body: bytes, media: str = JSON, status: int = 200) -> tuple[int, str, bytes]:
    return status, media, body


# What a model that gets every prompt right answers (SmolLM2's own answers are in smoke.py's comments).
RIGHT = {
    "factual": reply(chat_body("The capital of France is Paris.")),
    "korean": reply(chat_body("한국의 수도는 서울입니다.")),
    "chat": reply(chat_body("Blue.")),
    "stream": reply(sse_body([" red", ",", " yellow", " and", " blue", "."]), SSE),
}


def prompt_kind(path: str, body: dict) -> str:
    """Which of smoke's prompts this request is, from its content (not from smoke's constants)."""
    if path == "/v1/completions":
        return "stream"
    last = body["messages"][-1]["content"]
    if any("\uac00" <= ch <= "\ud7a3" for ch in last):
        return "korean"
    return "factual" if "France" in last else "chat"


class StandIn:
    """An OpenAI-compatible server whose answers the test sets: `answers[kind]` = (status, media, body)."""

    def __init__(self):
        self.answers = dict(RIGHT)
        self.models = reply(json.dumps({"object": "list", "data": [{"id": "stand-in", "object": "model"}]}).encode())
        self.seen: list[tuple[str, dict]] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def send(self, status: int, media: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", media)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/health/ready":
                    self.send(*reply(b'{"status": "ready", "phase": "ready", "reason": "ready"}'))
                elif self.path == "/v1/models":
                    self.send(*stand_in.models)
                else:
                    self.send(*reply(b'{"error": {"message": "not found"}}', status=404))

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                kind = prompt_kind(self.path, body)
                stand_in.seen.append((kind, body))
                self.send(*stand_in.answers[kind])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> StandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stand_in():
    with StandIn() as server:
        yield server


def smoke(stand_in: StandIn) -> tuple[int, dict]:
    """`herd smoke --json` against the stand-in: exit status and the report."""
    done = run_herd("smoke", "--endpoint", stand_in.url, "--json", "--timeout", "10", timeout=60)
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


def failed(report: dict) -> dict[str, str]:
    """The failing checks, by name, with what each said."""
    return {c["name"]: c["detail"] for c in report["checks"] if not c["passed"]}


# ------------------------------------------------------------------ tests
def test_right_answers_pass(stand_in):
    code, report = smoke(stand_in)
    assert code == 0 and report["passed"] and failed(report) == {}, report
    assert [c["name"] for c in report["checks"]] == ["ready", "factual", "korean", "chat", "stream"]
    assert report["model"] == "stand-in"
    details = {c["name"]: c["detail"] for c in report["checks"]}
    assert details["korean"] == "in Korean (100% Hangul), names 서울"
    assert details["chat"] == "follows on from red: names blue"
    assert details["stream"] == "6 chunks then [DONE]; names red, yellow, blue"
    # Every prompt was sent greedy, the multi-turn one with the turn before it.
    assert sorted(kind for kind, _ in stand_in.seen) == sorted(GENERATION_CHECKS)
    assert all(body["temperature"] == 0 for _, body in stand_in.seen)
    chat = next(body for kind, body in stand_in.seen if kind == "chat")
    assert [m["content"] for m in chat["messages"][1:]] == ["Name a primary colour.", "Red.", "Name another one."]
    stream = next(body for kind, body in stand_in.seen if kind == "stream")
    assert stream["stream"] is True


WRONG = {
    "factual": reply(chat_body("The capital of France is Berlin.")),
    "korean": reply(chat_body("The capital of South Korea is Seoul.")),            # right, but not Korean
    "chat": reply(chat_body("Red.")),                                               # the turn before, again
    "stream": reply(sse_body([" one", ",", " two", " and", " three", "."]), SSE),   # no colour at all
}


def test_wrong_answers_fail_and_the_output_names_each_failing_check(stand_in):
    stand_in.answers.update(WRONG)
    done = run_herd("smoke", "--endpoint", stand_in.url, "--timeout", "10", timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1] == "smoke FAILED: factual, korean, chat, stream"

    code, report = smoke(stand_in)
    assert code == 1 and not report["passed"]
    assert failed(report) == {
        "factual": "expected 'Paris' in the answer",
        "korean": "expected an answer in Korean: 0% of its letters are Hangul (at least 50% and 2 syllables)",
        "chat": "expected another primary colour than the red of the turn before (blue, yellow or green)",
        "stream": "expected colours after 'The three primary colours are', got none in 6 chunks",
    }


def test_korean_mixed_with_english_or_mangled_fails(stand_in):
    stand_in.answers["korean"] = reply(chat_body("The capital is 서울, a big city in Korea."))  # 2 of 28 letters
    code, report = smoke(stand_in)
    assert code == 1 and set(failed(report)) == {"korean"}
    assert failed(report)["korean"].startswith("expected an answer in Korean: 7% of its letters are Hangul")

    stand_in.answers["korean"] = reply(chat_body("한국의 수도는 \ufffd\ufffd입니다."))   # bytes that did not decode
    code, report = smoke(stand_in)
    assert code == 1 and failed(report) == {
        "korean": "the answer holds U+FFFD (bytes that did not decode as UTF-8)"}


NOISE = random.Random(18).randbytes(256)
GARBAGE = {
    "random bytes": (reply(NOISE), reply(NOISE, SSE)),
    "an empty body": (reply(b""), reply(b"", SSE)),
    "malformed JSON": (reply(chat_body("Paris")[:40]),
                       reply(b'data: {"choices": [{"text": " red, blue\n\ndata: [DONE]\n\n', SSE)),
    "a 200 without choices": (reply(b'{"id": "x", "object": "chat.completion"}'),
                              reply(("".join(event({"id": "x", "object": "text_completion"}) for _ in range(3))
                                     + "data: [DONE]\n\n").encode(), SSE)),
    "choices of the wrong shape": (reply(b'{"choices": "Paris"}'),
                                   reply(event({"choices": "red, blue"}).encode() + b"data: [DONE]\n\n", SSE)),
    "a server error": (reply(b'{"error": {"message": "boom"}}', status=500),
                       reply(b'{"error": {"message": "boom"}}', status=500)),
}


@pytest.mark.parametrize("garbage", list(GARBAGE))
def test_garbage_fails_every_generation_check(stand_in, garbage):
    chat, stream = GARBAGE[garbage]
    stand_in.answers.update(factual=chat, korean=chat, chat=chat, stream=stream)
    code, report = smoke(stand_in)
    assert code == 1 and not report["passed"]
    assert set(failed(report)) == GENERATION_CHECKS, report
    assert [c["name"] for c in report["checks"] if c["passed"]] == ["ready"]


BROKEN_STREAMS = {
    "no [DONE] at the end": (sse_body([" red", ",", " blue"], done=False),
                             "the stream did not end with data: [DONE]"),
    "the whole text in one chunk": (sse_body([" red, yellow and blue."]),
                                    "expected the text in several chunks, got 1"),
    "data after [DONE]": (sse_body([" red", ",", " blue"]) + event({"choices": []}).encode(),
                          'ValueError: line 11: data after [DONE]: \'{"choices": []}\''),
    "lines that are not server-sent events": (b"red\nblue\n" + sse_body([" red", " blue"]),
                                              "ValueError: line 1 is not a server-sent event: 'red'"),
}


@pytest.mark.parametrize("broken", list(BROKEN_STREAMS))
def test_a_broken_stream_fails_the_stream_check_alone(stand_in, broken):
    body, detail = BROKEN_STREAMS[broken]
    stand_in.answers["stream"] = reply(body, SSE)
    code, report = smoke(stand_in)
    assert code == 1 and failed(report) == {"stream": detail}


def test_a_stream_answered_as_one_json_body_fails(stand_in):
    """A server that ignores `stream: true` and answers a plain completion has not streamed."""
    stand_in.answers["stream"] = reply(json.dumps({"choices": [{"text": " red, yellow and blue."}]}).encode())
    code, report = smoke(stand_in)
    assert code == 1 and failed(report) == {
        "stream": "ValueError: stream answered 'application/json', not text/event-stream"}


def test_no_model_listed_fails_before_any_prompt(stand_in):
    stand_in.models = reply(b'{"object": "list", "data": []}')
    code, report = smoke(stand_in)
    assert code == 1 and failed(report) == {"models": "/v1/models: IndexError: list index out of range"}
    assert stand_in.seen == []
