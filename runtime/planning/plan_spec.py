"""From a deployment spec (or CLI flags) to a planner request: which hardware one node is."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, replace

from runtime.planning import catalog
from runtime.planning.planner import Hardware, PlanRequest
from runtime.planning.spec import Spec, resolve_architecture


@dataclass(frozen=True)
class HostFacts:
    """What the planner needs to know about this machine for the local target (measured by the CLI)."""
    ram_bytes: int
    free_disk_bytes: int
    cpus: int

    @classmethod
    def measure(cls, path: str = ".") -> HostFacts:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return cls(ram_bytes=ram, free_disk_bytes=shutil.disk_usage(path).free, cpus=os.cpu_count() or 1)


# A TPU VM's 100 GiB boot disk, less the OS image, herd's venv and vLLM's (about 20 GiB).
TPU_BOOT_DISK_FREE_BYTES = 80 * 2**30


def hardware_for(spec: Spec, host: HostFacts | None = None) -> Hardware:
    section = spec.target_section
    if spec.target == "aws":
        return Hardware.from_instance(section.instance_type, "aws.instance_type")
    if spec.target == "gcp":
        hw = Hardware.from_instance(section.machine_type, "gcp.machine_type")
        if hw.accelerator.is_tpu:
            inst = catalog.instance(section.machine_type)
            if section.spot and inst.spot_price_usd_per_hour is not None:
                hw = replace(hw, price_usd_per_hour=inst.spot_price_usd_per_hour)
            if not section.weights_disk:
                # The weights go on the TPU VM's boot disk, beside the OS and both venvs.
                hw = replace(hw, disk_bytes=TPU_BOOT_DISK_FREE_BYTES)
        return hw
    if spec.target == "onprem":
        gib = 2**30
        cpu_only = section.gpus_per_host == 0
        return Hardware(
            accelerator=catalog.accelerator("cpu" if cpu_only else section.accelerator),
            devices_per_node=section.gpus_per_host or section.cpu_ranks_per_host,
            host_ram_bytes=int(section.host_ram_gib * gib) if section.host_ram_gib else None,
            disk_bytes=int(section.disk_gib * gib) if section.disk_gib else None,
            # Each replica is its own group of hosts: a group may use at most its share of the list.
            max_nodes=max(1, len(section.hosts) // spec.replicas), hosts=len(section.hosts))
    host = host or HostFacts.measure()
    # Local replicas share this machine: each group plans with its share of the RAM and of the cores
    # (the weights on disk are one copy for all).
    cores = max(1, host.cpus // spec.replicas)
    return Hardware(accelerator=catalog.accelerator("cpu"), devices_per_node=_ranks(spec, cores),
                    host_ram_bytes=host.ram_bytes // spec.replicas, disk_bytes=host.free_disk_bytes, max_nodes=1,
                    cpu_cores=cores)


def _ranks(spec: Spec, default: int) -> int:
    local = spec.local
    if local is not None and local.ranks:
        return local.ranks
    tensor = spec.parallelism.tensor
    return tensor if tensor != "auto" else default


def _planned_dtype(spec: Spec, hw: Hardware) -> str:
    """`auto` before the weights are here: catalog checkpoints are bf16 (what GPUs then run); a CPU
    runs bf16 only where it computes it natively (this host's flags: CPU plans are for this host)."""
    from runtime.planning import dtypes
    from runtime.planning.planner import auto_tensor
    tensor = spec.parallelism.tensor
    ranks = tensor if tensor != "auto" else (auto_tensor(resolve_architecture(spec.model), hw)
                                             if not hw.accelerator.is_gpu else 1)
    return dtypes.resolve(spec.model.dtype, checkpoint="bfloat16", on_gpu=hw.accelerator.is_gpu,
                          tensor_parallel=ranks)


def request_from_spec(spec: Spec, host: HostFacts | None = None) -> PlanRequest:
    model = None if spec.model.id.startswith("config:") else catalog.model(spec.model.id)
    hw = hardware_for(spec, host)
    return PlanRequest(
        architecture=resolve_architecture(spec.model), hardware=hw,
        model_id=spec.model.id, dtype=_planned_dtype(spec, hw), quantization=spec.model.quantization,
        kv_cache_dtype=spec.model.kv_cache_dtype, max_model_len=spec.context.max_model_len,
        concurrency=spec.context.concurrency, max_prefill_tokens=spec.context.max_prefill_tokens,
        tensor=spec.parallelism.tensor, pipeline=spec.parallelism.pipeline, nodes=spec.parallelism.nodes,
        memory_utilization=spec.serving.gpu_memory_utilization, engine=spec.serving.engine,
        fp8_checkpoint=model.fp8_checkpoint if model else None, replicas=spec.replicas,
        lora_slots=len(spec.model.adapters), lora_rank=spec.model.lora_rank,
        guard_bytes=guard_plan(spec, hw).per_gpu_bytes.total if served_guard(spec) else 0)


def served_guard(spec: Spec):
    """serving.guard when herd serves it (a second vLLM on the head), else None."""
    guard = spec.serving.guard
    return guard if guard is not None and guard.served_here else None


def guard_plan(spec: Spec, hw: Hardware | None = None):
    """The guard herd serves, planned alone on one of the head's devices: its weights at the served
    model's dtype, a KV cache for the spec's concurrency at the guard's context, its overhead. The
    served model's plan counts the total; the guard's vLLM is sized from it."""
    from runtime.planning.planner import plan
    guard = served_guard(spec)
    assert guard is not None
    hw = hw or hardware_for(spec)
    request = PlanRequest(architecture=resolve_architecture(guard.model_section, "serving.guard.model"),
                          hardware=hw, model_id=guard.model_section.id, dtype=_planned_dtype(spec, hw),
                          max_model_len=guard.max_model_len, concurrency=spec.context.concurrency,
                          max_prefill_tokens=guard.max_model_len, tensor=1, pipeline=1, nodes=1,
                          memory_utilization=1.0, engine="vllm")
    return plan(request, suggest=False)


def replica_hosts(spec: Spec, plan) -> list[list]:
    """On-prem: the hosts of each replica, in spec order: replica r is hosts[r*nodes:(r+1)*nodes]; its
    first host is the replica's head (the one serving HTTP)."""
    hosts, n = spec.onprem_section.hosts, plan.nodes
    return [list(hosts[r * n:(r + 1) * n]) for r in range(spec.replicas)]
