#!/usr/bin/env bash
# Persistence mode: keeps the driver loaded between processes (faster starts, stable clocks).
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"
gpu_mode || skip "cpu-only host"
if [ "$DRY_RUN" = 0 ] && nvidia-smi --query-gpu=persistence_mode --format=csv,noheader | grep -qv Enabled; then :; fi
as_root nvidia-smi -pm 1
ok "persistence mode on"
