"""Which floating-point type a model runs in when the spec says `dtype: auto`.

The checkpoint's own type (config.json) on GPUs; on CPUs bf16 only in a single rank and only where the
processor computes it natively (AVX-512 BF16 or AMX: about 1.9x fp32's serving throughput measured on such a CPU for
SmolLM2-135M), fp32 elsewhere (emulated bf16 is slower than fp32, and fp16 on CPUs slower still).
"""
from __future__ import annotations

import json
from pathlib import Path

CHOICES = ("auto", "float32", "bfloat16", "float16")
NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def checkpoint_dtype(model_dir: str | Path) -> str | None:
    """The dtype a checkpoint's config.json declares (`dtype`, or the older `torch_dtype`)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("dtype") or config.get("torch_dtype")
    return value if value in CHOICES[1:] else None


def resolve(requested: str, *, checkpoint: str | None, on_gpu: bool, flags: set[str] | None = None,
            tensor_parallel: int = 1) -> str:
    """The dtype to load with: `requested` unless it is "auto".

    Tensor-parallel CPU ranks run fp32 under "auto": each rank rounds its partial sums of the
    row-parallel layers to bf16 before the all-reduce adds them (in bf16 again), two roundings a
    single process never makes. On SmolLM2-135M at TP 3 on an AMX CPU that flipped greedy answers
    ("What is the capital of France?" answered "L'Étoile, la Marseillaise, ..."; one process in bf16, and
    TP 3 in fp32, answer Paris). GPUs keep the checkpoint's type: NCCL's bf16 all-reduce is what every
    GPU engine runs, and the models served there are large enough for it."""
    if requested != "auto":
        return requested
    stored = checkpoint or "bfloat16"
    if on_gpu:
        return stored
    native_bf16 = bool(NATIVE_BF16_FLAGS & (cpu_flags() if flags is None else flags))
    return "bfloat16" if stored == "bfloat16" and native_bf16 and tensor_parallel == 1 else "float32"
