"""serving.guard: a Llama Guard 3-style model screening prompts and answers at herd's front.

There is no Llama Guard checkpoint offline, so the guard is a stand-in: a real HTTP server on loopback
(in a thread of the test process) that answers /v1/chat/completions in Llama Guard 3's format from
trigger words. herd's fronts are real `herd serve` processes reading the guard from their environment
file: herd's own engine with the tiny model (failing closed), and an external engine (the fake vLLM of
test_metrics_proxy) with on_error: open.
"""
from __future__ import annotations

import json
import shlex
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import yaml

from runtime.serving.guard import GuardFailed, GuardRefusal, guard_conversation, parse_verdict, with_answer
from runtime.serving.guard_relay import screened_request, sse_events, streamed_texts, withhold_stream
from tests.runtime.conftest import free_port
from tests.runtime.serving.test_metrics_proxy import families, reached_engine, value

TRIGGER = "bomb"      # a message with it is flagged: unsafe, S1 and S10
ELICIT = "elicit"     # an answer to a user turn with it is flagged: unsafe, S12 (the prompt itself passes)
GUARD_TIMEOUT_S = 2
GUARD_NAME = "stand-in-guard"


# ------------------------------------------------------------------ the stand-in guard
class StandInGuard:
    """Answers like Llama Guard 3 ("\\n\\nsafe", "\\n\\nunsafe\\nS1,S10"), and records what it was asked.
    `broken` makes it fail: garbage (an answer in no verdict format), slow (past herd's timeout),
    http500; `broken_for` "answers" fails only conversations that end in an assistant turn."""

    def __init__(self):
        self.port = free_port()
        self.seen: list[dict] = []
        self.broken: str | None = None
        self.broken_for = "all"
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def verdict(self, messages: list[dict]) -> str:
        last = messages[-1]
        if TRIGGER in last["content"]:
            return "\n\nunsafe\nS1,S10"
        if last["role"] == "assistant" and any(ELICIT in m["content"] for m in messages if m["role"] == "user"):
            return "\n\nunsafe\nS12"
        return "\n\nsafe"

    def answer(self, body: dict) -> tuple[int, dict]:
        self.seen.append(body)
        failing = self.broken if (self.broken_for == "all" or body["messages"][-1]["role"] == "assistant") else None
        if failing == "slow":
            time.sleep(GUARD_TIMEOUT_S + 1)
        if failing == "http500":
            return 500, {"error": {"message": "guard out of memory"}}
        content = "I cannot decide that." if failing == "garbage" else self.verdict(body["messages"])
        return 200, {"id": "g", "object": "chat.completion", "model": GUARD_NAME,
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                  "finish_reason": "stop"}]}

    def start(self) -> StandInGuard:
        guard = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self._send(200, {"object": "list", "data": [{"id": GUARD_NAME, "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                self._send(*guard.answer(body))

            def _send(self, status: int, data: dict):
                payload = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):   # quiet
                pass
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def reset(self) -> None:
        self.broken, self.broken_for = None, "all"
        if self._server is None:
            self.start()


def env_file(tmp_path, name: str, model: dict, guard: dict, **serving) -> str:
    spec = {"name": name, "target": "local", "model": model,
            "context": {"max_model_len": 256, "concurrency": 2}, "parallelism": {"tensor": 1},
            "serving": {"served_model_name": "tiny", "guard": guard, **serving}, "local": {"ranks": 1}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def chat(url: str, content: str, **extra) -> httpx.Response:
    body = {"model": "tiny", "messages": [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": content}],
            "max_tokens": 6, "temperature": 0, **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


def stream_events(url: str, content: str, **extra) -> tuple[int, list[dict]]:
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 6,
            "temperature": 0, "stream": True, **extra}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as s:
        lines = [line for line in s.iter_lines() if line.startswith("data: ")]
        status = s.status_code
    if status != 200:
        return status, []
    assert lines[-1] == "data: [DONE]", lines
    return status, [json.loads(line[6:]) for line in lines[:-1]]


def streamed_content(events: list[dict]) -> str:
    return "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])


def finish_reasons(events: list[dict]) -> list[str]:
    return [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]


# ------------------------------------------------------------------ Llama Guard's format (no processes)
@pytest.mark.parametrize("text, safe, categories", [
    ("safe", True, ()),
    ("\n\nsafe\n", True, ()),
    ("\n\nunsafe\nS1,S10", False, ("S1", "S10")),
    ("unsafe\nS9, S14", False, ("S9", "S14")),
    ("unsafe", False, ()),                      # no category line: still a flag
    ("unsafe\nS15", False, ("S15",)),           # a code herd does not know: still a flag, named as such
])
def test_verdicts_in_llama_guard_3_format(text, safe, categories):
    verdict = parse_verdict(text)
    assert (verdict.safe, verdict.categories) == (safe, categories)


def test_a_verdict_names_its_categories_and_anything_else_is_a_failure():
    assert parse_verdict("unsafe\nS1,S10").named() == "S1 (Violent Crimes), S10 (Hate)"
    assert parse_verdict("unsafe\nS15").named() == "S15 (not a Llama Guard 3 category)"
    assert parse_verdict("unsafe\nS15").labels() == ("other",)
    for garbage in ("", "I cannot decide that.", "Safe? Probably.", "safe\nS1"):
        with pytest.raises(GuardFailed, match="not a Llama Guard verdict"):
            parse_verdict(garbage)


def test_the_guard_sees_user_and_assistant_turns_alternating():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "tool", "content": "42"},
                {"role": "user", "content": "and?"}]
    assert guard_conversation(messages) == [{"role": "user", "content": "Be brief.\n\nhi"},
                                            {"role": "assistant", "content": "hello"},
                                            {"role": "user", "content": "42\n\nand?"}]
    assert with_answer([{"role": "user", "content": "q"}], "a")[-1] == {"role": "assistant", "content": "a"}
    # A conversation that starts with the assistant gets an empty user turn first (the template's order).
    assert guard_conversation([{"role": "assistant", "content": "x"}])[0] == {"role": "user", "content": ""}


@pytest.mark.parametrize("method, path, body, needle", [
    ("POST", "/v1/embeddings", {"input": "x"}, "not served while serving.guard"),
    ("POST", "/v1/completions", {"prompt": [1, 2, 3]}, "one text prompt"),
    ("POST", "/v1/completions", {"prompt": ["a", "b"]}, "one text prompt"),
    ("POST", "/v1/completions", {"prompt": "x", "prompt_embeds": "AAAA"}, "prompt_embeds"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, "image_url part"),
    ("POST", "/v1/chat/completions", {"messages": []}, "messages: required"),
])
def test_what_the_guard_cannot_screen_is_refused_not_passed(method, path, body, needle):
    with pytest.raises(GuardRefusal) as refused:
        screened_request(method, path, json.dumps(body).encode())
    assert refused.value.status == 400 and needle in refused.value.message
    assert screened_request("GET", "/v1/models", b"") is None


def test_a_flagged_streamed_choice_is_emptied_and_the_other_relayed():
    def event(choices) -> bytes:
        return f"data: {json.dumps({'id': 'x', 'choices': choices})}\n\n".encode()
    body = b"".join([
        event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None},
               {"index": 1, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]),
        event([{"index": 0, "delta": {"content": "bad"}, "finish_reason": None}]),
        event([{"index": 1, "delta": {"content": "fine"}, "finish_reason": None}]),
        event([{"index": 0, "delta": {}, "finish_reason": "length"},
               {"index": 1, "delta": {}, "finish_reason": "length"}]),
        b"data: [DONE]\n\n"])
    assert streamed_texts(sse_events(body), chat=True) == {0: "bad", 1: "fine"}
    out = sse_events(withhold_stream(sse_events(body), {0}, chat=True))
    assert streamed_texts(out, chat=True) == {0: "", 1: "fine"}
    assert len(out) == 4 and out[-1].raw == b"data: [DONE]\n\n"    # the chunk that only said "bad" is gone
    last = out[2].data or {}
    assert [c["finish_reason"] for c in last["choices"]] == ["content_filter", "length"]


# ------------------------------------------------------------------ herd's own engine, failing closed
@pytest.fixture(scope="module")
def guard():
    stand_in = StandInGuard().start()
    yield stand_in
    stand_in.stop()


@pytest.fixture(scope="module")
def front(serve_module, tiny_model, tmp_path_factory, guard):
    """herd serve (the built-in engine, the tiny model) screening prompts and answers, failing closed."""
    env = env_file(tmp_path_factory.mktemp("guard-env"), "guarded",
                   {"id": f"config:{tiny_model / 'config.json'}", "source": f"file://{tiny_model}",
                    "dtype": "float32"},
                   {"url": guard.url + "/v1", "screen": ["prompt", "answer"], "timeout_s": GUARD_TIMEOUT_S})
    server = serve_module(env, name="guarded")
    server.wait_ready()
    return server


@pytest.fixture
def stand_in(guard):
    guard.reset()
    yield guard
    guard.reset()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_safe_prompt_is_screened_then_answered(front, stand_in):
    seen = len(stand_in.seen)
    r = chat(front.url, "Hello there", ignore_eos=True)
    assert r.status_code == 200, r.text
    answer = r.json()["choices"][0]
    assert answer["message"]["content"] and answer["finish_reason"] == "length"
    # The prompt, then the answer, each sent as chat messages (the system prompt in the user turn),
    # greedy, short, to the model the guard lists.
    prompt_call, answer_call = stand_in.seen[seen:]
    assert prompt_call["messages"] == [{"role": "user", "content": "Be brief.\n\nHello there"}]
    assert answer_call["messages"][-1] == {"role": "assistant", "content": answer["message"]["content"]}
    assert prompt_call["temperature"] == 0 and 0 < prompt_call["max_tokens"] <= 64
    assert prompt_call["model"] == GUARD_NAME
    # A completion's prompt is screened as a user message.
    done = httpx.post(f"{front.url}/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 4},
                      timeout=60)
    assert done.status_code == 200, done.text
    assert stand_in.seen[seen + 2]["messages"] == [{"role": "user", "content": "Hello"}]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_flagged_prompt_is_refused_and_never_reaches_the_engine(front, stand_in):
    before = families(front.url)
    r = chat(front.url, f"how do I build a {TRIGGER}")
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "content_filter"
    assert error["param"] == "messages"
    assert "S1 (Violent Crimes), S10 (Hate)" in error["message"], error
    status, _ = stream_events(front.url, f"a {TRIGGER} please")       # refused before the stream starts
    assert status == 400
    ids = httpx.post(f"{front.url}/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": f"a {TRIGGER}", "max_tokens": 4})
    assert ids.status_code == 400 and ids.json()["error"]["param"] == "prompt"
    after = families(front.url)
    # The engine saw none of the three prompts: no prompt tokens, no generated tokens.
    assert value(after, "herd_prompt_tokens_total") == value(before, "herd_prompt_tokens_total")
    assert value(after, "herd_generated_tokens_total") == value(before, "herd_generated_tokens_total")
    assert value(after, "herd_guard_verdicts_total", screen="prompt", outcome="unsafe") - \
        value(before, "herd_guard_verdicts_total", screen="prompt", outcome="unsafe") == 3
    for code in ("S1", "S10"):
        assert value(after, "herd_guard_flagged_categories_total", screen="prompt", category=code) - \
            value(before, "herd_guard_flagged_categories_total", screen="prompt", category=code) == 3


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_flagged_answer_is_withheld_with_finish_reason_content_filter(front, stand_in):
    r = chat(front.url, f"please {ELICIT} something", ignore_eos=True, logprobs=True, return_token_ids=True)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "content_filter"
    assert choice["message"]["content"] is None and choice["logprobs"] is None and choice["token_ids"] == []
    assert r.json()["usage"]["completion_tokens"] == 6    # generated, and counted, but not shown
    # Streamed: held back until screened, then the stream without the text.
    status, events = stream_events(front.url, f"please {ELICIT} something", ignore_eos=True,
                                   stream_options={"include_usage": True})
    assert status == 200
    assert streamed_content(events) == "" and finish_reasons(events) == ["content_filter"]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1]["usage"]["completion_tokens"] == 6
    # A safe answer streams as the same text as without a stream.
    plain = chat(front.url, "Hello there", ignore_eos=True).json()["choices"][0]["message"]["content"]
    status, events = stream_events(front.url, "Hello there", ignore_eos=True,
                                   messages=[{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "Hello there"}])
    assert streamed_content(events) == plain and finish_reasons(events) == ["length"]
    fams = families(front.url)
    assert value(fams, "herd_guard_flagged_categories_total", screen="answer", category="S12") >= 2


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("broken, reason", [
    ("down", "is unreachable (ConnectError)"),
    ("slow", f"timed out after {GUARD_TIMEOUT_S}s"),
    ("garbage", "not a Llama Guard verdict"),
    ("http500", "answered HTTP 500"),
])
def test_a_guard_that_cannot_say_fails_closed(front, stand_in, broken, reason):
    before = families(front.url)
    if broken == "down":
        stand_in.stop()
    else:
        stand_in.broken = broken
    r = chat(front.url, "Hello there")
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert error["code"] == "guard_unavailable" and error["type"] == "service_unavailable"
    assert f"guard {stand_in.url}/v1/chat/completions" in error["message"] and reason in error["message"]
    assert "on_error: closed" in error["message"]
    health = httpx.get(f"{front.url}/health/ready")
    assert health.status_code == 200     # readiness is the engine's, whatever the guard does
    assert reason in health.json()["guard"]["last_error"]
    after = families(front.url)
    assert value(after, "herd_prompt_tokens_total") == value(before, "herd_prompt_tokens_total")
    assert value(after, "herd_guard_verdicts_total", screen="prompt", outcome="error") - \
        value(before, "herd_guard_verdicts_total", screen="prompt", outcome="error") == 1


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_guard_failing_on_the_answer_withholds_it_and_metrics_show_latency(front, stand_in):
    stand_in.broken, stand_in.broken_for = "garbage", "answers"
    before = families(front.url)
    r = chat(front.url, "Hello there")
    assert r.status_code == 503 and r.json()["error"]["code"] == "guard_unavailable", r.text
    stand_in.reset()
    assert chat(front.url, "Hello there").status_code == 200
    after = families(front.url)
    assert value(after, "herd_guard_verdicts_total", screen="answer", outcome="error") - \
        value(before, "herd_guard_verdicts_total", screen="answer", outcome="error") == 1
    # Four screenings (two prompts, two answers), each timed.
    counted = sum(value(after, "herd_guard_seconds_count", screen=s) - value(before, "herd_guard_seconds_count",
                                                                             screen=s) for s in ("prompt", "answer"))
    assert counted == 4
    assert value(after, "herd_guard_seconds_sum", screen="prompt") > value(before, "herd_guard_seconds_sum",
                                                                           screen="prompt")
    health = httpx.get(f"{front.url}/health").json()["guard"]
    assert health == {"url": f"{stand_in.url}/v1/chat/completions", "screen": ["prompt", "answer"],
                      "on_error": "closed", "last_error": None}


# ------------------------------------------------------------------ an external engine, failing open
@pytest.fixture(scope="module")
def proxy_front(serve_module, tmp_path_factory, guard):
    """herd serve --engine-cmd (the fake vLLM engine) screening prompts and answers, failing open."""
    state = tmp_path_factory.mktemp("guard-proxy")
    engine_port = free_port()
    engine = [sys.executable, "-m", "tests.runtime.serving.test_metrics_proxy", "--port", str(engine_port),
              "--starts", str(state / "starts")]
    env = env_file(state, "guarded-proxy", {"id": "smollm2-135m-instruct"},
                   {"url": guard.url, "screen": ["prompt", "answer"], "on_error": "open",
                    "timeout_s": GUARD_TIMEOUT_S, "served_model_name": GUARD_NAME})
    server = serve_module(env, "--engine-cmd", shlex.join(engine), "--engine-url",
                          f"http://127.0.0.1:{engine_port}", name="guarded-proxy")
    server.wait_ready(timeout=60)
    server.engine_url = f"http://127.0.0.1:{engine_port}"
    return server


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_proxy_front_screens_prompts_and_answers(proxy_front, stand_in):
    url = proxy_front.url
    already = len(reached_engine(proxy_front.engine_url))
    refused = chat(url, f"a {TRIGGER} recipe")
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "content_filter"
    assert "S1 (Violent Crimes), S10 (Hate)" in refused.json()["error"]["message"]
    assert httpx.post(f"{url}/v1/embeddings", json={"model": "tiny", "input": "x"}).status_code == 400
    safe = chat(url, "hello")
    assert safe.status_code == 200 and safe.json()["choices"][0]["message"]["content"] == "t0 t1 t2 t3 t4 t5 "
    # The engine got the safe prompt only.
    assert [r["prompt"] for r in reached_engine(proxy_front.engine_url)[already:] if r["prompt"] != "Hello"] == \
        ["hello"]
    # Answers: withheld, streamed or not; the fake engine's usage still relayed.
    flagged = chat(url, f"{ELICIT} an answer")
    choice = flagged.json()["choices"][0]
    assert choice["finish_reason"] == "content_filter" and choice["message"]["content"] is None
    assert flagged.json()["usage"]["completion_tokens"] == 6
    status, events = stream_events(url, f"{ELICIT} an answer", stream_options={"include_usage": True})
    assert status == 200 and streamed_content(events) == "" and finish_reasons(events) == ["content_filter"]
    assert events[-1]["usage"]["completion_tokens"] == 6
    status, events = stream_events(url, "hello")
    assert streamed_content(events) == "t0 t1 t2 t3 t4 t5 " and finish_reasons(events) == ["length"]
    plain = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": f"{ELICIT} it", "max_tokens": 3},
                       timeout=30).json()["choices"][0]
    assert plain["finish_reason"] == "content_filter" and plain["text"] == ""


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_proxy_front_passes_requests_when_the_guard_fails_open(proxy_front, stand_in):
    url = proxy_front.url
    before = families(url)
    stand_in.stop()
    answered = chat(url, "hello")
    assert answered.status_code == 200 and answered.json()["choices"][0]["message"]["content"]
    stand_in.reset()
    stand_in.broken = "garbage"
    assert chat(url, "hello").status_code == 200
    after = families(url)
    # Two requests, each screened twice (prompt, answer), each screening an error, passed and counted.
    errors = sum(value(after, "herd_guard_verdicts_total", screen=s, outcome="error")
                 - value(before, "herd_guard_verdicts_total", screen=s, outcome="error") for s in ("prompt", "answer"))
    assert errors == 4
    guard = httpx.get(f"{url}/health").json()["guard"]
    assert guard["on_error"] == "open" and "not a Llama Guard verdict" in guard["last_error"]
    assert "guard" in proxy_front.log_text() and "passing requests unscreened" in proxy_front.log_text()
