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


async def exit_of(proc: asyncio.subprocess.Process) -> int:
    """The child's exit status, once it has exited. Not Process.wait(): since CPython 3.11 that also
    waits for the child's pipes to close, and a grandchild that holds them (vLLM's engine core outliving
    its killed API server) would hide the exit for as long as it lives (measured: the engine was never
    seen to die, never restarted)."""
    while proc.returncode is None:
        await asyncio.sleep(0.05)
    return proc.returncode


async def stop_group(proc: asyncio.subprocess.Process | None, grace_s: float) -> None:
    """SIGTERM the child's process group, wait up to `grace_s` for the child, then SIGKILL whatever is
    left of the group: also when the child itself has exited already (what it started may not have)."""
    if proc is None:
        return
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(exit_of(proc), grace_s)
        except asyncio.TimeoutError:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    await exit_of(proc)
