"""`herd plan`: the contract other tools script against (exit codes, JSON keys)."""
import json
import re

import pytest
import yaml

from tests.conftest import ENVIRONMENTS, ROOT

# Every test runs `herd` in a child process (about 1-3 s each here); each call also has run_herd's own limit.
pytestmark = pytest.mark.timeout(60)

JSON_KEYS = {"fits", "nodes", "gpus_per_node", "tensor_parallel", "pipeline_parallel", "per_gpu_bytes",
             "max_kv_tokens", "decode_ms_per_token_floor", "cost_usd_per_hour", "reasons", "suggestions"}


@pytest.mark.parametrize("path", ENVIRONMENTS, ids=lambda p: p.name)
def test_plan_works_on_every_shipped_environment(herd, path):
    table = herd("plan", str(path))
    assert table.returncode == 0, table.stdout + table.stderr
    assert "FITS" in table.stdout
    out = herd("plan", str(path), "--json")
    data = json.loads(out.stdout)
    assert JSON_KEYS <= data.keys()
    assert data["fits"] is True
    assert {"weights", "kv_cache", "overhead", "total", "capacity"} <= data["per_gpu_bytes"].keys()
    assert data["per_gpu_bytes"]["total"] <= data["per_gpu_bytes"]["capacity"]


def test_plan_from_flags_that_does_not_fit_exits_1_with_suggestions(herd):
    out = herd("plan", "--model", "llama-3.1-405b-instruct", "--instance", "p4d.24xlarge",
               "--quantization", "none", "--nodes", "1", "--json")
    assert out.returncode == 1
    data = json.loads(out.stdout)
    assert data["fits"] is False and data["reasons"]
    assert {"instance", "nodes", "quantization", "cost_usd_per_hour"} <= data["suggestions"][0].keys()


def test_plan_for_an_onprem_shape(herd):
    out = herd("plan", "--model", "llama-3.1-70b-instruct", "--accelerator", "h100-80gb", "--gpus", "8",
               "--context", "8192", "--concurrency", "4", "--json")
    assert out.returncode == 0
    assert json.loads(out.stdout)["tensor_parallel"] == 8


def test_plan_reads_any_config_json(herd, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "vocab_size": 152064, "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
        "num_key_value_heads": 8, "intermediate_size": 29568, "max_position_embeddings": 32768}))
    out = herd("plan", "--model", str(tmp_path / "config.json"), "--instance", "p5.48xlarge", "--json")
    assert out.returncode == 0, out.stderr
    # A Qwen2-72B-shaped config: the Qwen2 technical report gives 72.71 B parameters (its q/k/v biases,
    # 0.8 M, are the difference the planner leaves out).
    assert json.loads(out.stdout)["parameters"] == pytest.approx(72.71e9, rel=0.001)


def test_plan_refuses_an_onprem_host_with_too_little_ram_and_disk_and_says_so(herd, tmp_path):
    """Llama 3.1 70B in BF16 is 141 GB (70.55 B published parameters x 2 bytes): 64 GiB hosts can
    neither stage a node's shards in RAM nor hold the checkpoint on disk."""
    data = yaml.safe_load((ROOT / "environments" / "onprem-example.yaml").read_text())
    data["onprem"].update(host_ram_gib=64, disk_gib=64)
    env = tmp_path / "small-hosts.yaml"
    env.write_text(yaml.safe_dump(data))
    out = herd("plan", str(env), "--json")
    assert out.returncode == 1, out.stdout + out.stderr
    result = json.loads(out.stdout)
    ram, disk = result["reasons"]
    assert ram.startswith("host RAM") and "64 GiB RAM" in ram
    assert int(re.search(r"loads (\d+) GiB", ram).group(1)) == round(70.55e9 * 2 / 2**30)      # 131
    assert disk.startswith("local disk") and "the node has 69 GB" in disk                     # 64 GiB
    assert int(re.search(r"checkpoint is (\d+) GB", disk).group(1)) == round(70.55e9 * 2 / 1e9)  # 141
    table = herd("plan", str(env))
    assert table.returncode == 1 and "DOES NOT FIT" in table.stdout
    assert "reason: host RAM" in table.stdout and "reason: local disk" in table.stdout


@pytest.mark.parametrize("args, needle", [
    (["--model", "llama-3.1-405", "--instance", "p5.48xlarge"], "did you mean"),
    (["--model", "llama-3.1-8b", "--instance", "p5.48xlarge", "--tensor", "3"], "--tensor: 3"),
    (["--model", "llama-3.1-8b", "--instance", "p5.48xlarge", "--nodes", "0"], "below 1"),
    (["--model", "llama-3.1-8b", "--instance", "p5.48xlarge", "--context", "200000"], "--context"),
    (["--model", "llama-3.1-8b", "--accelerator", "b200", "--gpus", "8"], "--accelerator"),
    (["environments/missing.yaml"], "no such file"),
])
def test_bad_input_is_one_line_and_exit_2(herd, args, needle):
    out = herd("plan", *args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], out.stderr
    assert "Traceback" not in out.stderr


# ------------------------------------------------------------------ replicas
def _with_replicas(tmp_path, name: str, replicas: int, extra: str = "") -> str:
    from tests.conftest import ROOT
    path = tmp_path / f"{name}-x{replicas}.yaml"
    path.write_text((ROOT / "environments" / f"{name}.yaml").read_text() + extra + f"replicas: {replicas}\n")
    return str(path)


@pytest.mark.parametrize("name", ["aws-p5-405b-fp8", "aws-p4de-405b-bf16-2node", "gcp-a3-405b-fp8"])
def test_replicas_multiply_nodes_devices_cost_and_throughput_not_the_group(herd, tmp_path, name):
    one = json.loads(herd("plan", _with_replicas(tmp_path, name, 1), "--json").stdout)
    three = json.loads(herd("plan", _with_replicas(tmp_path, name, 3), "--json").stdout)
    assert one["replicas"] == 1 and three["replicas"] == 3
    # One group's shape and figures are unchanged ...
    for key in ("nodes", "gpus_per_node", "tensor_parallel", "pipeline_parallel", "per_gpu_bytes",
                "cost_usd_per_hour", "tokens_per_s_ceiling", "cost_usd_per_million_tokens"):
        assert three[key] == one[key], key
    # ... and the totals count every group.
    assert one["total_nodes"] == one["nodes"] and three["total_nodes"] == 3 * one["nodes"]
    assert three["total_devices"] == 3 * one["nodes"] * one["gpus_per_node"]
    assert three["total_cost_usd_per_hour"] == pytest.approx(3 * one["cost_usd_per_hour"])
    assert three["total_tokens_per_s_ceiling"] == pytest.approx(3 * one["tokens_per_s_ceiling"])
    table = herd("plan", _with_replicas(tmp_path, name, 3))
    assert table.returncode == 0, table.stderr
    assert f"on 3 replicas x {one['nodes']} x" in table.stdout
    assert f"{3 * one['nodes']} node(s), {three['total_devices']} device(s) in all" in table.stdout
    assert f"${3 * one['cost_usd_per_hour']:,.2f}/h" in table.stdout


def test_onprem_replicas_split_the_hosts_between_groups(herd, tmp_path):
    lb = "  load_balancer: {address: 10.0.0.5}\n"
    data = json.loads(herd("plan", _with_replicas(tmp_path, "onprem-example", 2, lb), "--json").stdout)
    assert data["fits"] and (data["nodes"], data["total_nodes"], data["total_devices"]) == (1, 2, 16)
    assert data["cost_usd_per_hour"] is None and data["total_cost_usd_per_hour"] is None
    # 405B BF16 needs 2 hosts of 8 x H100 per group: two groups need 4 hosts, the spec lists 2.
    from tests.conftest import ROOT
    text = (ROOT / "environments" / "onprem-example.yaml").read_text().replace(
        "llama-3.1-70b-instruct", "llama-3.1-405b-instruct").replace("max_model_len: 32768", "max_model_len: 8192")
    path = tmp_path / "big.yaml"
    path.write_text(text + lb + "replicas: 2\n")
    out = herd("plan", str(path), "--json")
    assert out.returncode == 1
    reasons = json.loads(out.stdout)["reasons"]
    assert any("per replica x 2 replicas = 4, 2 hosts available" in r for r in reasons), reasons
