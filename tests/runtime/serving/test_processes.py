"""Seeing a child's exit, and stopping its process group, when a grandchild outlives it holding the pipes
(vLLM's engine core does when its API server is killed)."""
import asyncio
import os
import signal
import subprocess
import time

from runtime.serving.processes import exit_of, pid_alive, stop_group

# The child starts a grandchild in its own process group, writes the grandchild's pid and stays; both
# share its stdout and stderr pipes.
CHILD = "sleep 300 & echo $! > \"$1\"; exec sleep 600"


async def child_with_grandchild(pid_file) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec("bash", "-c", CHILD, "child", str(pid_file), start_new_session=True,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    deadline = time.monotonic() + 10
    while not (pid_file.exists() and pid_file.read_text().strip()):
        assert time.monotonic() < deadline, "the child did not start its grandchild"
        await asyncio.sleep(0.05)
    return proc


def test_a_killed_child_s_exit_is_seen_while_its_grandchild_holds_the_pipes(tmp_path):
    async def run():
        proc = await child_with_grandchild(tmp_path / "grandchild")
        grandchild = int((tmp_path / "grandchild").read_text())
        os.kill(proc.pid, signal.SIGKILL)
        code = await asyncio.wait_for(exit_of(proc), 10)    # Process.wait() would not return here
        assert code == -signal.SIGKILL and pid_alive(grandchild)
        await stop_group(proc, grace_s=0)                   # the leader gone: its group still goes
        deadline = time.monotonic() + 10
        while pid_alive(grandchild):
            assert time.monotonic() < deadline, "the grandchild outlived stop_group"
            await asyncio.sleep(0.05)
    asyncio.run(run())


def test_stop_group_terms_then_kills_the_whole_group(tmp_path):
    async def run():
        proc = await child_with_grandchild(tmp_path / "grandchild")
        grandchild = int((tmp_path / "grandchild").read_text())
        await asyncio.wait_for(stop_group(proc, grace_s=5), 30)
        assert proc.returncode == -signal.SIGTERM
        assert subprocess.run(["kill", "-0", str(grandchild)], capture_output=True).returncode != 0 or \
            not pid_alive(grandchild)
    asyncio.run(run())


def test_an_engine_s_companion_starts_first_and_stops_with_it(tmp_path):
    """A TPU slice head runs Ray's head beside vLLM (ExternalEngineConfig.before): started first,
    supervised on its own, stopped with the engine."""
    from runtime.engine.external import ExternalEngine, ExternalEngineConfig
    marker = f"herd-companion-{os.getpid()}"

    def sleeper(tag: str) -> list[str]:
        return ["bash", "-c", f"exec -a {tag} sleep 300"]

    def running(tag: str) -> bool:
        return subprocess.run(["pgrep", "-f", f"^{tag}"], capture_output=True).returncode == 0

    async def run():
        config = ExternalEngineConfig(argv=sleeper(f"{marker}-engine"), engine_url="http://127.0.0.1:9",
                                      served_model_name="m")
        config.before = ExternalEngineConfig(argv=sleeper(f"{marker}-ray"), engine_url="http://127.0.0.1:9",
                                             served_model_name="m")
        engine = ExternalEngine(config)
        await engine.start(front=False)
        deadline = time.monotonic() + 20
        while not (running(f"{marker}-ray") and running(f"{marker}-engine")):
            assert time.monotonic() < deadline, "the engine or its companion did not start"
            await asyncio.sleep(0.1)
        await engine.stop()
        deadline = time.monotonic() + 20
        while running(f"{marker}-ray") or running(f"{marker}-engine"):
            assert time.monotonic() < deadline, "the engine or its companion outlived stop()"
            await asyncio.sleep(0.1)
    asyncio.run(run())
