#!/usr/bin/env bash
# The model weights: verified against their manifest; fetched (resumably) when not uploaded.
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"
dest=${HERD_MODEL_DIR:?HERD_MODEL_DIR must name the model directory}
herd="$HERD_HOME/venv/bin/herd"
if [ -f "$dest/herd-manifest.json" ] && "$herd" weights verify "$dest" >/dev/null 2>&1; then
  ok "weights verified in $dest"
fi
[ -n "${HERD_MODEL_SOURCE:-}" ] || fail "weights in $dest are missing or corrupt and no source is set"
run "$herd" weights fetch --source "$HERD_MODEL_SOURCE" --dest "$dest" --json
ok "weights fetched into $dest"
