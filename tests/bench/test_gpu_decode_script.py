"""The GPU decode benchmark runs end to end on CPU with a tiny config (its figures need a GPU)."""
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]   # a tiny CPU run: ~10 s here


def test_gpu_decode_benchmark_runs_on_cpu_with_a_tiny_config(tmp_path):
    out = tmp_path / "tiny.txt"
    done = subprocess.run([sys.executable, "bench/gpu_decode.py", "--tiny", "--batches", "1,4", "--rounds", "2",
                           "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["bench"] == "gpu_decode" and rows[0]["copy_bandwidth_GBps"] > 0
    runs = {(r["batch"], r["engine"]) for r in rows if "engine" in r}
    assert runs == {(b, e) for b in (1, 4) for e in ("generate", "herd-static", "herd-graph-only")}
    timed = [r for r in rows if r.get("engine") in ("generate", "herd-static")]
    assert all(r["ms_per_step"] > 0 and r["floor_ms_per_step"] > 0 and r["ttft_s"] > 0 for r in timed)
    # The fraction is the floor over the measured step, and the kept time is the best of the rounds.
    assert all(abs(r["fraction_of_floor"] - r["floor_ms_per_step"] / r["ms_per_step"]) < 0.01 for r in timed)
    assert all(len(r["totals_s"]) == 2 for r in timed)
    # On CPU the sides are eager generate and herd (the static-cache compiled generate needs CUDA graphs).
    assert set(rows[-1]["summary"]) == {f"batch_{b}_herd_{what}" for b in (1, 4)
                                        for what in ("vs_generate", "fraction_of_floor")}
    assert next(r for r in rows if "herd_model" in r)["herd_model"]["fused_modules"] == 4   # 2 layers x 2


def test_the_planner_fit_script_runs_on_cpu_with_tiny_shapes(tmp_path):
    """bench/gpu_memory.py fits on some shapes and checks on others (its figures need a GPU)."""
    out = tmp_path / "memory.txt"
    done = subprocess.run([sys.executable, "bench/gpu_memory.py", "--tiny", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    fitted = next(r for r in rows if "fitted_on" in r)
    checks = [r for r in rows if "checked_with" in r]
    points = {r["shape"]: r["role"] for r in rows if "shape" in r and "role" in r}
    assert set(fitted["fitted_on"]) == {s for s, role in points.items() if role == "fit"}
    assert {c["checked_with"] for c in checks} == {"fitted", "planner_before"}
    assert all(set(c["checked_on"]) == {s for s, role in points.items() if role == "check"} for c in checks)
    assert not set(fitted["fitted_on"]) & set(checks[0]["checked_on"])   # held out: never fitted on


def test_the_floor_counts_what_a_decode_step_reads():
    """A step indexes one row of the input embedding table but reads lm_head whole: the floor leaves
    the table out unless the two are tied (then it is lm_head, read once)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.gpu_decode import step_read_bytes
    for tied in (False, True):
        config = LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)
        model = LlamaForCausalLM(config)
        params = {id(p): p for p in model.parameters()}.values()
        everything = sum(p.numel() * 4 for p in params)
        assert step_read_bytes(model) == (everything if tied else everything - 1000 * 32 * 4)
