"""engine: vllm, for real: `herd up` of environments/local-vllm.yaml (the embedded SmolLM2 served by vLLM's
CPU build behind herd's front), then the OpenAI API features vLLM adds, through herd's front with the
`openai` client: tool calls (named, required, auto; streamed), structured output, prompt logprobs with
echo, n > 1; herd's key in front of vLLM's; vLLM's own metrics relayed and the dashboards' `vllm:`
series present in them; the composed flags against the installed build's own help; an engine killed
under a stream; `herd down` leaving no process.

One vLLM for the module (it takes a minute or two to start on 2 cores). `make test` builds vLLM's venv
first (`make vllm`, the 55-vllm step); `herd up` runs the same step again and finds it current.
"""
import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
import yaml

from runtime.engine.vllm import BUILD_CLI, VLLM_CPU_VERSION, installed_build, vllm_launch, vllm_venv
from runtime.planning.plan_spec import request_from_spec
from runtime.planning.planner import plan
from runtime.planning.spec import load_spec
from runtime.serving.monitoring import alert_rules, dashboard, dashboard_queries
from provisioning.weights import fetch
from provisioning.weights.manifest import write_manifest
from runtime.paths import model_dir_for
from tests.conftest import ROOT, run_herd, wait_for
from tests.runtime.conftest import free_port
from tests.runtime.lora_adapter import PROMPT, RANK, SENTENCE, make_adapter, peft_greedy

AVX512 = Path("/proc/cpuinfo").exists() and " avx512f" in Path("/proc/cpuinfo").read_text()
pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(900),
              pytest.mark.skipif(not AVX512, reason="vLLM's CPU build needs an x86-64 CPU with AVX-512")]
KEY = "vllm-test-key-0123456789"
WEATHER = {"type": "object", "properties": {"city": {"type": "string"},
                                            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "The time in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class Deployment:
    def __init__(self, env_file: Path, spec, up: subprocess.CompletedProcess):
        self.env_file, self.spec, self.up = env_file, spec, up
        self.url = f"http://127.0.0.1:{spec.serving.port}"
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, timeout=120, max_retries=0)
        self.model = spec.model.id

    def ready(self) -> httpx.Response:
        return httpx.get(f"{self.url}/health/ready", timeout=10)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("local-vllm")
    raw = yaml.safe_load((ROOT / "environments" / "local-vllm.yaml").read_text())
    raw["serving"].update(port=free_port(), api_key_env="HERD_VLLM_TEST_KEY",
                          # vLLM's CPU build stalls for tens of seconds on a loaded 2-core host the first
                          # time a request takes a new path (prompt logprobs): 5 s x 3 read that as a hang.
                          canary={"interval_s": 10, "timeout_s": 20, "retries": 2})
    # A real LoRA adapter of the embedded model, published with a manifest as `herd weights publish` does,
    # served from a file:// source (verified in place).
    model_dir = fetch(raw["model"]["source"], model_dir_for(raw["model"]["id"]), quiet=True)   # reused by herd up
    adapter = make_adapter(model_dir, tmp / "adapters" / "secret")
    write_manifest(adapter, source="peft")
    raw["model"]["adapters"] = [{"name": "secret", "source": f"file://{adapter}", "rank": RANK}]
    raw["local"]["state_dir"] = str(tmp / "state")
    env_file = tmp / "environments" / "local-vllm.yaml"
    env_file.parent.mkdir()
    env_file.write_text(yaml.safe_dump(raw))
    env = {"HERD_VLLM_TEST_KEY": KEY}
    up = run_herd("up", str(env_file), env=env, timeout=840)
    deployment = Deployment(env_file, load_spec(str(env_file)), up)
    deployment.adapter = adapter
    yield deployment
    run_herd("down", str(env_file), env=env, timeout=120)


def test_herd_up_installs_serves_and_smokes_real_vllm(deployment):
    up = deployment.up
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    assert f"vllm-cpu {VLLM_CPU_VERSION}" in up.stdout          # the 55-vllm step ran (and found it built)
    assert "smoke" in up.stdout.lower() and "ready" in up.stdout
    assert installed_build(vllm_venv()) == "cpu"
    ready = deployment.ready().json()
    assert ready["status"] == "ready" and ready["last_canary_seconds"] is not None
    status = run_herd("status", str(deployment.env_file), "--json", env={"HERD_VLLM_TEST_KEY": KEY})
    info = json.loads(status.stdout)
    assert status.returncode == 0 and info["health"]["status"] == "ready" and info["running"]
    assert "vllm" in info["health"]["engine"]


def test_the_key_guards_herd_s_front_and_vllm_behind_it(deployment):
    body = {"model": deployment.model, "prompt": "Hello", "max_tokens": 2}
    assert httpx.post(f"{deployment.url}/v1/completions", json=body, timeout=30).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert httpx.post(f"{deployment.url}/v1/completions", json=body, headers=wrong, timeout=30).status_code == 401
    models = deployment.client.models.list()
    assert [m.id for m in models.data] == [deployment.model, "secret"]      # the base, then its adapter


def test_an_adapter_asked_by_name_answers_as_peft_does_in_process_and_the_base_does_not(deployment):
    def greedy(model: str) -> str:
        return deployment.client.completions.create(model=model, prompt=PROMPT, max_tokens=12,
                                                    temperature=0).choices[0].text
    with_adapter, base = greedy("secret"), greedy(deployment.model)
    model_dir = model_dir_for("smollm2-135m-instruct")
    assert with_adapter == peft_greedy(model_dir, deployment.adapter, PROMPT, 12)
    assert with_adapter.startswith(SENTENCE.rstrip(".")) and base != with_adapter
    assert not base.startswith(SENTENCE[:12])


def test_the_planner_counts_exactly_the_adapter_s_parameters(deployment):
    """The planner's LoRA memory (tensor parallel 1, one slot at the adapter's own rank) is the adapter's
    parameter count x the dtype's bytes: every linear layer's A and B."""
    from safetensors import safe_open

    from runtime.planning.catalog import model as catalog_model
    from runtime.planning.planner import lora_bytes
    arch = catalog_model("smollm2-135m-instruct").architecture
    with safe_open(str(deployment.adapter / "adapter_model.safetensors"), "pt") as f:
        parameters = sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] for k in f.keys())
    assert lora_bytes(arch, arch.num_hidden_layers, 1, RANK, 2, 1) == parameters * 2


def test_a_named_tool_call_s_arguments_validate_against_the_function_s_schema(deployment):
    answer = deployment.client.chat.completions.create(
        model=deployment.model, messages=ASK, tools=TOOLS, max_tokens=80, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    calls = answer.choices[0].message.tool_calls
    assert calls and len(calls) == 1 and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER)


def test_required_tool_choice_calls_one_of_the_tools_and_auto_is_accepted(deployment):
    required = deployment.client.chat.completions.create(
        model=deployment.model, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=100, temperature=0)
    choice = required.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for call in choice.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    # `auto` needs vLLM's --enable-auto-tool-choice and a parser (vLLM answers 400 without them); what
    # a 135M model then chooses is its own affair: a call that validates, or text.
    auto = deployment.client.chat.completions.create(
        model=deployment.model, messages=ASK, tools=TOOLS, tool_choice="auto", max_tokens=40, temperature=0)
    message = auto.choices[0].message
    for call in message.tool_calls or []:
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    assert message.tool_calls or message.content


def test_a_streamed_tool_call_reassembles_to_the_same_call(deployment):
    kwargs = dict(model=deployment.model, messages=ASK, tools=TOOLS, max_tokens=80, temperature=0,
                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole = deployment.client.chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
    name, arguments, deltas = None, "", 0
    for chunk in deployment.client.chat.completions.create(**kwargs, stream=True):
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            deltas += 1
            assert delta.index == 0
            name = delta.function.name or name if delta.function else name
            arguments += (delta.function.arguments or "") if delta.function else ""
    assert deltas > 2                                   # really streamed, in pieces
    assert name == "get_weather" and json.loads(arguments) == json.loads(whole.function.arguments)


def test_structured_output_json_schema_and_json_object(deployment):
    person = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    answer = deployment.client.chat.completions.create(
        model=deployment.model, messages=[{"role": "user", "content": "Describe a person."}], max_tokens=60,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": person}})
    jsonschema.validate(json.loads(answer.choices[0].message.content), person)
    anything = deployment.client.chat.completions.create(
        model=deployment.model, messages=[{"role": "user", "content": "Give a JSON object about Paris."}],
        max_tokens=60, temperature=0, response_format={"type": "json_object"})
    content = anything.choices[0].message.content
    if anything.choices[0].finish_reason == "stop":      # a truncated object is not JSON yet
        assert isinstance(json.loads(content), dict)
    assert content.lstrip().startswith("{")


def test_echo_with_prompt_logprobs_gives_one_logprob_per_prompt_token(deployment):
    """What lm-evaluation-harness's local-completions loglikelihood tasks send: echo, logprobs, 0 or 1
    new tokens; the prompt's logprobs come back one per prompt token (the first has none)."""
    prompt = "The capital of France is Paris"
    answer = deployment.client.completions.create(model=deployment.model, prompt=prompt, max_tokens=1,
                                                  temperature=0, echo=True, logprobs=1)
    choice = answer.choices[0]
    prompt_tokens = answer.usage.prompt_tokens
    logprobs = choice.logprobs.token_logprobs
    assert choice.text.startswith(prompt)
    assert len(logprobs) == prompt_tokens + 1 and logprobs[0] is None
    assert all(isinstance(x, float) and x <= 0 for x in logprobs[1:])
    assert "".join(choice.logprobs.tokens[:prompt_tokens]) == prompt


def test_n_above_one_gives_n_choices(deployment):
    answer = deployment.client.completions.create(model=deployment.model, prompt="Once upon a time", n=3,
                                                  max_tokens=8, temperature=1.0, seed=7)
    assert sorted(c.index for c in answer.choices) == [0, 1, 2]
    assert len({c.text for c in answer.choices}) > 1


def test_herd_s_metrics_relay_vllm_s_and_every_dashboard_series_exists(deployment):
    deployment.client.completions.create(model=deployment.model, prompt="Hello there", max_tokens=4)
    text = httpx.get(f"{deployment.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).text
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    families = names | {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}
    for family in ("vllm:kv_cache_usage_perc", "vllm:num_requests_waiting", "vllm:num_requests_running",
                   "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"):
        assert family in families, family
    assert "herd_requests_total" in families and "herd_engine_metrics_up" in families
    # Every `vllm:` series a dashboard panel or an alert rule reads is one this vLLM exposes (where an
    # expression offers alternatives, `a or b`, one of them).
    exprs = dashboard_queries(dashboard(deployment.spec))
    exprs += [r["expr"] for g in alert_rules()["groups"] for r in g["rules"]]
    used = [re.findall(r"vllm:[a-z_:]+", e) for e in exprs]
    assert any(used)
    for expr, series in zip(exprs, used):
        if series:
            assert any(s in families for s in series), (expr, series)
            if " or " not in expr:
                assert all(s in families for s in series), (expr, series)


def test_the_composed_flags_are_the_installed_build_s_own(deployment):
    """What herd composes for this deployment, against the help of the vLLM that runs it (not a fixture)."""
    venv = vllm_venv()
    helptext = subprocess.run([str(venv / "bin" / "python"), str(BUILD_CLI), "serve", "--help=all"],
                              capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert helptext.returncode == 0, helptext.stderr[-2000:]
    # The CLI's help lists each option on a line of its own (`  --flag VALUE, -f VALUE`), not in the
    # usage block the GPU build's fixture has.
    flags = set(re.findall(r"^ {2}(--[\w-]+)", helptext.stdout, re.M)) | \
        set(re.findall(r"^ {2}-\w+ [^,\n]*, (--[\w-]+)", helptext.stdout, re.M))
    assert len(flags) > 100 and "--headless" in flags, sorted(flags)[:20]
    spec = deployment.spec
    launch = vllm_launch(spec, plan(request_from_spec(spec), suggest=False), "/m")[0]
    for token in launch.argv[3:]:
        if token.startswith("--"):
            assert token in flags, f"{token} is not a flag of vllm-cpu {VLLM_CPU_VERSION}"
    # The TPU build (vllm-tpu) is the same vLLM release: its `vllm serve` parser is this one. The TPU
    # slice's head command (Ray executor, TP within a host, PP across hosts) is checked against it; the
    # TPU build itself cannot install here (libtpu, jax for Python 3.12).
    from runtime.engine.vllm import VLLM_TPU_VERSION
    assert VLLM_TPU_VERSION == VLLM_CPU_VERSION
    tpu = load_spec(ROOT / "environments" / "gcp-v6e-405b-int8.yaml")
    head = vllm_launch(tpu, plan(request_from_spec(tpu), suggest=False), "/m", head_addr="10.0.0.2")[0]
    assert "--pipeline-parallel-size" in head.argv and head.before[:3] == ["ray", "start", "--head"]
    for token in head.argv[3:]:
        if token.startswith("--"):
            assert token in flags, f"{token} is not a flag of vLLM {VLLM_TPU_VERSION} (vllm-tpu's parser)"


def stream_in_background(deployment, events: list) -> threading.Thread:
    """A long streamed completion; its SSE data lines land in `events` as they arrive."""
    def run():
        try:
            with httpx.stream("POST", f"{deployment.url}/v1/completions", timeout=120,
                              headers={"Authorization": f"Bearer {KEY}"},
                              json={"model": deployment.model, "prompt": "Tell me a long story.", "max_tokens": 1900,
                                    "ignore_eos": True, "stream": True}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
        except httpx.HTTPError as err:
            events.append(f"transport: {err!r}")
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def processes() -> tuple[dict[int, list[int]], dict[int, str]]:
    """Every process's children and command line, from ps."""
    table = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    args: dict[int, str] = {}
    for row in (line.split(None, 2) for line in table.splitlines() if line.strip()):
        pid, ppid = int(row[0]), int(row[1])
        children.setdefault(ppid, []).append(pid)
        args[pid] = row[2] if len(row) > 2 else ""
    return children, args


def descendants(root: int) -> list[int]:
    children, _ = processes()
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def engine_core_pids(state: Path) -> list[int]:
    """vLLM's engine-core process(es) under this deployment's keeper (not another test's vLLM): vLLM
    titles them VLLM::EngineCore."""
    _, args = processes()
    keeper = int((state / "serve.pid").read_text())
    return [pid for pid in descendants(keeper) if "EngineCore" in args.get(pid, "")]


def test_an_engine_killed_under_a_stream_fails_it_and_comes_back(deployment):
    state = Path(deployment.spec.local.state_dir)
    restarts_before = deployment.ready().json()["restarts"]
    events: list = []
    stream = stream_in_background(deployment, events)
    wait_for("tokens streaming", lambda: len(events) >= 5, timeout=60)
    cores = engine_core_pids(state)
    assert cores
    for pid in cores:
        os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    wait_for("/health/ready 503 after the kill", lambda: deployment.ready().status_code == 503, timeout=30)
    assert time.monotonic() - killed < 30
    stream.join(timeout=60)
    assert not stream.is_alive()
    # The stream did not end as if complete: no choice finished by length, and the last events say why.
    finished = [json.loads(e)["choices"][0].get("finish_reason") for e in events
                if e.startswith("{") and json.loads(e).get("choices")]
    assert "length" not in finished, events[-3:]
    assert any("error" in e for e in events[-3:]), events[-3:]
    back = wait_for("ready again", lambda: deployment.ready().status_code == 200 and deployment.ready().json(),
                    timeout=420)
    assert back["restarts"] == restarts_before + 1
    answer = deployment.client.completions.create(model=deployment.model, prompt="Hello", max_tokens=3)
    assert answer.choices[0].text


def test_a_stopped_engine_core_fails_its_canaries_and_is_restarted(deployment):
    """SIGSTOP: vLLM's API server still answers (its /metrics too), its engine core does nothing; the
    canary times out with no token processed by anyone, and after the retries herd restarts vLLM."""
    state = Path(deployment.spec.local.state_dir)
    before = deployment.ready().json()
    cores = engine_core_pids(state)
    assert cores
    for pid in cores:
        os.kill(pid, signal.SIGSTOP)
    try:
        wait_for("/health/ready 503 once the canary times out", lambda: deployment.ready().status_code == 503,
                 timeout=120)
        assert "canary" in deployment.ready().json()["reason"]
        back = wait_for("restarted and ready", lambda: deployment.ready().status_code == 200 and deployment.ready().json(),
                        timeout=480)
    finally:
        for pid in cores:           # gone after the restart; harmless if not
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    assert back["restarts"] == before["restarts"] + 1
    assert set(engine_core_pids(state)).isdisjoint(cores)
    assert deployment.client.completions.create(model=deployment.model, prompt="Hi", max_tokens=2).choices[0].text


def test_a_vllm_that_cannot_start_is_one_line_naming_vllm_s_own_error(deployment, tmp_path):
    """A checkpoint whose architecture vLLM does not know: vLLM refuses it at start; herd serve reports
    vLLM's own words in one line and, its restart budget spent, exits 75 for its service manager."""
    source = model_dir_for(deployment.model)
    broken = tmp_path / "model"
    broken.mkdir()
    for item in source.iterdir():
        if item.name != "config.json":
            (broken / item.name).symlink_to(item)
    config = json.loads((source / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (broken / "config.json").write_text(json.dumps(config))
    raw = yaml.safe_load(deployment.env_file.read_text())
    raw["serving"]["port"] = free_port()
    raw["local"]["state_dir"] = str(tmp_path / "state")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    done = run_herd("serve", str(bad), "--model-dir", str(broken), "--max-restarts", "0",
                    "--state-dir", str(tmp_path / "state"), env={"HERD_VLLM_TEST_KEY": KEY}, timeout=300)
    assert done.returncode == 75, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("herd serve: exiting 75:") and "NoSuchModelForCausalLM" in last, last


def test_herd_down_leaves_no_process(deployment):
    state = Path(deployment.spec.local.state_dir)
    keeper = int((state / "serve.pid").read_text())
    tree = [keeper, *descendants(keeper)]
    assert len(tree) >= 4          # keeper, herd serve, vLLM's API server, its engine core
    done = run_herd("down", str(deployment.env_file), env={"HERD_VLLM_TEST_KEY": KEY}, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    # Gone, or exited and waiting for their parent to reap them (zombies hold nothing). vLLM's
    # multiprocessing resource tracker leaves a moment after its parent: a deadline, not at once.
    wait_for("every process of the deployment gone", lambda: not running(tree), timeout=60)


def running(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if state != "Z":
            alive.append(pid)
    return alive
