#!/usr/bin/env bash
# The model weights: verified against their manifest; fetched (resumably) when not uploaded. With LoRA
# adapters or a guard herd serves in the spec (HERD_EXTRA_WEIGHTS=1), `herd weights fetch` of the
# environment file fetches and checks them too, beside the model (what is already there and verified is
# reused).
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"
dest=${HERD_MODEL_DIR:?HERD_MODEL_DIR must name the model directory}
herd="$HERD_HOME/venv/bin/herd"
if [ "${HERD_EXTRA_WEIGHTS:-0}" = 1 ]; then
  env_file=${HERD_ENV_FILE:?HERD_ENV_FILE must name the environment file (its adapters and guard)}
  run "$herd" weights fetch "$env_file" ${HERD_MODEL_SOURCE:+--source "$HERD_MODEL_SOURCE"} --dest "$dest" --json
  ok "weights, adapters and guard in place beside $dest"
fi
if [ -f "$dest/herd-manifest.json" ] && "$herd" weights verify "$dest" >/dev/null 2>&1; then
  ok "weights verified in $dest"
fi
[ -n "${HERD_MODEL_SOURCE:-}" ] || fail "weights in $dest are missing or corrupt and no source is set"
run "$herd" weights fetch --source "$HERD_MODEL_SOURCE" --dest "$dest" --json
ok "weights fetched into $dest"
