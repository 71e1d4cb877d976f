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
# vLLM, where the spec selects it, gets a venv of its own in the next step (55-vllm).
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

if current venv "$digest"; then
  ok "herd $want installed ($venv -> venv-$digest)"
fi

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

ok "herd $want in $venv -> venv-$digest"
