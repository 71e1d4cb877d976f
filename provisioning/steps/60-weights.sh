#!/usr/bin/env bash
# The model weights: verified against their manifest; fetched (resumably) when not uploaded. With LoRA
# adapters or a guard herd serves in the spec (HERD_EXTRA_WEIGHTS=1), `herd weights fetch` of the
# environment file fetches and checks them too, beside the model (what is already there and verified is
# reused).
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"
dest=${HERD_MODEL_DIR:?HERD_MODEL_DIR must name the model directory}
herd="$HERD_HOME/venv/bin/herd"
if [ "${HERD_WEIGHTS_DISK:-0}" = 1 ]; then
  # A TPU slice's weights disk (gcp.weights_disk), attached read-only to every host: its filesystem,
  # labelled herd-weights, holds the verified model directory at its root. Mounted here, checked, used.
  device=/dev/disk/by-label/herd-weights
  [ -e "$device" ] || [ "$DRY_RUN" = 1 ] || fail "no disk labelled herd-weights is attached (gcp.weights_disk: its filesystem needs the label herd-weights)"
  if ! mountpoint -q "$dest" 2>/dev/null; then
    run mkdir -p "$dest"
    as_root mount -o ro "$device" "$dest"
  fi
  [ "$DRY_RUN" = 1 ] || "$herd" weights verify "$dest" >/dev/null ||
    fail "the weights disk's copy in $dest does not match its manifest (it is read-only here: fix it where it is written)"
  ok "weights verified on the read-only weights disk at $dest"
fi
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
