"""One tensor-parallel rank, started by torchrun: `python -m runtime.engine.worker`.

Every rank loads its shard; the driver rank (local rank 0 on the head node) receives requests from
the supervisor, shares each batch with the other ranks, and all ranks decode in lockstep.
Configuration comes from the environment the launcher sets (HERD_*), and torchrun's own variables.
One more is for tests only: HERD_TEST_STEP_DELAY_S, seconds the driver sleeps in each decode step,
makes a healthy group slow (the supervision tests load a busy group with it); unset, nothing sleeps.
"""
from __future__ import annotations

import datetime
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from runtime.engine import fused
from runtime.engine.decode import OnStep, Take, run_engine

log = logging.getLogger("herd.worker")


def _env(name: str, default: str | None = None) -> str:
    value = os.environ.get(name, default)
    if value is None:
        sys.exit(f"herd worker: {name} is not set (start workers with `herd serve`)")
    return value


def load_model(model_dir: str, dtype: torch.dtype, world: int, device: str = "cpu"):
    """This rank's shard on its device. Under tensor parallelism transformers places the shard on the
    device bound to LOCAL_RANK (set by `place`); alone, the whole model goes to `device`. On GPUs the
    shard's q/k/v and gate/up projections are then fused (runtime/engine/fused.py)."""
    from transformers.models.auto import AutoModelForCausalLM
    kwargs: dict[str, Any] = {"dtype": dtype}
    if world > 1:
        from transformers.distributed.configuration_utils import DistributedConfig
        kwargs["distributed_config"] = DistributedConfig(tp_size=world)
    elif device != "cpu":
        kwargs["device_map"] = device
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if fused.wanted(device):
        fused.fuse_projections(model)
    return model.eval()


def place(local_rank: int, world: int):
    """Bind this rank to its device and join the group: NCCL between GPUs, gloo between CPU ranks, and
    a gloo group for the driver's host-side payloads either way. Returns (placement, control group)."""
    from runtime.engine.placement import PlacementError, place_rank, visible_cuda_devices
    try:
        placement = place_rank(cuda_devices=visible_cuda_devices(), local_rank=local_rank, world=world,
                               want=os.environ.get("HERD_DEVICE", "auto"))
    except PlacementError as err:
        sys.exit(f"herd worker: {err}")
    device = torch.device(placement.device)
    if placement.on_cuda:
        torch.cuda.set_device(device)
    control: dist.ProcessGroup | None = None
    if world > 1:
        # Idle ranks wait in a broadcast between batches; the canary keeps that wait short, and a dead
        # peer breaks it at once (closed socket), so a long timeout only guards against true hangs.
        timeout = datetime.timedelta(minutes=30)
        dist.init_process_group(placement.backend, timeout=timeout,
                                device_id=device if placement.on_cuda else None)
        control = dist.group.WORLD
        if placement.control_backend != placement.backend:
            group = dist.new_group(backend=placement.control_backend, timeout=timeout)
            # new_group answers a rank outside the group with an int (NON_GROUP_MEMBER); this one has all.
            if not isinstance(group, dist.ProcessGroup):
                sys.exit(f"herd worker: rank not in the {placement.control_backend} control group")
            control = group
    log.info("rank on %s, collectives over %s", placement.device, placement.backend)
    return placement, control


def main() -> int:
    logging.basicConfig(level=logging.INFO, format=f"[rank {os.environ.get('RANK', '?')}] %(message)s")
    rank, world = int(_env("RANK", "0")), int(_env("WORLD_SIZE", "1"))
    local_rank = int(_env("LOCAL_RANK", "0"))
    from runtime.serving.supervisor import die_with_parent
    die_with_parent()  # if torchrun is killed outright, its ranks go with it
    state = Path(_env("HERD_STATE_DIR"))
    (state / "ranks").mkdir(parents=True, exist_ok=True)
    (state / "ranks" / f"{rank}.pid").write_text(str(os.getpid()))
    threads = os.environ.get("HERD_THREADS")
    if threads:
        torch.set_num_threads(int(threads))

    placement, control = place(local_rank, world)
    wants_driver = os.environ.get("HERD_HEAD") == "1" and local_rank == 0
    driver_rank = _agree_on_driver(rank, world, wants_driver, control)
    is_driver = rank == driver_rank
    channel = None   # the driver's line to the supervisor; other ranks have none
    if is_driver:
        from runtime.engine.control import DriverChannel
        channel = DriverChannel(_env("HERD_CONTROL"), _env("HERD_CONTROL_TOKEN"))
        channel.send({"type": "loading", "loaded": 0, "world": world})

    started = time.monotonic()
    store = dist.distributed_c10d._get_default_store() if world > 1 else None
    if channel is not None and store is not None:
        _report_loading(store, channel, world)
    read_before = _disk_read_bytes()
    from runtime.planning import dtypes
    dtype = dtypes.resolve(_env("HERD_DTYPE", "auto"), checkpoint=dtypes.checkpoint_dtype(_env("HERD_MODEL_DIR")),
                           on_gpu=placement.on_cuda, tensor_parallel=world)
    log.info("loading in %s", dtype)
    model = load_model(_env("HERD_MODEL_DIR"), getattr(torch, dtype), world, placement.device)
    load = {"rank": rank, "dtype": dtype, "seconds": round(time.monotonic() - started, 2),
            "disk_read_bytes": _disk_read_bytes() - read_before, "shard_bytes": _shard_bytes(model)}
    log.info("shard loaded in %.1fs: %d parameter bytes here, %d bytes read from disk", load["seconds"],
             load["shard_bytes"], load["disk_read_bytes"])
    if store is not None:
        store.add("herd/loaded", 1)
        threading.Thread(target=_heartbeat, args=(store, rank), daemon=True, name="herd-heartbeat").start()
        dist.barrier(group=control)
        if channel is not None:
            threading.Thread(target=_watch_heartbeats, args=(store, world, channel), daemon=True,
                             name="herd-heartbeat-watch").start()
    loads = [load]
    if world > 1:
        loads = [None] * world
        dist.all_gather_object(loads, load, group=control)
    if channel is not None:
        channel.send({"type": "loaded", "world": world, "loads": loads})

    max_batch = int(_env("HERD_MAX_BATCH", "8"))
    window = float(_env("HERD_BATCH_WINDOW_S", "0.005"))
    pad_id = int(_env("HERD_PAD_ID", "0"))
    share, share_object = sharing(world, driver_rank, control)

    take: Take | None = None
    on_step: OnStep | None = None
    if channel is not None:
        def take_rows(limit, block):
            rows = channel.take(limit, block, window)
            if rows:
                channel.send({"type": "batch", "size": len(rows)})
            return rows
        delay_s = float(os.environ.get("HERD_TEST_STEP_DELAY_S") or 0)   # tests only: see the docstring
        take, on_step = take_rows, _slowed(_streamer(channel), delay_s)
    batch = None
    if os.environ.get("HERD_DECODE") == "static":
        from runtime.engine.static_batch import StaticBatch
        batch = StaticBatch(model, pad_id, max_len=int(_env("HERD_MAX_MODEL_LEN", "2048")))
    # One rank with a graph-captured static batch: the host's work overlaps the next step. Under
    # tensor parallelism every rank needs the ids from the driver's payload first.
    overlap = world == 1 and getattr(batch, "overlaps_host", False)
    run_engine(model, is_driver=is_driver, share=share, share_object=share_object, max_batch=max_batch,
               take=take, on_step=on_step, pad_id=pad_id, batch=batch, overlap=overlap)
    if world > 1:
        dist.destroy_process_group()
    return 0


def sharing(world: int, driver_rank: int, group):
    """The driver's per-step payload to every rank: (share(tensor) in place, share_object(obj) -> obj),
    over the control group; identities when there is one rank."""
    if world == 1:
        return (lambda t: None), (lambda obj: obj)

    def share(t):
        dist.broadcast(t, src=driver_rank, group=group)

    def share_object(obj):
        box = [obj]
        dist.broadcast_object_list(box, src=driver_rank, group=group)
        return box[0]
    return share, share_object


HEARTBEAT_S, HEARTBEAT_LOST_S = 0.5, 2.5


def _heartbeat(store, rank: int) -> None:
    """Every rank, every 0.5 s: a counter in the rendezvous store. An idle group runs no collective,
    so without this a rank dying on another host would go unnoticed until the next request."""
    while True:
        try:
            store.add(f"herd/heartbeat/{rank}", 1)
        except Exception:  # the store (head) is gone: the group is ending anyway
            return
        time.sleep(HEARTBEAT_S)


def _watch_heartbeats(store, world: int, channel) -> None:
    """On the driver: tell the supervisor when any rank's counter stops moving."""
    seen = {rank: (-1, time.monotonic()) for rank in range(world)}
    last_tick = time.monotonic()
    while True:
        time.sleep(HEARTBEAT_S)
        now = time.monotonic()
        if now - last_tick > HEARTBEAT_LOST_S / 2:
            # This process was paused itself (SIGSTOP, swapping): it cannot tell who stopped beating
            # meanwhile (its own beat paused too), and blaming a rank would restart a group that has
            # just resumed. Start the clocks over; the supervisor's canary judges the pause. Half the
            # limit: a shorter pause cannot make a healthy rank look silent for the whole limit.
            seen = {rank: (count, now) for rank, (count, _) in seen.items()}
        last_tick = now
        for rank in range(world):
            try:
                count = store.add(f"herd/heartbeat/{rank}", 0)
            except Exception:
                return
            if count != seen[rank][0]:
                seen[rank] = (count, now)
            elif now - seen[rank][1] > HEARTBEAT_LOST_S:
                channel.send({"type": "rank_lost", "rank": rank,
                              "seconds": round(now - seen[rank][1], 1)})
                return


def _disk_read_bytes() -> int:
    """Bytes this process caused to be read from storage (page-cache hits do not count)."""
    try:
        for line in open("/proc/self/io"):
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _shard_bytes(model) -> int:
    """Parameter bytes held by this rank (its tensor-parallel shard; DTensors count their local part)."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


def _agree_on_driver(rank: int, world: int, wants: bool, group) -> int:
    if world == 1:
        return 0
    flags: list[bool | None] = [None] * world
    dist.all_gather_object(flags, wants, group=group)
    return flags.index(True) if True in flags else 0


def _report_loading(store, channel, world: int) -> None:
    """Tell the supervisor how many ranks have their shard, as they finish (the c10d store counts)."""
    import threading

    def poll():
        seen = -1
        while seen < world:
            loaded = store.add("herd/loaded", 0)
            if loaded != seen:
                channel.send({"type": "loading", "loaded": loaded, "world": world})
                seen = loaded
            time.sleep(0.2)
    threading.Thread(target=poll, daemon=True, name="herd-loading").start()


def _slowed(on_step: OnStep, delay_s: float) -> OnStep:
    """Test only (HERD_TEST_STEP_DELAY_S): every step takes `delay_s` longer, on every rank alike (they
    wait for the driver's next payload). Busy but healthy: tokens keep coming, slowly."""
    if delay_s <= 0:
        return on_step

    def slow_step(events):
        time.sleep(delay_s)
        return on_step(events)
    return slow_step


def _streamer(channel):
    from runtime.engine.decode import ERROR, FINISH_REASONS, RUNNING

    def on_step(events):
        for row_id, token, state, logprobs in events:
            if state == ERROR:   # this row alone failed; `logprobs` holds the reason
                channel.send({"type": "error", "id": row_id, "message": str(logprobs)})
                continue
            if token is not None:
                message = {"type": "token", "id": row_id, "token": token}
                if logprobs is not None:
                    message["logprob"], message["top"] = logprobs
                channel.send(message)
            if state != RUNNING:
                channel.send({"type": "done", "id": row_id, "finish_reason": FINISH_REASONS[state]})
        return set(channel.cancelled)
    return on_step


if __name__ == "__main__":
    sys.exit(main())
