#!/usr/bin/env bash
# Fabric manager: required on NVSwitch systems (HGX A100/H100/H200) or the GPUs cannot talk.
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"
gpu_mode || skip "cpu-only host"
[ "${HERD_NVSWITCH:-0}" = 1 ] || skip "no NVSwitch"
BRANCH=${HERD_DRIVER_BRANCH:-570}
if systemctl is-active --quiet nvidia-fabricmanager 2>/dev/null; then ok "fabric manager running"; fi
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "nvidia-fabricmanager-${BRANCH}"
as_root systemctl enable --now nvidia-fabricmanager
ok "fabric manager ${BRANCH}"
