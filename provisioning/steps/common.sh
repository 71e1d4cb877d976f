#!/usr/bin/env bash
# Shared by every step: dry-run aware execution and one-line status reports.
# A step is idempotent: it checks, acts only when the check fails, then verifies.
set -euo pipefail

HERD_HOME=${HERD_HOME:-/opt/herd}
DRY_RUN=${HERD_DRY_RUN:-0}
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
STEP=$(basename "$0" .sh)

say()  { printf '%s: %s\n' "$STEP" "$*"; }
ok()   { say "ok: $*"; exit 0; }
skip() { say "skip: $*"; exit 0; }
fail() { say "FAILED: $*" >&2; exit 1; }

# run CMD...: execute, or print what would run (the exact command line) in dry-run mode.
run() {
  if [ "$DRY_RUN" = 1 ]; then
    printf '%s: would run: %s\n' "$STEP" "$*"
  else
    "$@"
  fi
}

# as_root CMD...: run with root rights (sudo -n when not root; fails clearly without sudo).
as_root() {
  if [ "$(id -u)" = 0 ]; then run "$@"
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then run sudo -n "$@"
  else fail "needs root or passwordless sudo for: $*"
  fi
}

gpu_mode() { [ "${HERD_GPU:-0}" = 1 ]; }
# The OS description (a host description in dry runs; /etc/os-release otherwise).
OS_RELEASE=${HERD_OS_RELEASE:-/etc/os-release}
export OS_RELEASE
