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

# bundle_pip VENV WHEELS ARGS...: `pip install ARGS` from the uploaded wheels. With HERD_PIP_OFFLINE=1
# the bundle holds every dependency: no index at all, and pip's configuration files and PIP_*
# variables are ignored (PIP_CONFIG_FILE=/dev/null, --isolated), so a find-links folder or an index
# set on the host cannot add a candidate either. Otherwise (cloud nodes) ARGS name files by path with
# --no-deps: the dependencies come from a lock (locked_pip), never from an index by name alone.
bundle_pip() {
  local venv=$1 wheels=$2
  shift 2
  if [ "${HERD_PIP_OFFLINE:-0}" = 1 ]; then
    run env PIP_CONFIG_FILE=/dev/null "$venv/bin/pip" --isolated install -q --disable-pip-version-check \
      --no-index --find-links "$wheels" "$@"
  else
    run "$venv/bin/pip" install -q --disable-pip-version-check --no-index --no-deps "$@"
  fi
}

# locked_pip VENV LOCK ARGS...: exactly the packages LOCK pins, from the host's package index (or the
# mirror its pip configuration names), in pip's hash-checking mode: a file whose sha256 LOCK does not
# list is refused whichever index served it, and --no-deps means nothing LOCK does not name is
# installed (`pip check` afterwards proves the set complete). ARGS: --only-binary :all: where every
# package has wheels, so no package's build code runs on the node.
locked_pip() {
  local venv=$1 lock=$2
  shift 2
  [ -f "$lock" ] || [ "$DRY_RUN" = 1 ] || fail "no dependency lock at $lock (the node bundle carries it)"
  run "$venv/bin/pip" install -q --disable-pip-version-check --require-hashes --no-deps "$@" -r "$lock"
}

# install_herd VENV WHEELS VERSION: herd from its own wheel in WHEELS, named by its path and never as
# `herd==VERSION`: the name `herd` on the public package index belongs to an unrelated project, and a
# requirement by name lets pip take whichever source offers the best match (a higher version in any
# find-links folder or index). A path is the only candidate pip considers for it; the dependencies
# come as bundle_pip says.
install_herd() {
  local venv=$1 wheels=$2 want=$3 wheel found=()
  shift 3
  if [ -d "$wheels" ]; then
    for wheel in "$wheels/herd-$want-"*.whl; do [ -f "$wheel" ] && found+=("$wheel"); done
  fi
  if [ "${#found[@]}" -eq 0 ] && [ "$DRY_RUN" = 1 ]; then
    found=("$wheels/herd-$want-py3-none-any.whl")   # a dry run describes a host before the upload
  fi
  [ "${#found[@]}" -eq 1 ] ||
    fail "expected one herd-$want-*.whl in $wheels, found ${#found[@]} (the installer uploads it)"
  bundle_pip "$venv" "$wheels" "${found[0]}" "$@"
}

# Venvs switched by a link: NAME-DIGEST holds one dependency set; $HERD_HOME/NAME links the one in use.
# current NAME DIGEST: the link NAME already names a complete NAME-DIGEST.
current() { [ "$(readlink "$HERD_HOME/$1" 2>/dev/null)" = "$1-$2" ] && [ -f "$HERD_HOME/$1-$2/.herd-complete" ]; }

# switch NAME DIGEST: point the link NAME at NAME-DIGEST (a rename over the link: atomic); a real
# folder of an older herd moves aside first. The venv the link named before stays, older ones go.
switch() {
  local name=$1 digest=$2 link="$HERD_HOME/$1" previous old
  previous=$(readlink "$link" 2>/dev/null || true)
  if [ -d "$link" ] && [ ! -L "$link" ]; then
    run rm -rf "$link-unlinked"
    run mv "$link" "$link-unlinked"
  fi
  run ln -sfn "$name-$digest" "$link.link"
  run mv -T "$link.link" "$link"
  for old in "$link"-*; do
    [ -d "$old" ] || continue
    case "$(basename "$old")" in "$name-$digest" | "$previous") ;; *) run rm -rf "$old" ;; esac
  done
}
