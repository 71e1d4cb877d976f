"""The planner's overhead model, fitted on some model shapes and checked on others, on one GPU.

The planner predicts what a device holds besides weights and KV cache: prefill activations (bytes per
prompt token, linear in the hidden and intermediate sizes), the caching allocator's reserve (a constant
plus a share of the activations), logits, the CUDA context. Fitted on the shapes it is then checked on,
such a model proves nothing; here its coefficients are fitted by least squares on three shapes and the
planner, with those coefficients, is checked on three others it never saw (within 3% of the device's
peak, the goal), each at batch 1/8/32 x 512/2048-token prompts.

Each measurement runs what herd runs on a GPU: the fused model (runtime/engine/fused.py), a static batch
prefilled and decoded two steps, peaks read from torch's allocator. Weights are random, initialised
on the device (memory does not depend on their values).

Usage (on a GPU machine): python bench/gpu_memory.py --out bench/results/gpu-memory-H200.txt
`--tiny` runs the same code on CPU with tiny shapes (a check that the script works, not a figure).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gpu_decode import build as build_shape  # noqa: E402
from bench.gpu_decode import versions  # noqa: E402
from bench.report import Report  # noqa: E402
from runtime.engine.decode import Row  # noqa: E402
from runtime.engine.fused import fuse_projections  # noqa: E402
from runtime.engine.static_batch import StaticBatch  # noqa: E402
from runtime.planning import catalog  # noqa: E402
from runtime.planning.architecture import Architecture  # noqa: E402
from runtime.planning.planner import OVERHEAD  # noqa: E402

NEW = 128


def shapes() -> dict[str, tuple[Architecture, str]]:
    """Model shapes from their config.json figures, each marked fit or check."""
    llama8b = catalog.model("llama-3.1-8b").architecture
    llama70b = catalog.model("llama-3.1-70b").architecture
    return {
        "llama-3.2-1b": (Architecture(vocab_size=128256, hidden_size=2048, num_hidden_layers=16,
                                      num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                      intermediate_size=8192, max_position_embeddings=131072,
                                      tie_word_embeddings=True), "fit"),
        "llama-3.2-3b": (Architecture(vocab_size=128256, hidden_size=3072, num_hidden_layers=28,
                                      num_attention_heads=24, num_key_value_heads=8, head_dim=128,
                                      intermediate_size=8192, max_position_embeddings=131072,
                                      tie_word_embeddings=True), "fit"),
        "llama-3.1-70b-8-layers": (dataclasses.replace(llama70b, num_hidden_layers=8), "fit"),
        "llama-3.1-8b": (llama8b, "check"),
        "qwen2.5-7b-shape": (Architecture(vocab_size=152064, hidden_size=3584, num_hidden_layers=28,
                                          num_attention_heads=28, num_key_value_heads=4, head_dim=128,
                                          intermediate_size=18944, max_position_embeddings=32768,
                                          tie_word_embeddings=False, attention_bias=True), "check"),
        "mistral-7b-shape": (Architecture(vocab_size=32768, hidden_size=4096, num_hidden_layers=32,
                                          num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                          intermediate_size=14336, max_position_embeddings=32768,
                                          tie_word_embeddings=False), "check"),
    }


def tiny_shapes() -> dict[str, tuple[Architecture, str]]:
    def arch(hidden, inter):
        return Architecture(vocab_size=512, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=hidden // 4, intermediate_size=inter,
                            max_position_embeddings=4096, tie_word_embeddings=False)
    return {"a": (arch(64, 256), "fit"), "b": (arch(128, 256), "fit"), "c": (arch(64, 128), "fit"),
            "d": (arch(128, 384), "check")}


def build(arch: Architecture, device, dtype):
    """The random-init shape as herd runs it on a GPU: fused."""
    model = build_shape(arch, device, dtype)
    fuse_projections(model)
    return model


@torch.inference_mode()
def measure(model, arch: Architecture, batch: int, prompt: int, device, dtype_bytes: int) -> dict:
    """Peak bytes of one static batch: prefill, two decode steps; weights and KV counted apart."""
    gc.collect()
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before, before_reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    static = StaticBatch(model, pad_id=0, max_len=prompt + NEW, compile_decode=False)
    ids = torch.randint(1, arch.vocab_size, (batch, prompt))
    static.join([Row(ids[i].tolist(), NEW, id=str(i)) for i in range(batch)])
    for _ in range(2):
        static.step([1] * batch)
    if on_gpu:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        reserved = torch.cuda.max_memory_reserved() - before_reserved
    else:   # CPU: no allocator statistics; the script's plumbing is what --tiny checks
        peak = reserved = 0
    kv = arch.kv_bytes_per_token(dtype_bytes) * (prompt + NEW) * batch
    logits = batch * arch.vocab_size * 4
    del static
    return {"batch": batch, "prompt": prompt, "kv_cache": kv, "logits": logits, "peak_allocated": peak,
            "peak_reserved": reserved, "activations": peak - kv - logits, "allocator_reserve": reserved - peak}


def fit(points: list[dict], dtype_bytes: int) -> dict[str, float]:
    """activations = tokens x (a x hidden + b x intermediate) x dtype bytes; reserve = c0 + c1 x activations."""
    x = torch.tensor([[p["tokens"] * p["hidden"] * dtype_bytes, p["tokens"] * p["intermediate"] * dtype_bytes]
                      for p in points], dtype=torch.float64)
    y = torch.tensor([p["activations"] for p in points], dtype=torch.float64)
    a, b = torch.linalg.lstsq(x, y[:, None]).solution[:, 0].tolist()
    r = torch.tensor([[1.0, p["activations"]] for p in points], dtype=torch.float64)
    z = torch.tensor([p["allocator_reserve"] for p in points], dtype=torch.float64)
    c0, c1 = torch.linalg.lstsq(r, z[:, None]).solution[:, 0].tolist()
    return {"hidden_coefficient": a, "intermediate_coefficient": b, "reserve_bytes": c0, "reserve_per_activation_byte": c1}


def predicted(point: dict, coefficients: dict, dtype_bytes: int, context: int) -> dict[str, float]:
    activations = point["tokens"] * (coefficients["hidden_coefficient"] * point["hidden"]
                                     + coefficients["intermediate_coefficient"] * point["intermediate"]) * dtype_bytes
    reserve = coefficients["reserve_bytes"] + coefficients["reserve_per_activation_byte"] * activations
    return {"overhead": activations + reserve, "device": point["weights"] + point["kv_cache"] + point["logits"]
            + activations + reserve + context}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny shapes: checks the script runs")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    gpu = torch.cuda.is_available() and not args.tiny
    if not gpu and not args.tiny:
        sys.exit("gpu_memory: no CUDA device here; run on a GPU machine (bench/gpu_run.sh) or pass --tiny")
    device = torch.device("cuda" if gpu else "cpu")
    dtype, dtype_bytes = (torch.bfloat16, 2) if gpu else (torch.float32, 4)
    context = 0
    if gpu:
        torch.cuda.init()
        free, total = torch.cuda.mem_get_info()
        context = total - free - torch.cuda.memory_reserved()
    report = Report()
    report.emit({"bench": "gpu_memory", "device": torch.cuda.get_device_name() if gpu else "CPU (tiny: not a measurement)",
                 "cuda_context_bytes": context, "new_tokens": NEW, **versions()})
    configs = [(b, p) for b in (1, 8, 32) for p in (512, 2048)] if gpu else [(1, 16), (4, 32)]
    points = []
    for name, (arch, role) in (shapes() if gpu else tiny_shapes()).items():
        model = build(arch, device, dtype)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        for batch, prompt in configs:
            point = {"shape": name, "role": role, "hidden": arch.hidden_size, "intermediate": arch.intermediate_size,
                     "weights": weights, "tokens": batch * prompt,
                     **measure(model, arch, batch, prompt, device, dtype_bytes)}
            points.append(point)
            report.emit(point)
        del model
        report.save(args.out)
    coefficients = fit([p for p in points if p["role"] == "fit"], dtype_bytes)
    current = {"hidden_coefficient": 4.0, "intermediate_coefficient": 3.0,
               "reserve_bytes": OVERHEAD.allocator_reserve_bytes,
               "reserve_per_activation_byte": OVERHEAD.allocator_reserve_per_activation_byte}
    report.emit({"fitted_on": sorted({p["shape"] for p in points if p["role"] == "fit"}), "coefficients": coefficients,
                 "planner_before": current})
    for label, coef in (("fitted", coefficients), ("planner_before", current)):
        errors = []
        for p in points:
            if p["role"] != "check":
                continue
            guess = predicted(p, coef, dtype_bytes, context)
            measured_device = p["weights"] + p["peak_reserved"] + context
            measured_overhead = p["activations"] + p["allocator_reserve"]
            errors.append({"shape": p["shape"], "batch": p["batch"], "prompt": p["prompt"],
                           "device_error": round(guess["device"] / measured_device - 1, 4) if measured_device else None,
                           "overhead_error": round(guess["overhead"] / measured_overhead - 1, 4)
                           if measured_overhead else None})
        worst = max((abs(e["device_error"]) for e in errors if e["device_error"] is not None), default=None)
        report.emit({"checked_with": label, "checked_on": sorted({e["shape"] for e in errors}), "errors": errors,
                     "worst_device_error": worst, "within_3_percent": worst is not None and worst <= 0.03})
    report.save(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
