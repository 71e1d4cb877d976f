#!/usr/bin/env bash
# GPU health: driver loaded, the expected GPU count, no ECC or XID errors, and a quick collective
# across this node's GPUs reporting bus bandwidth.
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"
gpu_mode || skip "cpu-only host"
want=${HERD_GPUS:-8}
if [ "$DRY_RUN" = 1 ]; then
  run nvidia-smi --query-gpu=index,name,ecc.errors.uncorrected.volatile.total --format=csv,noheader
  run "$HERD_HOME/venv/bin/python" -m torch.distributed.run --nproc-per-node="$want" -m runtime.collective
  exit 0
fi
lsmod | grep -q '^nvidia ' || fail "nvidia kernel module not loaded"
gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
[ "$gpus" -eq "$want" ] || fail "found $gpus GPUs, expected $want"
ecc=$(nvidia-smi --query-gpu=ecc.errors.uncorrected.volatile.total --format=csv,noheader | grep -cv '^0$' || true)
[ "$ecc" -eq 0 ] || fail "$ecc GPU(s) report uncorrected ECC errors"
if dmesg 2>/dev/null | grep -q 'NVRM: Xid'; then fail "XID errors in the kernel log: $(dmesg | grep 'NVRM: Xid' | tail -1)"; fi
"$HERD_HOME/venv/bin/python" -m torch.distributed.run --nproc-per-node="$want" -m runtime.collective
ok "$gpus GPUs healthy"
