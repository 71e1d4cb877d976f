#!/usr/bin/env bash
# NVIDIA driver from the distribution's packages (Ubuntu 22.04/24.04), pinned branch, DKMS,
# open kernel modules by default (required for H100/H200 with some features), proprietary on request.
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"
gpu_mode || skip "cpu-only host"
BRANCH=${HERD_DRIVER_BRANCH:-570}
FLAVOUR=${HERD_DRIVER_FLAVOUR:-open}   # open | proprietary
if command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=driver_version --format=csv,noheader | grep -q "^${BRANCH}\."; then
  ok "driver branch $BRANCH loaded"
fi
# shellcheck source=/dev/null
. "$OS_RELEASE"
case "${ID}-${VERSION_ID}" in ubuntu-22.04|ubuntu-24.04) ;; *) fail "driver step supports Ubuntu 22.04/24.04, found ${ID}-${VERSION_ID}";; esac
pkg="nvidia-driver-${BRANCH}-server"
[ "$FLAVOUR" = open ] && pkg="nvidia-driver-${BRANCH}-server-open"
as_root apt-get update -q
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$pkg" dkms "linux-headers-$(uname -r)"
as_root modprobe nvidia
[ "$DRY_RUN" = 1 ] || nvidia-smi >/dev/null || fail "driver installed but nvidia-smi fails (reboot needed?)"
ok "driver $pkg"
