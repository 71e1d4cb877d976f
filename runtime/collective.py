"""A quick all-reduce across every rank, reporting bus bandwidth (`torchrun ... -m runtime.collective`).

Used by the GPU health step: NCCL on GPUs (NVLink/NVSwitch within a node, EFA/TCPX across), gloo on
CPU. Bus bandwidth = algorithm bandwidth x 2(n-1)/n, the figure nccl-tests reports.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist


def main() -> int:
    size_mb = int(os.environ.get("HERD_COLLECTIVE_MB", "64"))
    iters = int(os.environ.get("HERD_COLLECTIVE_ITERS", "10"))
    gpu = torch.cuda.is_available()
    dist.init_process_group("nccl" if gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    data = torch.ones(size_mb * 2**20 // 4, dtype=torch.float32, device=device)
    dist.all_reduce(data)  # warm-up, and a correctness check below
    expected = float(world)
    ok = bool(torch.all(data == expected))
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    sync()
    started = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(data)
    sync()
    seconds = (time.perf_counter() - started) / iters
    algbw = data.numel() * 4 / seconds
    busbw = algbw * 2 * (world - 1) / world
    if rank == 0:
        print(json.dumps({"ranks": world, "backend": "nccl" if gpu else "gloo", "bytes": data.numel() * 4,
                          "correct": ok, "busbw_GBps": round(busbw / 1e9, 3)}))
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
