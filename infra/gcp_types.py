"""GCP names behind each A2/A3 machine type: its accelerator type and regional GPU quota metric.

Source: GCP "GPU machine types" and "GPU quotas" docs (read 2025-11). The GPUs are part of these
machine types; the accelerator type names them for the zone check and the instance's guest
accelerators. Spot VMs count against the PREEMPTIBLE_ metric.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GcpGpuType:
    accelerator_type: str
    quota_metric: str
    boot_disk_type: str       # A3 Mega/Ultra boot from Hyperdisk only


GPU_TYPES = {
    "a2-highgpu-8g": GcpGpuType("nvidia-tesla-a100", "NVIDIA_A100_GPUS", "pd-ssd"),
    "a2-ultragpu-8g": GcpGpuType("nvidia-a100-80gb", "NVIDIA_A100_80GB_GPUS", "pd-ssd"),
    "a3-highgpu-8g": GcpGpuType("nvidia-h100-80gb", "NVIDIA_H100_GPUS", "pd-ssd"),
    "a3-megagpu-8g": GcpGpuType("nvidia-h100-mega-80gb", "NVIDIA_H100_MEGA_GPUS", "hyperdisk-balanced"),
    "a3-ultragpu-8g": GcpGpuType("nvidia-h200-141gb", "NVIDIA_H200_GPUS", "hyperdisk-balanced"),
}


def gpu_type(machine_type: str) -> GcpGpuType:
    if machine_type not in GPU_TYPES:
        raise KeyError(f"gcp.machine_type: {machine_type!r}: no GPU type known (allowed: {', '.join(GPU_TYPES)})")
    return GPU_TYPES[machine_type]


def quota_metric(machine_type: str, spot: bool) -> str:
    metric = gpu_type(machine_type).quota_metric
    return f"PREEMPTIBLE_{metric}" if spot else metric


def region_of(zone: str) -> str:
    return zone.rsplit("-", 1)[0]
