"""Where one rank computes and how the ranks talk: decided once, from facts a test can set on CPU.

A GPU node runs each rank on its own device (`cuda:LOCAL_RANK`) with NCCL between devices; a CPU host
runs every rank on the host with gloo. The driver's small per-step payloads (token ids, stop states,
new rows) are host objects, so they travel on a gloo group in both cases: NCCL would need them copied
to the device and back for nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

DEVICE_CHOICES = ("auto", "cuda", "cpu")


class PlacementError(ValueError):
    """A rank cannot be placed as asked (no GPU for it, or the ask is not a known device)."""


@dataclass(frozen=True)
class Placement:
    device: str            # "cpu" or "cuda:N"
    backend: str           # the tensor-parallel collectives: "nccl" on GPUs, "gloo" on CPUs
    control_backend: str   # the driver's payloads: always "gloo" (host memory)

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def device_index(self) -> int | None:
        return int(self.device.split(":")[1]) if self.on_cuda else None


def place_rank(*, cuda_devices: int, local_rank: int, world: int, want: str = "auto") -> Placement:
    """`cuda_devices`: how many CUDA devices this process sees; `want`: HERD_DEVICE (auto, cuda, cpu)."""
    if want not in DEVICE_CHOICES:
        raise PlacementError(f"HERD_DEVICE={want!r}: allowed values are {', '.join(DEVICE_CHOICES)}")
    if local_rank < 0 or world < 1:
        raise PlacementError(f"LOCAL_RANK={local_rank}, WORLD_SIZE={world}: need LOCAL_RANK >= 0 and WORLD_SIZE >= 1")
    use_cuda = cuda_devices > 0 if want == "auto" else want == "cuda"
    if not use_cuda:
        return Placement(device="cpu", backend="gloo", control_backend="gloo")
    if cuda_devices == 0:
        raise PlacementError("HERD_DEVICE=cuda: this host has no CUDA device visible to the rank "
                             "(check the driver and CUDA_VISIBLE_DEVICES)")
    if local_rank >= cuda_devices:
        raise PlacementError(f"LOCAL_RANK={local_rank}: this host has {cuda_devices} CUDA device(s) visible, "
                             f"so at most {cuda_devices} rank(s) per node (lower tensor_parallel or nproc-per-node)")
    return Placement(device=f"cuda:{local_rank}", backend="nccl", control_backend="gloo")


def visible_cuda_devices() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0
