#!/usr/bin/env bash
# The NCCL / libfabric environment for this fabric, in one file the service reads.
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"
gpu_mode || skip "cpu-only host"
want=$(printf '%s\n' "${HERD_NCCL_ENV:-NCCL_DEBUG=WARN}" | tr ' ' '\n' | sort)
file="$HERD_HOME/nccl.env"
if [ -f "$file" ] && [ "$(sort "$file")" = "$want" ]; then ok "$file up to date"; fi
if [ "$DRY_RUN" = 1 ]; then say "would write $file: $(echo "$want" | tr '\n' ' ')"; exit 0; fi
printf '%s\n' "$want" > "$file"
ok "wrote $file"
