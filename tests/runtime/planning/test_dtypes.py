"""`dtype: auto` picks the checkpoint's type on GPUs and, on CPUs, bf16 only where it is native."""
import json

import pytest

from runtime.planning import dtypes

AVX512_BF16 = "flags\t\t: fpu sse avx2 avx512f avx512_bf16\n"
PLAIN = "flags\t\t: fpu sse avx2 avx512f\n"


@pytest.mark.parametrize("requested,checkpoint,on_gpu,cpuinfo,chosen", [
    ("auto", "bfloat16", True, PLAIN, "bfloat16"),
    ("auto", "float16", True, PLAIN, "float16"),
    ("auto", "bfloat16", False, AVX512_BF16, "bfloat16"),
    ("auto", "bfloat16", False, PLAIN, "float32"),        # emulated bf16 is slower than fp32
    ("auto", "float16", False, AVX512_BF16, "float32"),   # fp16 on a CPU: slower still
    ("auto", "float32", False, AVX512_BF16, "float32"),   # never below the checkpoint's precision
    ("auto", None, False, "flags : amx_bf16", "bfloat16"),
    ("float32", "bfloat16", True, AVX512_BF16, "float32"),   # an explicit choice wins
])
def test_auto_resolves_from_checkpoint_and_hardware(requested, checkpoint, on_gpu, cpuinfo, chosen):
    flags = dtypes.cpu_flags(cpuinfo)
    assert dtypes.resolve(requested, checkpoint=checkpoint, on_gpu=on_gpu, flags=flags) == chosen


def test_the_checkpoint_dtype_is_read_from_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    assert dtypes.checkpoint_dtype(tmp_path) == "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "float32", "torch_dtype": "bfloat16"}))
    assert dtypes.checkpoint_dtype(tmp_path) == "float32"
    assert dtypes.checkpoint_dtype(tmp_path / "missing") is None


def test_tensor_parallel_cpu_ranks_run_fp32_under_auto_gpus_keep_the_checkpoint_s():
    """Each CPU rank would round its partial sums to bf16 before the all-reduce: greedy answers change
    (tests/provisioning/test_up_local.py's smoke at TP 3 is the real check)."""
    amx = dtypes.cpu_flags("flags : amx_bf16 avx512_bf16")
    assert dtypes.resolve("auto", checkpoint="bfloat16", on_gpu=False, flags=amx, tensor_parallel=1) == "bfloat16"
    assert dtypes.resolve("auto", checkpoint="bfloat16", on_gpu=False, flags=amx, tensor_parallel=3) == "float32"
    assert dtypes.resolve("auto", checkpoint="bfloat16", on_gpu=True, tensor_parallel=8) == "bfloat16"
    assert dtypes.resolve("bfloat16", checkpoint="bfloat16", on_gpu=False, flags=amx, tensor_parallel=3) == "bfloat16"
