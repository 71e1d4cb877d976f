"""What `herd serve` starts on one node: the torchrun command line and the workers' environment."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class LaunchConfig:
    model_dir: Path
    dtype: str = "auto"   # resolved by each rank (runtime.planning.dtypes) from the checkpoint and its device
    nproc_per_node: int = 1
    nnodes: int = 1
    # Multi-node: the head's address:port hosts the c10d rendezvous; this node's own address.
    rdzv_endpoint: str | None = None
    node_addr: str | None = None
    rdzv_id: str = "herd"
    is_head: bool = True
    max_batch: int = 8
    batch_window_s: float = 0.005
    threads_per_rank: int | None = None
    state_dir: Path = Path(".herd")
    # Supervision: at most max_restarts restarts of the group within any restart_window_s (older ones
    # no longer count); when spent, `herd serve` exits so its service manager starts it afresh.
    max_restarts: int = 3
    restart_window_s: float = 300.0
    restart_backoff_s: float = 1.0
    restart_backoff_max_s: float = 30.0
    canary_interval_s: float = 10.0
    canary_timeout_s: float = 5.0
    canary_retries: int = 2               # a canary that fails is retried this often before a restart
    startup_canary_timeout_s: float = 120.0
    stall_timeout_s: float = 60.0
    decode: str = "continuous"            # continuous | static (preallocated KV cache, CUDA graphs on GPU)
    max_model_len: int = 2048
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


def torchrun_command(cfg: LaunchConfig) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run",
           f"--nproc-per-node={cfg.nproc_per_node}", f"--nnodes={cfg.nnodes}",
           # herd's supervisor restarts the group itself (bounded, with backoff, reason logged), so
           # torchrun stops the whole group at the first failure instead of retrying silently.
           "--max-restarts=0", "--monitor-interval=0.2"]
    if cfg.nnodes == 1 and not cfg.rdzv_endpoint:
        cmd.append("--standalone")
    else:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={cfg.rdzv_endpoint}", f"--rdzv-id={cfg.rdzv_id}"]
        if cfg.node_addr:
            cmd.append(f"--local-addr={cfg.node_addr}")
        # Say who hosts the rendezvous store: left to auto-detection, every node whose address
        # matches (all of them on one machine) races to bind the port.
        cmd.append(f"--rdzv-conf=is_host={int(cfg.is_head)}")
    return cmd + ["-m", "runtime.engine.worker"]


def worker_env(cfg: LaunchConfig, control: str | None, token: str | None, pad_id: int) -> dict[str, str]:
    threads = cfg.threads_per_rank or max(1, (os.cpu_count() or 1) // cfg.nproc_per_node)
    env = {**os.environ, **cfg.extra_env,
           "HERD_MODEL_DIR": str(cfg.model_dir), "HERD_DTYPE": cfg.dtype,
           "HERD_STATE_DIR": str(cfg.state_dir), "HERD_HEAD": "1" if cfg.is_head else "0",
           "HERD_MAX_BATCH": str(cfg.max_batch), "HERD_BATCH_WINDOW_S": str(cfg.batch_window_s),
           "HERD_PAD_ID": str(pad_id), "HERD_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
           "HERD_DECODE": cfg.decode, "HERD_MAX_MODEL_LEN": str(cfg.max_model_len),
           "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    if control:
        env["HERD_CONTROL"], env["HERD_CONTROL_TOKEN"] = control, token or ""
    # The API key is the front end's business; ranks never see it.
    for key in [k for k in env if k.startswith("HERD_API_KEY")]:
        env.pop(key)
    return env
