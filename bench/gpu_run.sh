#!/usr/bin/env bash
# The GPU checks in one call (at most ~9.5 minutes), on a machine with a CUDA GPU and a python3 that
# holds a CUDA torch:
#   1. install what the image lacks: wheels carried in .whl/ (transformers pinned as in pyproject.toml),
#      installed into a private site directory, never over the image's own packages;
#   2. the engine's tests on CUDA (pytest -m gpu: placement, greedy = generate, seeded sampling, fused
#      projections, split-cache attention against SDPA, the decode step replayed as one CUDA graph, TP)
#      and the split-cache kernel's own tests;
#   3. bench/gpu_memory.py: the planner's overhead model fitted on three model shapes, checked on three
#      others;
#   4. bench/gpu_decode.py: 8B shape, bf16, batch 1/32/8: herd vs eager generate vs generate with a
#      static cache under torch.compile, the bandwidth floor, decode attention alone, CUDA graph
#      launches, a batch-1 kernel profile, planner memory.
# Results and logs go to $OUT (default: bench/results/gpu-run). Each stage has its own time limit so
# the whole run stays inside a 10-minute command; the decode bench saves what it measured after each
# batch, so a stage cut short still leaves its first batches.
#   HERD_GIT_SHA=$(git rev-parse HEAD) bash bench/gpu_run.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-bench/results/gpu-run}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/herd-site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/herd-site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# The split-cache decode attention is opt-in in the engine until a GPU run has verified and timed it:
# this run does both (the tests hold it to SDPA, the bench times it in the model and alone).
export HERD_DECODE_ATTENTION=${HERD_DECODE_ATTENTION:-split}
# perf_hints: torch.compile says when (and why) it could not use CUDA graphs.
export TORCH_LOGS=${TORCH_LOGS:-perf_hints,recompiles}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv > "$OUT/nvidia-smi.csv" 2>&1
"$PY" - <<'PY' | tee "$OUT/versions.json"
import json, platform, torch, transformers
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
                  "python": platform.python_version(), "devices": torch.cuda.device_count(),
                  "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None}))
PY
status=0
started=$(date +%s)
stage() { echo "== $1 at +$(( $(date +%s) - started ))s"; }
stage "tests"
timeout "${GPU_TEST_S:-110}" "$PY" -m pytest -p no:cacheprovider -q -o addopts="" -m "not slow" \
  tests/runtime/test_engine_gpu.py tests/runtime/test_split_kv_attention.py 2>&1 | tee "$OUT/pytest-gpu.txt" | tail -25 || status=1
stage "memory"
timeout "${GPU_MEMORY_S:-80}" "$PY" bench/gpu_memory.py --out "$OUT/gpu-memory.txt" \
  2>&1 | tee "$OUT/gpu-memory.log" | grep -E "fitted_on|checked_with|Error|error:" | cut -c1-600 || status=1
stage "decode"
timeout "${GPU_BENCH_S:-370}" "$PY" bench/gpu_decode.py --rounds "${ROUNDS:-5}" --out "$OUT/gpu-decode.txt" \
  --profile "$OUT/profile-batch1.txt" \
  2>&1 | tee "$OUT/gpu-decode.log" | grep -v "^\s*$" | grep -v "^\[" | cut -c1-700 || status=1
stage "done"
exit $status
