#!/usr/bin/env bash
# herd's runtime in its own venv: from uploaded wheels, with the package index for what they lack
# (cloud nodes get herd's own wheel) or without any index (HERD_PIP_OFFLINE=1: on-prem hosts get the
# whole dependency bundle and usually cannot reach an index).
# On GPU hosts whose spec selects vLLM, the pinned vLLM too.
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"
venv="$HERD_HOME/venv"
wheels="$HERD_HOME/wheels"
want=${HERD_VERSION:?HERD_VERSION must name the herd version to install}
if [ -x "$venv/bin/herd" ] && [ "$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("herd"))' 2>/dev/null)" = "$want" ]; then
  if ! { gpu_mode && [ "${HERD_ENGINE:-}" = vllm ]; } || "$venv/bin/python" -c "import vllm" 2>/dev/null; then
    ok "herd $want installed"
  fi
fi
PY=${HERD_PYTHON:-python3}
run "$PY" -m venv "$venv"
source_args=()
if [ -d "$wheels" ] && [ -n "$(ls "$wheels" 2>/dev/null)" ]; then
  source_args=(--find-links "$wheels")
  [ "${HERD_PIP_OFFLINE:-0}" = 1 ] && source_args=(--no-index "${source_args[@]}")
fi
run "$venv/bin/pip" install -q --disable-pip-version-check "${source_args[@]}" "herd==$want"
if gpu_mode && [ "${HERD_ENGINE:-}" = vllm ]; then
  run "$venv/bin/pip" install -q --disable-pip-version-check "${source_args[@]}" "vllm==${HERD_VLLM_VERSION:?}"
fi
[ "$DRY_RUN" = 1 ] || "$venv/bin/herd" --help >/dev/null || fail "herd does not start from $venv"
ok "herd $want in $venv"
