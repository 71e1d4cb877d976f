#!/usr/bin/env bash
# The GPU checks in one call, on a machine with a CUDA GPU and a python3 that holds a CUDA torch:
#   1. install what the image lacks: wheels carried in .whl/ (transformers pinned as in pyproject.toml),
#      installed into a private site directory, never over the image's own packages;
#   2. pytest -m gpu (the engine on CUDA: placement, greedy = generate, seeded sampling, CUDA graphs, TP);
#   3. bench/gpu_decode.py (8B shape, bf16, batch 1/8/32, roofline, TTFT, planner memory).
# Results and logs go to $OUT (default: bench/results/gpu-run). Each stage has its own time limit so
# the whole run stays well inside a 10-minute command.
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
timeout "${GPU_TEST_S:-200}" "$PY" -m pytest -m gpu -p no:cacheprovider -q -o addopts="" \
  tests/runtime/test_engine_gpu.py 2>&1 | tee "$OUT/pytest-gpu.txt" || status=1
timeout "${GPU_BENCH_S:-420}" "$PY" bench/gpu_decode.py --rounds "${ROUNDS:-3}" --out "$OUT/gpu-decode.txt" \
  --profile "$OUT/profile-batch1.txt" \
  2>&1 | tee "$OUT/gpu-decode.log" | grep -v "^\s*$" || status=1
exit $status
