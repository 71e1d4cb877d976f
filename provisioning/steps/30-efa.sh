#!/usr/bin/env bash
# AWS EFA: the EFA installer (libfabric, the EFA kernel module, aws-ofi-nccl) on p4d/p4de/p5*.
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"
gpu_mode || skip "cpu-only host"
[ "${HERD_CLOUD:-}" = aws ] || skip "not on AWS"
if command -v fi_info >/dev/null && fi_info -p efa >/dev/null 2>&1; then ok "EFA provider present"; fi
VERSION=${HERD_EFA_VERSION:-1.38.0}
tmp=${TMPDIR:-/tmp}/herd-efa
run mkdir -p "$tmp"
run curl -fsSL -o "$tmp/efa.tar.gz" "https://efa-installer.amazonaws.com/aws-efa-installer-${VERSION}.tar.gz"
run tar -xzf "$tmp/efa.tar.gz" -C "$tmp"
as_root bash -c "cd '$tmp/aws-efa-installer' && ./efa_installer.sh -y"
[ "$DRY_RUN" = 1 ] || fi_info -p efa >/dev/null || fail "EFA installed but fi_info finds no efa provider"
ok "EFA ${VERSION}"
