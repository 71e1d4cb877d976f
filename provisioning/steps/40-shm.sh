#!/usr/bin/env bash
# /dev/shm large enough for NCCL and the engines' shared-memory queues.
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"
want=${HERD_SHM_GB:-1}
have=$(df -P -BG /dev/shm | awk 'NR==2 {gsub("G","",$2); print $2}')
[ "$have" -ge "$want" ] && ok "/dev/shm ${have}GB >= ${want}GB"
as_root mount -o "remount,size=${want}G" /dev/shm
ok "/dev/shm resized to ${want}GB"
