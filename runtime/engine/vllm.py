"""Engine "vllm": the per-node `vllm serve` command and environment, composed from the spec and plan.

vLLM listens on loopback; herd's front (health, metrics, API key) faces clients on the serving port
and forwards the OpenAI API to it, so readiness means the same thing whatever the engine.
Multi-node: one pipeline stage per node, vLLM's own launcher (`--nnodes/--node-rank/--master-addr`,
`--headless` on the workers, the `mp` executor: no Ray cluster to manage).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from runtime.planning import catalog
from runtime.planning.planner import Plan
from runtime.planning.spec import Spec

VLLM_VERSION = "0.33.0"   # pinned: provisioning installs exactly this on GPU nodes
ENGINE_PORT = 8100        # vLLM's loopback port behind herd's front
MASTER_PORT = 29501


def vllm_executable() -> str:
    """`vllm` from the venv provisioning builds for it beside herd's own ($HERD_HOME/vllm-venv next to
    $HERD_HOME/venv: vLLM pins another torch than herd's runtime); `vllm` on PATH elsewhere."""
    beside = Path(sys.prefix).parent / "vllm-venv" / "bin" / "vllm"
    return str(beside) if beside.exists() else "vllm"


@dataclass(frozen=True)
class NodeLaunch:
    node_rank: int
    role: str                      # "head" (serves the API) | "worker" (headless)
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def shell(self) -> str:
        import shlex

        def value(v: str) -> str:
            # "${VAR}" placeholders must expand on the node (the secret never appears in the text).
            return f'"{v}"' if v.startswith("${") and v.endswith("}") else shlex.quote(v)
        env = " ".join(f"{k}={value(v)}" for k, v in sorted(self.env.items()))
        return f"{env} {shlex.join(self.argv)}".strip()


def _quantization_flags(spec: Spec) -> list[str]:
    q = spec.model.quantization
    if q == "none":
        return []
    model = None if spec.model.id.startswith("config:") else catalog.model(spec.model.id)
    if q == "fp8" and not (model and model.fp8_checkpoint):
        return ["--quantization", "fp8"]   # dynamic FP8 of a BF16 checkpoint
    # Pre-quantized checkpoints (Meta's FP8, compressed-tensors INT8/INT4) carry their scheme in
    # config.json; vLLM detects it, and a flag that disagrees would be refused.
    return []


def network_env(instance_id: str | None) -> dict[str, str]:
    """NCCL / libfabric settings for the instance's fabric (multi-GPU and multi-node)."""
    env = {"NCCL_DEBUG": "WARN"}
    if not instance_id:
        return env
    inst = catalog.instance(instance_id)
    if inst.fabric == "efa":
        # AWS EFA: NCCL over libfabric's EFA provider with GPUDirect RDMA (p4d/p4de/p5*).
        env.update({"FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": "1", "FI_EFA_FORK_SAFE": "1",
                    "NCCL_SOCKET_IFNAME": "^lo,docker", "NCCL_NET_GDR_LEVEL": "PHB"})
    elif inst.fabric.startswith("gpudirect"):
        # GCP A3: the GPUDirect-TCPX(O)/RDMA NCCL plugin installed by provisioning lives here.
        env.update({"NCCL_SOCKET_IFNAME": "eth0", "LD_LIBRARY_PATH": "/usr/local/nvidia/lib64",
                    "NCCL_CROSS_NIC": "0", "NCCL_NET_GDR_LEVEL": "PIX"})
    else:
        env["NCCL_SOCKET_IFNAME"] = "eth0"
    return env


def vllm_launch(spec: Spec, plan: Plan, model_dir: str, head_addr: str = "127.0.0.1",
                node_addrs: list[str] | None = None) -> list[NodeLaunch]:
    """One `vllm serve` per node of the plan."""
    name = spec.serving.served_model_name or spec.model.id
    kv = spec.model.kv_cache_dtype
    base = ["vllm", "serve", model_dir, "--served-model-name", name,
            "--tensor-parallel-size", str(plan.tensor_parallel),
            "--pipeline-parallel-size", str(plan.pipeline_parallel),
            "--max-model-len", str(spec.context.max_model_len),
            "--max-num-seqs", str(spec.context.concurrency),
            "--max-num-batched-tokens", str(spec.context.max_prefill_tokens),
            # The plan reserved weights + KV + overhead within this fraction of each GPU.
            "--gpu-memory-utilization", f"{spec.serving.gpu_memory_utilization:.2f}",
            "--dtype", spec.model.dtype,   # vLLM's own "auto" is the checkpoint's type, as herd's
            "--kv-cache-dtype", "auto" if kv in ("auto", spec.model.dtype) else kv,
            *_quantization_flags(spec),
            "--host", "127.0.0.1", "--port", str(ENGINE_PORT)]
    env = network_env(spec.instance_type)
    if spec.serving.api_key_env:
        # vLLM reads its key from VLLM_API_KEY: the secret stays out of argv (and out of `ps`).
        env["VLLM_API_KEY"] = "${" + spec.serving.api_key_env + "}"
    if plan.nodes == 1:
        return [NodeLaunch(0, "head", base, env)]
    launches = []
    for rank in range(plan.nodes):
        argv = [*base, "--distributed-executor-backend", "mp", "--nnodes", str(plan.nodes),
                "--node-rank", str(rank), "--master-addr", head_addr, "--master-port", str(MASTER_PORT)]
        node_env = dict(env)
        if node_addrs:
            node_env["VLLM_HOST_IP"] = node_addrs[rank]
        if rank:
            argv.append("--headless")
            node_env.pop("VLLM_API_KEY", None)   # workers serve no API
        launches.append(NodeLaunch(rank, "head" if rank == 0 else "worker", argv, node_env))
    return launches
