"""Process liveness and stopping a child that leads its own process group, the same way everywhere."""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal


def pid_alive(pid: int) -> bool:
    """Running, that is: present and not a zombie (an exited child nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return not f.read().rsplit(") ", 1)[-1].startswith("Z")
    except FileNotFoundError:
        return False


async def stop_group(proc: asyncio.subprocess.Process | None, grace_s: float) -> None:
    """SIGTERM the child's process group, wait up to `grace_s`, then SIGKILL whatever is left."""
    if proc is None or proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), grace_s)
    except asyncio.TimeoutError:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    await proc.wait()
