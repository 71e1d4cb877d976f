"""The provisioning steps: which apply to a host, in what order, with what environment.

The steps themselves are the shell scripts in provisioning/steps/ (check, act, verify; `--dry-run`),
the same on every target: cloud-init runs them on AWS/GCP, the on-prem installer over SSH, the local
target in place. A step that succeeded records a stamp (its script and environment hashed) on the
host, so a rerun skips it, and a rerun after a failure resumes at the failed step.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from runtime import catalog
from runtime.engine.vllm import VLLM_VERSION, network_env
from runtime.planner import Plan
from runtime.spec import Spec

STEPS_DIR = Path(__file__).parent / "steps"
GPU_STEPS = ("10-nvidia-driver", "20-fabric-manager", "25-persistence", "30-efa", "35-nccl-env", "80-gpu-health")


def step_names() -> list[str]:
    return sorted(p.stem for p in STEPS_DIR.glob("[0-9][0-9]-*.sh"))


def herd_version() -> str:
    try:
        return importlib.metadata.version("herd")
    except importlib.metadata.PackageNotFoundError:
        return "0.1.0"


@dataclass(frozen=True)
class HostProfile:
    """What one host is and does in the deployment."""
    name: str
    address: str
    node_rank: int
    gpu: bool
    gpus: int
    cloud: str | None = None            # aws | gcp | None (on-prem)
    nvswitch: bool = False
    home: str = "/opt/herd"


@dataclass
class HostSteps:
    profile: HostProfile
    env: dict[str, str]
    steps: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)   # step -> why (cpu-only, ...)

    def stamp(self, step: str) -> str:
        """Changes when the step's script or its environment changes: then it runs again."""
        digest = hashlib.sha256((STEPS_DIR / f"{step}.sh").read_bytes())
        digest.update((STEPS_DIR / "common.sh").read_bytes())
        for key in sorted(self.env):
            digest.update(f"{key}={self.env[key]}\n".encode())
        return digest.hexdigest()[:16]

    def command(self, step: str, steps_dir: str, dry_run: bool = False) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return f"env {env} bash {shlex.quote(f'{steps_dir}/{step}.sh')}" + (" --dry-run" if dry_run else "")


def serve_args(spec: Spec, plan: Plan, profile: HostProfile, head_addr: str, env_file: str,
               model_dir: str) -> str:
    """`herd serve` arguments for this host: the rendezvous at the head, this node's role."""
    args = [env_file, "--model-dir", model_dir, "--tp", str(plan.gpus_per_node),
            "--state-dir", f"{profile.home}/state/serve"]
    if plan.nodes > 1:
        # --node-rank orders vLLM's nodes; torchrun's c10d rendezvous orders its own.
        args += ["--nnodes", str(plan.nodes), "--node-rank", str(profile.node_rank), "--rdzv-endpoint",
                 f"{head_addr}:29400", "--node-addr", profile.address,
                 "--role", "head" if profile.node_rank == 0 else "worker"]
    if spec.serving.api_key_env or spec.serving.api_key_file:
        # The key reaches the node as a 0600 file the installer writes; argv holds only its path.
        args += ["--api-key-file", f"{profile.home}/secrets/api-key"]
    return shlex.join(args)


def plan_host(spec: Spec, plan: Plan, profile: HostProfile, head_addr: str, model_dir: str,
              model_source: str | None, env_file: str) -> HostSteps:
    weights_gb = plan.weights_total_bytes / 1e9
    env = {
        "HERD_HOME": profile.home,
        "HERD_GPU": "1" if profile.gpu else "0",
        "HERD_GPUS": str(profile.gpus),
        "HERD_CLOUD": profile.cloud or "",
        "HERD_NVSWITCH": "1" if profile.nvswitch else "0",
        "HERD_VERSION": herd_version(),
        "HERD_ENGINE": spec.serving.engine,
        "HERD_VLLM_VERSION": VLLM_VERSION,
        "HERD_MODEL_DIR": model_dir,
        "HERD_MODEL_SOURCE": model_source or "",
        "HERD_MIN_DISK_GB": str(max(1, int(weights_gb * 1.1))),
        "HERD_MIN_RAM_GB": "1",
        "HERD_SHM_GB": "1" if not profile.gpu else "64",
        # On-prem hosts receive every dependency as wheels; cloud nodes reach the package index.
        "HERD_PIP_OFFLINE": "0" if profile.cloud else "1",
        "HERD_SERVE_ARGS": serve_args(spec, plan, profile, head_addr, env_file, model_dir),
    }
    if profile.gpu:
        env["HERD_NCCL_ENV"] = " ".join(f"{k}={v}" for k, v in network_env(spec.instance_type).items())
    steps, skipped = [], {}
    for step in step_names():
        if step in GPU_STEPS and not profile.gpu:
            skipped[step] = "cpu-only host"
        elif step == "30-efa" and profile.cloud != "aws":
            skipped[step] = "not on AWS"
        elif step == "20-fabric-manager" and not profile.nvswitch:
            skipped[step] = "no NVSwitch"
        else:
            steps.append(step)
    return HostSteps(profile, env, steps, skipped)


def profiles_for(spec: Spec, plan: Plan) -> list[HostProfile]:
    """One profile per node of the plan (on-prem: the first `nodes` hosts of the spec)."""
    section = spec.onprem
    gpu = section.gpus_per_host > 0
    acc = catalog.accelerator(section.accelerator) if gpu else None
    # HGX boards (8 x SXM) have NVSwitches; PCIe cards do not.
    nvswitch = bool(acc and section.gpus_per_host == 8 and acc.id in ("a100-40gb", "a100-80gb", "h100-80gb",
                                                                      "h200-141gb"))
    return [HostProfile(name=h.address, address=h.address, node_rank=i, gpu=gpu, gpus=section.gpus_per_host,
                        nvswitch=nvswitch, home=section.install_dir)
            for i, h in enumerate(section.hosts[:plan.nodes])]


def cloud_profiles(spec: Spec, plan: Plan, address: str) -> list[HostProfile]:
    """One profile per cloud node; `address` stands for each node's own address until boot."""
    instance = catalog.instance(spec.instance_type)
    # Every 8-GPU A100/H100/H200 type in the catalog is an HGX board with NVSwitches.
    nvswitch = instance.gpus == 8
    return [HostProfile(name=f"node-{rank}", address=address, node_rank=rank, gpu=True, gpus=instance.gpus,
                        cloud=spec.target, nvswitch=nvswitch)
            for rank in range(plan.nodes)]
