"""The OpenAI-compatible server, with tensor parallel ranks in real processes (gloo on CPU)."""
import concurrent.futures as futures
import sys
from pathlib import Path
import json

import httpx
import pytest
import torch

# Each test may be the first to use the module's server: its start (wait_ready allows 120 s) counts
# toward the test's timeout. Tests that need more say so.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]
ROOT_BIN = Path(sys.executable).parent

PROMPTS = [[5, 17, 99, 3, 42, 7], [11, 200, 8], [300, 4, 4, 9, 120]]


@pytest.fixture(scope="module")
def reference(tiny_model):
    """Single-process greedy `generate`, fp32: what the TP server must reproduce token for token."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()

    def run(prompt, n, eos=True):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             eos_token_id=model.config.eos_token_id if eos else None, pad_token_id=0)
        return out[0, len(prompt):].tolist()
    return run


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    from tests.runtime.conftest import ServeProcess
    state = tmp_path_factory.mktemp("tp2")
    srv = ServeProcess(["--model-dir", str(tiny_model), "--tp", "2", "--served-model-name", "tiny",
                        "--max-model-len", "256", "--concurrency", "4", "--batch-window-ms", "300",
                        "--max-queue", "6"], state).start()
    srv.wait_ready()
    yield srv
    srv.stop()


def complete(url, prompt, n, **extra):
    body = {"model": "tiny", "prompt": prompt, "max_tokens": n, "temperature": 0, "return_token_ids": True,
            **extra}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def metric(url, name) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def test_tp2_greedy_tokens_equal_single_process_generate(server, reference):
    for prompt in PROMPTS:
        r = complete(server.url, prompt, 24, ignore_eos=True)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == reference(prompt, 24, eos=False)
        assert r.json()["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 24,
                                     "total_tokens": len(prompt) + 24}


def test_requests_batched_together_get_the_same_tokens(server, reference):
    batches = metric(server.url, "herd_batches_total")
    rows = metric(server.url, "herd_batched_requests_total")
    with futures.ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda p: complete(server.url, p, 16, ignore_eos=True), PROMPTS))
    assert [a.json()["choices"][0]["token_ids"] for a in answers] == [reference(p, 16, eos=False) for p in PROMPTS]
    # The three requests ran, within the 300 ms window, in at least one and at most two batches (an idle
    # canary, one row every 10 s at most, may have been admitted as a batch of its own or joined them).
    new_batches = metric(server.url, "herd_batches_total") - batches
    new_rows = metric(server.url, "herd_batched_requests_total") - rows
    assert 1 <= new_batches <= 2, f"{new_batches} batches for 3 requests ({new_rows} rows)"
    assert 3 <= new_rows <= 4, f"{new_rows} rows batched for 3 requests"


def test_end_of_sequence_stops_like_generate(server, reference):
    prompt = PROMPTS[0]
    r = complete(server.url, prompt, 200)
    ref = reference(prompt, 200)
    ids = r.json()["choices"][0]["token_ids"]
    assert ids == ref
    assert r.json()["choices"][0]["finish_reason"] == ("stop" if len(ids) < 200 else "length")


def test_openai_client_drives_chat_completions_and_streaming(server, tiny_model):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused-on-loopback")
    assert [m.id for m in client.models.list().data] == ["tiny"]

    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}],
                                          max_tokens=8, temperature=0, seed=1)
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens == 8 or chat.choices[0].finish_reason == "stop"
    text = client.completions.create(model="tiny", prompt="The capital of", max_tokens=8, temperature=0)
    from transformers import AutoTokenizer
    prompt_ids = AutoTokenizer.from_pretrained(tiny_model)("The capital of")["input_ids"]
    assert text.choices[0].text and text.usage.prompt_tokens == len(prompt_ids)

    streamed = client.completions.create(model="tiny", prompt="The capital of", max_tokens=8, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text.choices[0].text
    chunks = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0, seed=1,
        stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_stop_strings_cut_the_text(server):
    full = complete(server.url, "Hello", 30, ignore_eos=True).json()["choices"][0]["text"]
    assert len(full) > 6
    stop = full[3:6]
    cut = complete(server.url, "Hello", 30, ignore_eos=True, stop=[stop]).json()["choices"][0]
    assert cut["text"] == full[:full.index(stop)] and cut["finish_reason"] == "stop"


def test_seeded_sampling_is_reproducible(server):
    a = complete(server.url, "Hello", 12, temperature=1.0, seed=42, ignore_eos=True).json()
    b = complete(server.url, "Hello", 12, temperature=1.0, seed=42, ignore_eos=True).json()
    assert a["choices"][0]["token_ids"] == b["choices"][0]["token_ids"]


@pytest.mark.parametrize("body, status, needle", [
    ("{not json", 400, "not valid JSON"),
    ({"model": "tiny"}, 400, "prompt"),
    ({"model": "tiny", "prompt": "x" * 2000, "max_tokens": 4}, 400, "context"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": 10_000}, 400, "max_tokens"),
    ({"model": "gpt-4", "prompt": "hi"}, 404, "does not exist"),
    ({"model": "tiny", "prompt": "hi", "temperature": 5}, 400, "temperature"),
    ({"model": "tiny", "prompt": [1, 99999]}, 400, "token ids"),
])
def test_bad_requests_get_openai_errors_and_crash_nothing(server, body, status, needle):
    raw = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{server.url}/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == status
    assert needle in r.json()["error"]["message"]
    assert {"message", "type", "param", "code"} <= r.json()["error"].keys()
    assert httpx.get(f"{server.url}/health/ready").status_code == 200


def test_full_queue_answers_429(server):
    with futures.ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: complete(server.url, [5, 6], 200, ignore_eos=True), range(10)))
    codes = sorted(a.status_code for a in answers)
    assert 429 in codes and 200 in codes
    busy = next(a for a in answers if a.status_code == 429)
    assert busy.json()["error"]["code"] == "queue_full"
    assert httpx.get(f"{server.url}/health/ready").status_code == 200


def samples(url) -> dict[tuple, float]:
    """Every sample of /metrics by (name, sorted labels)."""
    from prometheus_client.parser import text_string_to_metric_families
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text) for s in f.samples}


def test_metrics_are_prometheus_text(server):
    from prometheus_client.parser import text_string_to_metric_families
    before = samples(server.url)
    r = complete(server.url, "Hello", 3, ignore_eos=True)
    assert r.status_code == 200, r.text
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)}
    for name in ("herd_requests", "herd_queue_depth", "herd_time_to_first_token_seconds",
                 "herd_time_per_output_token_seconds", "herd_generated_tokens", "herd_ready",
                 "herd_restarts", "herd_request_errors", "herd_event_loop_lag_seconds"):
        assert name in families, name
    after = samples(server.url)

    def moved(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0)
    # One request of 3 tokens moves each counter by exactly its share (canaries are not counted).
    assert moved("herd_requests_total", route="/v1/completions", status="200") == 1
    assert moved("herd_generated_tokens_total") == 3
    assert moved("herd_prompt_tokens_total") == r.json()["usage"]["prompt_tokens"]
    assert moved("herd_time_to_first_token_seconds_count") == 1
    assert moved("herd_time_per_output_token_seconds_count") == 2      # the gaps between 3 tokens
    assert moved("herd_request_errors_total") == 0
    assert metric(server.url, "herd_ready") == 1


@pytest.mark.timeout(240)   # its own server: 20-70 s on 2 shared cores, wait_ready allows 120 s
def test_non_loopback_bind_needs_an_api_key_and_checks_it(tiny_model, serve, monkeypatch):
    from tests.conftest import run_herd
    refused = run_herd("serve", "--model-dir", str(tiny_model), "--host", "0.0.0.0", "--port", "1")
    assert refused.returncode == 2 and "API key is required" in refused.stderr

    # Off loopback herd serves HTTPS with its deployment CA (state_dir/tls/ca.pem).
    srv = serve("--model-dir", str(tiny_model), "--host", "0.0.0.0", "--api-key-env", "TEST_HERD_KEY",
                "--served-model-name", "tiny", env={"TEST_HERD_KEY": "s3cret-value"}, tls=True)
    srv.wait_ready()
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    post = lambda **kw: httpx.post(f"{srv.url}/v1/completions", json=body, verify=srv.verify, **kw)  # noqa: E731
    assert post().status_code == 401
    wrong = post(headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    ok = post(headers={"Authorization": "Bearer s3cret-value"})
    assert ok.status_code == 200
    assert httpx.get(f"{srv.url}/health/ready", verify=srv.verify).status_code == 200  # probes need no key
    assert "s3cret-value" not in srv.log_text()


def test_logprobs_for_distillation_match_the_model(server, tiny_model):
    """The chosen token's logprob and the top alternatives, from the model's own distribution."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompt = [5, 17, 99]
    r = complete(server.url, prompt, 3, logprobs=3, ignore_eos=True).json()["choices"][0]
    ids, lp = r["token_ids"], r["logprobs"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1]
    expected = torch.log_softmax(logits, -1)
    for step, token in enumerate(ids):
        assert lp["token_logprobs"][step] == pytest.approx(float(expected[step, token]), abs=1e-4)
        # The model's 3 most likely tokens, keyed by text as OpenAI's format is: ids that decode alike
        # (byte pieces shown as '\ufffd') share one key, holding the better logprob.
        best = {}
        for value, token_id in zip(*expected[step].topk(3)):
            best.setdefault(tokenizer.decode([int(token_id)]), float(value))
        top = lp["top_logprobs"][step]
        assert top.keys() == best.keys()
        assert all(top[text] == pytest.approx(best[text], abs=1e-4) for text in best)

    chat = httpx.post(f"{server.url}/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4,
        "temperature": 0, "logprobs": True, "top_logprobs": 2, "ignore_eos": True}).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == 4 and all(len(c["top_logprobs"]) == 2 for c in content)
    assert all(c["logprob"] <= 0 for c in content)


@pytest.mark.timeout(240)   # its own TP 2 server: 25-75 s on 2 shared cores, wait_ready allows 120 s
def test_static_cache_decode_over_tp2_gives_the_same_tokens(tiny_model, serve, reference):
    srv = serve("--model-dir", str(tiny_model), "--tp", "2", "--served-model-name", "tiny", "--decode", "static",
                "--max-model-len", "128", "--batch-window-ms", "300", name="static")
    srv.wait_ready()
    with futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda p: complete(srv.url, p, 16, ignore_eos=True), PROMPTS[:2]))
    assert [a.json()["choices"][0]["token_ids"] for a in answers] == [reference(p, 16, eos=False) for p in PROMPTS[:2]]


# ------------------------------------------------------------------ containment: a request's fault is its own
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"


def chat_body(**extra):
    return {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, **extra}


POISON = [  # (endpoint, raw body or dict, status, the field the error names)
    (CHAT, chat_body(seed=2**70), 400, "seed"),
    (CHAT, chat_body(seed=-(2**64)), 400, "seed"),
    (COMP, {"model": "tiny", "prompt": "", "max_tokens": 4}, 400, "prompt"),
    (COMP, {"model": "tiny", "prompt": [], "max_tokens": 4}, 400, "prompt"),
    (CHAT, chat_body(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]), 400, "messages"),
    (CHAT, chat_body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     400, "messages"),
    (CHAT, chat_body(messages=[]), 400, "messages"),
    (CHAT, chat_body(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages"),
    (CHAT, chat_body(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
    (CHAT, chat_body(tool_choice="required"), 400, "tool_choice"),
    (CHAT, chat_body(response_format={"type": "json_object"}), 400, "response_format"),
    (CHAT, chat_body(n=2), 400, "n"),
    (COMP, {"model": "tiny", "prompt": "hi", "best_of": 3}, 400, "best_of"),
    (COMP, {"model": "tiny", "prompt": "hi", "echo": True}, 400, "echo"),
    (COMP, {"model": "tiny", "prompt": "hi", "suffix": "end"}, 400, "suffix"),
    (CHAT, chat_body(logit_bias={"99999": 5}), 400, "logit_bias"),
    (CHAT, chat_body(logit_bias={"5": 1000}), 400, "logit_bias"),
    (CHAT, chat_body(logit_bias={"abc": 1}), 400, "logit_bias"),
    (CHAT, chat_body(stop=["x"] * 100), 400, "stop"),
    (CHAT, chat_body(stop="y" * 10_000), 400, "stop"),
    (CHAT, chat_body(top_p=0), 400, "top_p"),
    (CHAT, chat_body(presence_penalty=3), 400, "presence_penalty"),
    (CHAT, chat_body(top_logprobs=50, logprobs=True), 400, "top_logprobs"),
    (CHAT, chat_body(max_tokens=2**40), 400, "max_tokens"),
    (CHAT, chat_body(max_tokens=-1), 400, "max_tokens"),
    (CHAT, '{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400,
     "temperature"),
    (CHAT, '[1, 2, 3]', 400, "body"),
    (COMP, {"model": "tiny", "prompt": [-1, 5]}, 400, "prompt"),
    (COMP, {"model": "tiny", "prompt": ["a", "b"]}, 400, "prompt"),
    (COMP, {"model": "tiny", "prompt": "x " * 400, "max_tokens": 4}, 400, "prompt"),
]


def post(url, path, body, **kw):
    raw = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(url + path, content=raw, headers={"content-type": "application/json"}, timeout=60, **kw)


def health(url) -> dict:
    return httpx.get(f"{url}/health/ready", timeout=10).json()


@pytest.mark.timeout(300)   # 7-17 s here; the in-flight requests may take 120 s, the server's start 120 s
def test_poison_requests_get_400s_naming_the_field_while_others_complete(server, reference):
    restarts = health(server.url)["restarts"]
    prompt = PROMPTS[1]
    with futures.ThreadPoolExecutor(2) as pool:
        in_flight = [pool.submit(complete, server.url, prompt, 120, ignore_eos=True) for _ in range(2)]
        for path, body, status, field in POISON:
            r = post(server.url, path, body)
            assert r.status_code == status, (body, r.text)
            error = r.json()["error"]
            assert field in error["message"] and error["type"] == "invalid_request_error", (body, error)
            assert "\n" not in error["message"]
        done = [f.result(timeout=120) for f in in_flight]
    expected = reference(prompt, 120, eos=False)
    assert all(d.status_code == 200 and d.json()["choices"][0]["token_ids"] == expected for d in done)
    after = health(server.url)
    assert after["status"] == "ready" and after["restarts"] == restarts


def test_a_body_too_large_is_refused_before_it_is_read(server):
    r = post(server.url, COMP, {"model": "tiny", "prompt": "x" * (9 * 2**20)})
    assert r.status_code == 413 and "at most" in r.json()["error"]["message"]


def test_a_temperature_too_small_to_divide_by_is_greedy(server):
    greedy = complete(server.url, "Hello", 8, ignore_eos=True).json()["choices"][0]["token_ids"]
    tiny = complete(server.url, "Hello", 8, ignore_eos=True, temperature=1e-39).json()["choices"][0]["token_ids"]
    assert tiny == greedy


def test_sampling_through_the_server_differs_by_seed_and_top_p_narrows_it(server):
    def sample(**kw):
        return complete(server.url, "Hello", 24, ignore_eos=True, temperature=1.0, **kw).json()["choices"][0]["token_ids"]
    greedy = complete(server.url, "Hello", 24, ignore_eos=True).json()["choices"][0]["token_ids"]
    a, b = sample(seed=1), sample(seed=2)
    assert a == sample(seed=1) and a != b and a != greedy
    assert sample(seed=1, top_p=1e-6) == greedy        # a nucleus holding only the top token


def test_logit_bias_through_the_server(server):
    forced = complete(server.url, "Hello", 5, ignore_eos=True, logit_bias={"42": 100}).json()
    assert forced["choices"][0]["token_ids"] == [42] * 5


def test_openapi_describes_the_bodies_and_errors(server):
    spec = httpx.get(f"{server.url}/openapi.json").json()
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    body_ref = chat["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = spec["components"]["schemas"][body_ref.rsplit("/", 1)[1]]
    assert {"messages", "model", "seed", "stop", "logit_bias", "tools"} <= schema["properties"].keys()
    assert {"200", "400", "401", "413", "429", "503"} <= chat["responses"].keys()
    assert "ChatCompletion" in json.dumps(chat["responses"]["200"])
    assert httpx.get(f"{server.url}/docs").status_code == 200


@pytest.mark.timeout(570)   # 12-40 s here; schemathesis is allowed 420 s, the server's start 120 s
def test_schema_driven_fuzzing_finds_no_server_error_and_no_restart(server, tmp_path):
    """Schemathesis generates valid and invalid requests from /openapi.json (bounded), and checks that
    none gets a 5xx and every answer conforms to the schema; the group is still ready afterwards."""
    import shutil
    import subprocess
    restarts = health(server.url)["restarts"]
    st = shutil.which("schemathesis") or str(ROOT_BIN / "schemathesis")
    done = subprocess.run(
        [st, "run", f"{server.url}/openapi.json", "--checks",
         "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
         "--max-examples", "25", "--seed", "7", "--workers", "1", "--request-timeout", "60",
         "--phases", "examples,coverage,fuzzing", "--max-failures", "5"],
        capture_output=True, text=True, timeout=420, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-6000:]
    after = health(server.url)
    assert after["status"] == "ready" and after["restarts"] == restarts, after


def test_metrics_survive_hostile_paths_and_parse(server):
    from prometheus_client.parser import text_string_to_metric_families
    other_before = samples(server.url).get(("herd_requests_total", (("route", "other"), ("status", "404"))), 0)
    for path in ['/v1/"quoted"', "/nope/" + "x" * 300, "/v1/chat/completions/extra", '/a\\b"c']:
        httpx.get(server.url + path.replace("\\", "%5C").replace('"', "%22"))
        httpx.get(server.url + path)
    after_paths = {s.labels["route"]: s.value for f in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)
                   for s in f.samples if s.name == "herd_requests_total" and s.labels.get("status") == "404"}
    generated = metric(server.url, "herd_generated_tokens_total")
    done = complete(server.url, "Hello", 2)
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)}
    routes = {s.labels["route"] for s in families["herd_requests"].samples if "route" in s.labels}
    assert routes <= {"other", "/v1/completions", "/v1/chat/completions", "/v1/models", "/metrics",
                      "/openapi.json", "/docs"}
    # Every hostile path counted, under one label: 4 paths, each sent escaped and as given.
    assert after_paths.get("other", 0) - other_before == 8
    assert metric(server.url, "herd_generated_tokens_total") - generated == done.json()["usage"]["completion_tokens"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_disconnects_cancels_its_row(server, stream):
    """The engine stops generating for a client that left (streaming or not): the generated-token
    counter stops short of the request's max_tokens and the queue drains."""
    import time
    before = metric(server.url, "herd_generated_tokens_total")
    body = {"model": "tiny", "prompt": [5, 6], "max_tokens": 250, "temperature": 0, "ignore_eos": True,
            "stream": stream}
    if stream:
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")   # streaming has begun; then the client hangs up
    else:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{server.url}/v1/completions", json=body, timeout=0.4)
    deadline = time.monotonic() + 10
    while metric(server.url, "herd_queue_depth") != 0:
        assert time.monotonic() < deadline, "the cancelled row is still in the engine after 10 s"
        time.sleep(0.1)
    assert metric(server.url, "herd_generated_tokens_total") - before < 250
