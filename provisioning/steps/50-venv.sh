#!/usr/bin/env bash
# herd's runtime in its own venv: herd always from its uploaded wheel, by path (install_herd in
# common.sh); its dependencies from the package index (cloud nodes get herd's own wheel only) or from
# the uploaded bundle without any index (HERD_PIP_OFFLINE=1: on-prem hosts get every dependency as a
# wheel and usually cannot reach an index).
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
install_herd "$venv" "$wheels" "$want"
if gpu_mode && [ "${HERD_ENGINE:-}" = vllm ]; then
  bundle_pip "$venv" "$wheels" "vllm==${HERD_VLLM_VERSION:?}"
fi
[ "$DRY_RUN" = 1 ] || "$venv/bin/herd" --help >/dev/null || fail "herd does not start from $venv"
ok "herd $want in $venv"
