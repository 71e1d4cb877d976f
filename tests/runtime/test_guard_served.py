"""A guard herd serves itself (serving.guard.model): a second real vLLM on the head, planned and counted,
supervised like the engine, asked by herd's front before every prompt reaches the engine.

Offline there is no Llama Guard checkpoint, so the guard here is the embedded SmolLM2 with a chat
template of the test's own (a policy, as a Llama Guard user would write one): it shows the model three
examples of the verdict a keyword implies, and vLLM's structured output, which herd asks of a guard it
serves, holds the answer to Llama Guard's format. The vLLM process, its supervision, the front's
screening, the refusal, the metrics and failing closed are the real ones; the verdicts are the
template's."""
import json
import os
import signal
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from runtime.engine.vllm import guard_launch
from runtime.planning.plan_spec import guard_plan, request_from_spec
from runtime.planning.planner import plan
from runtime.planning.spec import load_spec
from runtime.serving.guard import VERDICT_REGEX
from tests.conftest import ROOT, run_herd, wait_for
from tests.runtime.conftest import free_port

AVX512 = Path("/proc/cpuinfo").exists() and " avx512f" in Path("/proc/cpuinfo").read_text()
pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(900),
              pytest.mark.skipif(not AVX512, reason="vLLM's CPU build needs an x86-64 CPU with AVX-512")]

# The test's policy: a conversation whose last message says "forbidden" is unsafe (S1), any other safe.
# Three worked examples of the verdict, then the question: a 135M model repeats the pattern.
POLICY_TEMPLATE = (
    "{%- set verdict = 'unsafe\\nS1' if 'forbidden' in (messages[-1]['content'] | lower) else 'safe' -%}\n"
    "{%- for _ in range(3) -%}\n"
    "{{ '<|im_start|>user\\nSay: ' + verdict + '<|im_end|>\\n<|im_start|>assistant\\n' + verdict + '<|im_end|>\\n' }}\n"
    "{%- endfor -%}\n"
    "{{ '<|im_start|>user\\nSay: ' + verdict + '<|im_end|>\\n<|im_start|>assistant\\n' }}")
SAFE = [{"role": "user", "content": "What is the capital of France?"}]
FLAGGED = [{"role": "user", "content": "Tell me the forbidden word."}]


class Deployment:
    def __init__(self, env_file: Path, up: subprocess.CompletedProcess):
        self.env_file, self.up = env_file, up
        self.spec = load_spec(str(env_file))
        self.url = f"http://127.0.0.1:{self.spec.serving.port}"

    def chat(self, messages, max_tokens=8) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/chat/completions", timeout=180, json={
            "model": self.spec.model.id, "messages": messages, "max_tokens": max_tokens, "temperature": 0})

    def guard_url(self) -> str:
        """Where the front asks the guard (herd's /health says), without its path."""
        return httpx.get(f"{self.url}/health", timeout=10).json()["guard"]["url"].removesuffix("/v1/chat/completions")

    def verdicts(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return {s.labels["outcome"]: s.value for family in text_string_to_metric_families(text)
                for s in family.samples
                if s.name == "herd_guard_verdicts_total" and s.labels.get("screen") == "prompt"}


def write_env(tmp: Path) -> Path:
    raw = yaml.safe_load((ROOT / "environments" / "local.yaml").read_text())
    raw["parallelism"]["tensor"] = 1
    raw["context"].update(concurrency=4)
    raw["serving"].update(port=free_port(), canary={"interval_s": 10, "timeout_s": 20, "retries": 2},
                          guard={"model": "smollm2-135m-instruct", "source": raw["model"]["source"],
                                 "max_model_len": 1024, "chat_template": POLICY_TEMPLATE, "timeout_s": 60})
    raw["local"]["state_dir"] = str(tmp / "state")
    env_file = tmp / "environments" / "local-guarded.yaml"
    env_file.parent.mkdir()
    env_file.write_text(yaml.safe_dump(raw))
    return env_file


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    env_file = write_env(tmp_path_factory.mktemp("guard-served"))
    up = run_herd("up", str(env_file), timeout=840)
    yield Deployment(env_file, up)
    run_herd("down", str(env_file), timeout=120)


def guard_processes(port: int) -> list[int]:
    """The guard's vLLM API server (by its loopback port on its command line)."""
    out = subprocess.run(["pgrep", "-f", f"vllm_cli.py serve .*--port {port}"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_the_planner_counts_the_guard_beside_the_model(tmp_path):
    spec = load_spec(str(write_env(tmp_path)))
    with_guard = plan(request_from_spec(spec), suggest=False)
    guard = guard_plan(spec)
    without = plan(request_from_spec(spec.model_copy(update={"serving": spec.serving.model_copy(
        update={"guard": None})})), suggest=False)
    assert with_guard.overhead_breakdown["guard_model"] == guard.per_gpu_bytes.total > 0
    assert with_guard.per_gpu_bytes.total == without.per_gpu_bytes.total + guard.per_gpu_bytes.total
    # The guard's own plan: its weights at the served dtype, a KV cache for the concurrency at its context.
    arch = request_from_spec(spec).architecture
    kv_per_token = 2 * arch.num_hidden_layers * arch.num_key_value_heads * arch.head_dim * 2   # bf16 here
    assert guard.per_gpu_bytes.kv_cache == kv_per_token * 1024 * 4
    # And the guard's vLLM is started with that context, concurrency and KV space (a GiB at least).
    argv = guard_launch(spec, guard, "/m").argv
    assert argv[argv.index("--max-model-len") + 1] == "1024" and argv[argv.index("--max-num-seqs") + 1] == "4"


def test_herd_up_serves_the_guard_and_the_front_screens_with_it(deployment):
    up = deployment.up
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    assert "smoke passed" in up.stdout
    guard_url = deployment.guard_url()
    port = int(guard_url.rsplit(":", 1)[1])
    assert guard_url.startswith("http://127.0.0.1:") and port != deployment.spec.serving.port
    assert len(guard_processes(port)) == 1

    before = deployment.verdicts()
    safe = deployment.chat(SAFE)
    assert safe.status_code == 200, safe.text
    assert "Paris" in deployment.chat(SAFE, max_tokens=20).json()["choices"][0]["message"]["content"]
    flagged = deployment.chat(FLAGGED)
    assert flagged.status_code == 400, flagged.text
    error = flagged.json()["error"]
    assert error["code"] == "content_filter" and "S1 (Violent Crimes)" in error["message"], error
    after = deployment.verdicts()
    assert after["safe"] - before.get("safe", 0) == 2 and after["unsafe"] - before.get("unsafe", 0) == 1

    # What the front decided is what the guard answers, asked directly as the front asks it.
    for messages, verdict in ((SAFE, "safe"), (FLAGGED, "unsafe\nS1")):
        direct = httpx.post(f"{guard_url}/v1/chat/completions", timeout=120, json={
            "model": "smollm2-135m-instruct", "messages": messages, "temperature": 0, "max_tokens": 40,
            "structured_outputs": {"regex": VERDICT_REGEX}}).json()
        assert direct["choices"][0]["message"]["content"] == verdict


def test_a_killed_guard_fails_closed_then_is_restarted(deployment):
    port = int(deployment.guard_url().rsplit(":", 1)[1])
    [pid] = guard_processes(port)
    os.kill(pid, signal.SIGKILL)
    # While it is down, nothing reaches the engine unscreened: 503 with the reason.
    refused = wait_for("a refusal while the guard is down", lambda: (r := deployment.chat(SAFE)).status_code == 503
                       and r, timeout=60, every=0.5)
    assert refused.json()["error"]["code"] == "guard_unavailable", refused.text
    assert httpx.get(f"{deployment.url}/health", timeout=10).json()["guard"]["last_error"]
    # and the front says it is not ready (a balancer takes it out), naming the guard.
    held = wait_for("readiness held back by the guard", lambda: (r := httpx.get(f"{deployment.url}/health/ready",
                                                                                timeout=10)).status_code == 503 and r,
                    timeout=60, every=0.5)
    assert "guard smollm2-135m-instruct not ready" in held.json()["reason"], held.json()
    # herd serve starts it again; screening resumes.
    wait_for("the guard restarted", lambda: [p for p in guard_processes(port) if p != pid], timeout=120)
    wait_for("ready again", lambda: httpx.get(f"{deployment.url}/health/ready", timeout=10).status_code == 200,
             timeout=300, every=1)
    assert deployment.chat(SAFE).status_code == 200
    assert httpx.get(f"{deployment.url}/health", timeout=10).json()["guard"]["last_error"] is None


def test_herd_down_stops_the_guard_too(deployment):
    port = int(deployment.guard_url().rsplit(":", 1)[1])
    down = run_herd("down", str(deployment.env_file), timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    wait_for("the guard's vLLM gone", lambda: not guard_processes(port), timeout=60)
    assert json.loads(run_herd("status", str(deployment.env_file), "--json").stdout)["running"] is False
