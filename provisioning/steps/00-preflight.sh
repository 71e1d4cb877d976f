#!/usr/bin/env bash
# Host facts against the plan: OS, kernel, CPUs, RAM, disk, GPUs, NVSwitch.
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"
# shellcheck source=/dev/null
. "$OS_RELEASE"
cpus=$(nproc)
ram_gb=$(awk '/MemTotal/ {printf "%d", $2/1024/1024}' /proc/meminfo)
mkdir -p "$HERD_HOME"
disk_gb=$(df -P -BG "$HERD_HOME" | awk 'NR==2 {gsub("G","",$4); print $4}')
say "os=${ID}-${VERSION_ID:-?} kernel=$(uname -r) cpus=$cpus ram=${ram_gb}GB free_disk=${disk_gb}GB"
[ "$ram_gb" -ge "${HERD_MIN_RAM_GB:-1}" ] || fail "RAM ${ram_gb}GB < ${HERD_MIN_RAM_GB}GB the plan needs"
[ "$disk_gb" -ge "${HERD_MIN_DISK_GB:-1}" ] || fail "free disk ${disk_gb}GB on $HERD_HOME < ${HERD_MIN_DISK_GB}GB the weights need"
if gpu_mode; then
  command -v nvidia-smi >/dev/null || { say "no nvidia-smi yet (the driver step installs it)"; exit 0; }
  gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
  [ "$gpus" -eq "${HERD_GPUS:-8}" ] || fail "found $gpus GPUs, the plan needs ${HERD_GPUS:-8}"
  if lspci 2>/dev/null | grep -qi nvswitch; then say "NVSwitch present"; fi
  ok "GPUs: $gpus"
fi
ok "cpu-only host"
