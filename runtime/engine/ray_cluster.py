"""The Ray cluster a multi-host TPU slice runs vLLM on: vLLM's TPU backend spans hosts over Ray, so every
host of the slice joins a cluster whose head runs on host 0 (`ray start`, blocking: the node's herd
serve supervises it like an engine). The commands, with Ray's own flags (its `ray start` reference; the TPU
lock pins the Ray they run)."""
from __future__ import annotations

RAY_PORT = 6379


def ray_head(addr: str | None) -> list[str]:
    return ["ray", "start", "--head", "--block", "--port", str(RAY_PORT), "--disable-usage-stats",
            *(["--node-ip-address", addr] if addr else [])]


def ray_worker(head_addr: str, addr: str | None) -> list[str]:
    return ["ray", "start", "--block", "--address", f"{head_addr}:{RAY_PORT}", "--disable-usage-stats",
            *(["--node-ip-address", addr] if addr else [])]
