"""`herd plan`: the contract other tools script against (exit codes, JSON keys)."""
import json

import pytest

from tests.conftest import ENVIRONMENTS

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
    assert 72e9 < json.loads(out.stdout)["parameters"] < 73e9  # a Qwen2-72B-shaped config


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
