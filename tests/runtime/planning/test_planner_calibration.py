"""The planner's per-GPU memory against a measured GPU run (bench/results/gpu-decode-H200.txt, written
by bench/gpu_run.sh on an H200): the same request is planned again here and compared, like for like,
with what torch allocated and what the device held (peak reserved + CUDA context)."""
import json

import pytest

from runtime.planning import catalog
from runtime.planning.planner import Hardware, PlanRequest, plan

from tests.conftest import ROOT

RESULTS = ROOT / "bench" / "results" / "gpu-decode-H200.txt"


def measured_batches():
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines()]
    header = next(r for r in rows if r.get("bench") == "gpu_decode")
    return header, [r for r in rows if "measured_bytes" in r]


def test_the_committed_gpu_run_names_its_machine_and_versions():
    header, batches = measured_batches()
    assert header["device"] == "NVIDIA H200" and header["git_sha"] != "unknown"
    assert header["torch"].endswith("cu130") and header["transformers"] == "5.24.0"
    assert sorted(b["batch"] for b in batches) == [1, 8, 32]


@pytest.mark.parametrize("batch", [1, 8, 32])
def test_planned_gpu_memory_is_within_3_percent_of_the_measured_peak(batch):
    header, batches = measured_batches()
    got = next(b for b in batches if b["batch"] == batch)
    prompt, new = header["prompt"], header["new_tokens"]
    predicted = plan(PlanRequest(architecture=catalog.model("llama-3.1-8b").architecture,
                                 hardware=Hardware(catalog.accelerator("h200-141gb"), devices_per_node=1),
                                 tensor=1, pipeline=1, max_model_len=prompt + new, concurrency=batch,
                                 max_prefill_tokens=batch * prompt), suggest=False)
    pg, parts = predicted.per_gpu_bytes, predicted.overhead_breakdown
    measured = got["measured_bytes"]
    assert pg.weights == measured["weights"]   # 2 bytes x 8.03 B parameters, counted independently
    allocation = pg.weights + pg.kv_cache + parts["activations"] + parts["logits"]
    assert allocation == pytest.approx(measured["peak_allocated"], rel=0.03)
    assert pg.total == pytest.approx(measured["peak_reserved_plus_context"], rel=0.03)
