"""The GPU decode benchmark runs end to end on CPU with a tiny config (its figures need a GPU)."""
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_gpu_decode_benchmark_runs_on_cpu_with_a_tiny_config(tmp_path):
    out = tmp_path / "tiny.txt"
    done = subprocess.run([sys.executable, "bench/gpu_decode.py", "--tiny", "--batches", "1,4", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["bench"] == "gpu_decode" and rows[0]["copy_bandwidth_GBps"] > 0
    runs = {(r["batch"], r["engine"]) for r in rows if "engine" in r}
    assert runs == {(1, "generate"), (1, "herd-static"), (4, "generate"), (4, "herd-static")}
    assert all(r["ms_per_step"] > 0 and r["floor_ms_per_step"] > 0 and r["ttft_s"] > 0 for r in rows if "engine" in r)
