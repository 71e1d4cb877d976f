"""Shared fixtures: the repository root, the environments, and running the real `herd` script."""
from __future__ import annotations

import os
import subprocess
import sys
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


@pytest.fixture
def herd():
    return run_herd
