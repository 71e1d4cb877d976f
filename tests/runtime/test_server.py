"""The OpenAI-compatible server, with tensor parallel ranks in real processes (gloo on CPU)."""
import concurrent.futures as futures
import json

import httpx
import pytest
import torch

pytestmark = pytest.mark.slow

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
    before = metric(server.url, "herd_batches_total")
    with futures.ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda p: complete(server.url, p, 16, ignore_eos=True), PROMPTS))
    assert [a.json()["choices"][0]["token_ids"] for a in answers] == [reference(p, 16, eos=False) for p in PROMPTS]
    # Three requests within the 300 ms window ran as one batch (a canary may add one more).
    assert metric(server.url, "herd_batches_total") - before <= 2


def test_end_of_sequence_stops_like_generate(server, reference):
    prompt = PROMPTS[0]
    r = complete(server.url, prompt, 200)
    ref = reference(prompt, 200)
    ids = r.json()["choices"][0]["token_ids"]
    assert ids == ref
    assert r.json()["choices"][0]["finish_reason"] == ("stop" if len(ids) < 200 else "length")


def test_openai_client_drives_chat_completions_and_streaming(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused-on-loopback")
    assert [m.id for m in client.models.list().data] == ["tiny"]

    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}],
                                          max_tokens=8, temperature=0, seed=1)
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens == 8 or chat.choices[0].finish_reason == "stop"
    text = client.completions.create(model="tiny", prompt="The capital of", max_tokens=8, temperature=0)
    assert text.choices[0].text and text.usage.prompt_tokens > 0

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


def test_metrics_are_prometheus_text(server):
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("herd_requests_total", "herd_queue_depth", "herd_time_to_first_token_seconds_bucket",
                 "herd_time_per_output_token_seconds_count", "herd_generated_tokens_total", "herd_ready 1",
                 "herd_restarts_total", "herd_request_errors_total"):
        assert name in text


def test_non_loopback_bind_needs_an_api_key_and_checks_it(tiny_model, serve, monkeypatch):
    from tests.conftest import run_herd
    refused = run_herd("serve", "--model-dir", str(tiny_model), "--host", "0.0.0.0", "--port", "1")
    assert refused.returncode == 2 and "API key is required" in refused.stderr

    srv = serve("--model-dir", str(tiny_model), "--host", "0.0.0.0", "--api-key-env", "TEST_HERD_KEY",
                "--served-model-name", "tiny", env={"TEST_HERD_KEY": "s3cret-value"})
    srv.wait_ready()
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    assert httpx.post(f"{srv.url}/v1/completions", json=body).status_code == 401
    wrong = httpx.post(f"{srv.url}/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    ok = httpx.post(f"{srv.url}/v1/completions", json=body, headers={"Authorization": "Bearer s3cret-value"})
    assert ok.status_code == 200
    assert httpx.get(f"{srv.url}/health/ready").status_code == 200  # probes need no key
    assert "s3cret-value" not in srv.log_text()


def test_logprobs_for_distillation_match_the_model(server, tiny_model):
    """The chosen token's logprob and the top alternatives, from the model's own distribution."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    prompt = [5, 17, 99]
    r = complete(server.url, prompt, 3, logprobs=3, ignore_eos=True).json()["choices"][0]
    ids, lp = r["token_ids"], r["logprobs"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1]
    expected = torch.log_softmax(logits, -1)
    for step, token in enumerate(ids):
        assert lp["token_logprobs"][step] == pytest.approx(float(expected[step, token]), abs=1e-4)
        assert len(lp["top_logprobs"][step]) <= 3
        assert max(lp["top_logprobs"][step].values()) == pytest.approx(float(expected[step].max()), abs=1e-4)

    chat = httpx.post(f"{server.url}/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4,
        "temperature": 0, "logprobs": True, "top_logprobs": 2, "ignore_eos": True}).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == 4 and all(len(c["top_logprobs"]) == 2 for c in content)
    assert all(c["logprob"] <= 0 for c in content)


def test_static_cache_decode_over_tp2_gives_the_same_tokens(tiny_model, serve, reference):
    srv = serve("--model-dir", str(tiny_model), "--tp", "2", "--served-model-name", "tiny", "--decode", "static",
                "--max-model-len", "128", "--batch-window-ms", "300", name="static")
    srv.wait_ready()
    with futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda p: complete(srv.url, p, 16, ignore_eos=True), PROMPTS[:2]))
    assert [a.json()["choices"][0]["token_ids"] for a in answers] == [reference(p, 16, eos=False) for p in PROMPTS[:2]]
