"""Shared fixtures: the repository root, the environments, and running the real `herd` script."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENVIRONMENTS = sorted((ROOT / "environments").glob("*.yaml"))
HERD = [sys.executable, "-m", "infra.cli"]


def run_herd(*args: str, env: dict | None = None, timeout: float = 120, cwd: Path = ROOT):
    """Run the front door as a user would, in a child process."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([*HERD, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=full_env)


def wait_for(what: str, check, timeout: float = 60, every: float = 0.2):
    """`check()`'s first truthy value, polled every `every` s; fails naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f}s"
        time.sleep(every)


@pytest.fixture
def herd():
    return run_herd
