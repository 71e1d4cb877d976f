"""The local target's keeper (provisioning.local): what systemd's Restart=on-failure is on a node.
`herd serve` that spent its restart budget is started again, a crash at startup is not, and
`herd down` still stops everything. Real processes throughout."""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from provisioning.local import KeepAlive, start_managed
from runtime.serving.supervisor import EXIT_RESTARTS_SPENT
from tests.conftest import ROOT
from tests.runtime.conftest import alive, free_port, tiny_model  # noqa: F401 (a fixture)

# A child that records each start (monotonic time, pid), then does what its turn says: exit with a
# code, "sleep" (until stopped), or "killN": run N seconds, then SIGKILL itself.
CHILD = """
import os, signal, sys, time
from pathlib import Path
runs, turns = Path(sys.argv[1]), sys.argv[2:]
n = len(runs.read_text().splitlines()) if runs.exists() else 0
with runs.open("a") as f:
    f.write(f"{time.monotonic()} {os.getpid()}\\n")
turn = turns[min(n, len(turns) - 1)]
if turn == "sleep":
    time.sleep(600)
elif turn.startswith("kill"):
    time.sleep(float(turn[4:]))
    os.kill(os.getpid(), signal.SIGKILL)
sys.exit(int(turn))
"""


def keeper(tmp_path: Path, *turns: str, policy: KeepAlive) -> tuple[int, Path]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    runs = tmp_path / "runs"
    pid = start_managed([sys.executable, str(script), str(runs), *turns], tmp_path / "state", cwd=ROOT,
                        policy=policy)
    return pid, runs


def starts(runs: Path) -> list[tuple[float, int]]:
    if not runs.exists():
        return []
    return [(float(t), int(p)) for t, p in (line.split() for line in runs.read_text().splitlines())]


def wait_exit(pid: int, timeout: float) -> int:
    """Reap our child `pid` within `timeout`; returns its exit code (128 + N for signal N)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return os.waitstatus_to_exitcode(status) % 256
        time.sleep(0.05)
    os.killpg(pid, signal.SIGKILL)
    raise AssertionError(f"keeper {pid} still running after {timeout}s")


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(0.05)
    return value


def test_relaunches_a_spent_budget_with_doubling_backoff_and_stops_on_sigterm(tmp_path):
    pid, runs = keeper(tmp_path, str(EXIT_RESTARTS_SPENT), str(EXIT_RESTARTS_SPENT), "sleep",
                       policy=KeepAlive(backoff_s=0.4, backoff_max_s=10, min_run_s=60))
    wait_for(lambda: len(starts(runs)) == 3, 20, "three runs")
    (t0, _), (t1, _), (t2, last) = starts(runs)
    assert t1 - t0 >= 0.4 and t2 - t1 >= 0.8, (t1 - t0, t2 - t1)   # 0.4 s, then doubled
    log = (tmp_path / "state" / "serve.log").read_text()
    assert "exited with 75 (restart budget spent)" in log and "relaunching in 0.8s (relaunch 2" in log, log
    os.killpg(pid, signal.SIGTERM)  # what `herd down` does
    assert wait_exit(pid, 10) == 0
    wait_for(lambda: not alive(last), 5, "the child to stop with its keeper")
    assert len(starts(runs)) == 3  # no relaunch after a requested stop


@pytest.mark.parametrize("turns, code, runs_expected", [
    (("1",), 1, 1),             # a crash at startup: a configuration problem, reported, not retried
    (("2",), 2, 1),             # a user error (exit 2) stays one
    (("kill0.6", "1"), 1, 2),   # killed after a healthy run: relaunched; then a startup crash ends it
])
def test_what_is_relaunched_and_what_is_not(tmp_path, turns, code, runs_expected):
    pid, runs = keeper(tmp_path, *turns, policy=KeepAlive(backoff_s=0.1, min_run_s=0.5))
    assert wait_exit(pid, 20) == code
    assert len(starts(runs)) == runs_expected


def descendants(root: int) -> set[int]:
    """Every process below `root` now, from /proc's parent links."""
    parents = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(") ", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def serve_child(keeper_pid: int) -> int:
    """The herd serve the keeper runs now."""
    children = Path(f"/proc/{keeper_pid}/task/{keeper_pid}/children").read_text().split()
    return int(children[0]) if children else 0


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health/ready", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.slow
@pytest.mark.timeout(300)   # a real serve, a kill and the relaunch: ~40 s here
def test_local_target_brings_back_a_serve_that_spent_its_budget(herd, tiny_model, tmp_path):
    """herd serve under the local target's keeper, with no restart allowed: kill -9 a rank, herd serve
    exits 75, the keeper starts it again, it is ready again; then `herd down` leaves nothing behind."""
    state, port = tmp_path / "state", free_port()
    spec = yaml.safe_load((ROOT / "environments" / "local.yaml").read_text())
    spec["serving"]["port"], spec["local"]["state_dir"] = port, str(state)
    env_path = tmp_path / "local.yaml"
    env_path.write_text(yaml.safe_dump(spec))
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "infra.cli", "serve", "--model-dir", str(tiny_model), "--tp", "2",
           "--port", str(port), "--state-dir", str(state), "--served-model-name", "tiny",
           "--max-restarts", "0", "--canary-interval", "1"]
    pid = start_managed(cmd, state, cwd=ROOT, policy=KeepAlive(backoff_s=0.5))
    try:
        wait_for(lambda: ready(url) or not alive(pid), 180, "first ready")
        assert alive(pid), (state / "serve.log").read_text()[-3000:]
        first = serve_child(pid)
        os.kill(int((state / "ranks" / "1.pid").read_text()), signal.SIGKILL)
        killed_at = time.monotonic()
        wait_for(lambda: serve_child(pid) not in (0, first), 60, "a new herd serve")
        relaunched_after = time.monotonic() - killed_at
        wait_for(lambda: ready(url), 180, "ready after the relaunch")
        back_after = time.monotonic() - killed_at
        log = (state / "serve.log").read_text()
        assert f"herd serve: exiting {EXIT_RESTARTS_SPENT}: restart budget spent" in log, log[-3000:]
        assert f"herd serve exited with {EXIT_RESTARTS_SPENT} (restart budget spent)" in log, log[-3000:]
        assert not alive(first) and alive(pid)
        everything = descendants(pid) | {pid}
        assert len(everything) >= 5  # keeper, herd serve, torchrun, two ranks
    finally:
        down = herd("down", str(env_path))
    assert down.returncode == 0 and "stopped" in down.stdout, down.stdout + down.stderr
    wait_exit(pid, 10)
    wait_for(lambda: not [p for p in everything if alive(p)], 10, "herd down to leave nothing behind")
    print(f"\nkeeper: new herd serve {relaunched_after:.1f}s after the kill, ready {back_after:.1f}s after it")
