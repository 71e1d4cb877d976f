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
INTEGER_FLAGS = {"--tensor-parallel-size", "--pipeline-parallel-size", "--max-model-len", "--max-num-seqs",
                 "--max-num-batched-tokens", "--port", "--nnodes", "--node-rank", "--master-port"}


def documented_flags() -> dict[str, set[str] | None]:
    """flag -> its allowed values (None: free value; empty set: a switch without a value)."""
    flags: dict[str, set[str] | None] = {}
    for group in re.findall(r"\[([^\[\]]*(?:\[[^\]]*\][^\[\]]*)*)\]", HELP):
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
    nodes = plan(request_from_spec(load_spec(path)), suggest=False).nodes
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
def test_each_node_supervises_its_own_vllm_command(tmp_path):
    """`herd serve --role worker --node-rank 1` on a vLLM spec runs node 1's headless command."""
    from types import SimpleNamespace

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
    """Provisioning puts vLLM (which pins another torch) in $HERD_HOME/vllm-venv next to herd's venv."""
    from runtime.engine.vllm import vllm_executable
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv-0123abcd"))
    assert vllm_executable() == "vllm"                       # none beside: PATH's
    exe = tmp_path / "vllm-venv" / "bin" / "vllm"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    assert vllm_executable() == str(exe)
