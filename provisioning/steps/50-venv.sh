#!/usr/bin/env bash
# herd's runtime in its own venv: herd always from its uploaded wheel, by path (install_herd in
# common.sh), with --no-deps; its dependencies either from the uploaded bundle without any index
# (HERD_PIP_OFFLINE=1: on-prem hosts get every dependency as a wheel and usually cannot reach an
# index) or, on cloud nodes, exactly the set pinned in the bundle's lock (wheels/node-lock.txt), each
# file checked against its sha256 (locked_pip). `pip check` then proves herd's requirements are met.
#
# Each dependency set gets its own venv, venv-<digest of what defines it>, and $HERD_HOME/venv is a
# symlink switched to it only once it works: a failed install leaves the running venv untouched, and
# a changed lock or bundle (same herd version, new dependencies) builds a new venv instead of
# keeping a stale one. The previous venv stays (the running service may still use it); older go.
#
# On GPU hosts whose spec selects vLLM: vLLM in a venv of its own (vllm-venv) from its own lock
# (wheels/vllm-lock.txt): vLLM pins another torch than herd's runtime, and one venv cannot hold both.
# The runtime finds it beside its own venv (runtime/engine/vllm.py: vllm_executable).
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"
wheels="$HERD_HOME/wheels"
want=${HERD_VERSION:?HERD_VERSION must name the herd version to install}
PY=${HERD_PYTHON:-python3}
offline=${HERD_PIP_OFFLINE:-0}

# What defines the venv: herd's version, and the lock (cloud) or the bundle's file names (offline).
if [ "$offline" = 1 ]; then
  defines=$(ls "$wheels" 2>/dev/null || true)
else
  defines=$(cat "$wheels/node-lock.txt" 2>/dev/null || true)
fi
digest=$(printf '%s\n%s\n' "$want" "$defines" | sha256sum | cut -c1-12)
venv="$HERD_HOME/venv"

vllm_wanted() { gpu_mode && [ "${HERD_ENGINE:-}" = vllm ]; }
vllm_digest=$( (echo "${HERD_VLLM_VERSION:-}"; cat "$wheels/vllm-lock.txt" 2>/dev/null || true) | sha256sum | cut -c1-12)

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

if current venv "$digest" && { ! vllm_wanted || current vllm-venv "$vllm_digest"; }; then
  ok "herd $want installed ($venv -> venv-$digest)"
fi

if ! current venv "$digest"; then
  target="$HERD_HOME/venv-$digest"
  run rm -rf "$target"
  run "$PY" -m venv "$target"
  if [ "$offline" = 1 ]; then
    install_herd "$target" "$wheels" "$want"
  else
    locked_pip "$target" "$wheels/node-lock.txt" --only-binary :all:
    install_herd "$target" "$wheels" "$want" --no-deps
  fi
  run "$target/bin/pip" check -q --disable-pip-version-check >/dev/null ||
    fail "herd's dependencies in $target are incomplete or conflicting ($("$target/bin/pip" check 2>&1 | head -1))"
  [ "$DRY_RUN" = 1 ] || "$target/bin/herd" --help >/dev/null || fail "herd does not start from $target"
  run touch "$target/.herd-complete"
  switch venv "$digest"
fi

if vllm_wanted && ! current vllm-venv "$vllm_digest"; then
  target="$HERD_HOME/vllm-venv-$vllm_digest"
  run rm -rf "$target"
  run "$PY" -m venv "$target"
  # --prefer-binary, not --only-binary: a few of vLLM's pins exist only as source (their hashes are
  # pinned all the same).
  locked_pip "$target" "$wheels/vllm-lock.txt" --prefer-binary
  [ "$DRY_RUN" = 1 ] || [ "$("$target/bin/python" -c 'import importlib.metadata as m; print(m.version("vllm"))')" = \
    "${HERD_VLLM_VERSION:?}" ] || fail "$target: vllm is not ${HERD_VLLM_VERSION} (the lock and the pin disagree)"
  run touch "$target/.herd-complete"
  switch vllm-venv "$vllm_digest"
fi
ok "herd $want in $venv -> venv-$digest"
