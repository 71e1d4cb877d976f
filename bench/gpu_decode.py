"""GPU decode speed of herd's engine vs plain `generate`, against the memory-bandwidth floor.

One GPU, a random-init Llama-3.1-8B shape in bf16 (no weights can be downloaded on the GPU machine).
Prints JSON lines: measured copy bandwidth; for batch 1, 8 and 32 with a 512-token prompt and 128 new
tokens: tokens/s, ms/step, fraction of the floor ((weights + KV bytes read per step) / bandwidth) and
time to first token, for plain `generate` and for herd's static-cache + CUDA-graph decode; and the
planner's per-GPU memory prediction against torch.cuda.max_memory_allocated.

`--tiny` runs the same code on CPU with a tiny config (a check that the script works, not a figure).
Usage: python bench/gpu_decode.py [--tiny] [--out bench/results/gpu-decode-H100.txt]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import Report  # noqa: E402

from runtime import catalog  # noqa: E402
from runtime.architecture import Architecture  # noqa: E402
from runtime.engine.decode import Row, decode_batch  # noqa: E402
from runtime.engine.static_batch import StaticBatch  # noqa: E402
from runtime.planner import Hardware, PlanRequest, plan  # noqa: E402

PROMPT, NEW = 512, 128


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device, nbytes: int) -> float:
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    started, reps = time.perf_counter(), 10
    for _ in range(reps):
        dst.copy_(src)
    sync(device)
    return 2 * nbytes * reps / (time.perf_counter() - started)   # read + write


def build(arch: Architecture, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=arch.vocab_size, hidden_size=arch.hidden_size,
                         num_hidden_layers=arch.num_hidden_layers, num_attention_heads=arch.num_attention_heads,
                         num_key_value_heads=arch.num_key_value_heads, head_dim=arch.head_dim,
                         intermediate_size=arch.intermediate_size, max_position_embeddings=4096)
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    return model


def timed(fn, device) -> float:
    sync(device)
    started = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny config: checks the script runs")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    gpu = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    arch = catalog.model("llama-3.1-8b").architecture
    prompt, new = PROMPT, NEW
    if args.tiny:
        arch = Architecture(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, intermediate_size=128,
                            max_position_embeddings=4096, tie_word_embeddings=False)
        prompt, new = 32, 48
    report = Report()
    emit = report.emit

    name = torch.cuda.get_device_name() if gpu else "CPU (tiny config: not a measurement)"
    bw = copy_bandwidth(device, 2 * 2**30 if gpu else 64 * 2**20)
    emit({"bench": "gpu_decode", "device": name, "dtype": str(dtype), "copy_bandwidth_GBps": round(bw / 1e9, 1),
          "prompt": prompt, "new_tokens": new})
    model = build(arch, device, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_per_token = arch.kv_bytes_per_token(2 if gpu else 4)

    for batch in [int(b) for b in args.batches.split(",")]:
        ids = torch.randint(1, arch.vocab_size, (batch, prompt), device=device)
        mask = torch.ones_like(ids)
        # Plain generate (what the seed served with).
        plain = {"attention_mask": mask, "do_sample": False, "pad_token_id": 0}
        ttft_plain = timed(lambda: model.generate(ids, max_new_tokens=1, **plain), device)
        total_plain = timed(lambda: model.generate(ids, max_new_tokens=new, min_new_tokens=new, **plain), device)
        # herd: static KV cache, prefill apart, the decode step compiled into CUDA graphs on GPU.
        static = StaticBatch(model, pad_id=0, max_len=prompt + new)
        rows = [Row(ids[i].tolist(), new, id=str(i)) for i in range(batch)]
        decode_batch(model, rows, batch=static)            # warm-up: compilation and graph capture
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        ttft_herd = timed(lambda: static.join(rows), device)
        static.keep([])
        total_herd = timed(lambda: decode_batch(model, rows, batch=static), device)
        avg_context = prompt + new / 2
        step_bytes = weight_bytes + kv_per_token * avg_context * batch
        floor_ms = step_bytes / bw * 1000
        for engine, total, ttft in (("generate", total_plain, ttft_plain), ("herd-static", total_herd, ttft_herd)):
            # TTFT and the total come from separate runs for `generate`: clamp against noise.
            ms_step = max(total - ttft, 1e-6) / (new - 1) * 1000
            emit({"batch": batch, "engine": engine, "tokens_per_s": round(batch * new / total, 1),
                  "ms_per_step": round(ms_step, 3), "floor_ms_per_step": round(floor_ms, 3),
                  "fraction_of_floor": round(floor_ms / ms_step, 3), "ttft_s": round(ttft, 4)})
        if gpu:
            measured = torch.cuda.max_memory_allocated()
            hw = Hardware(accelerator=catalog.accelerator("h100-80gb"), devices_per_node=1)
            predicted = plan(PlanRequest(architecture=arch, hardware=hw, tensor=1, pipeline=1,
                                         max_model_len=prompt + new, concurrency=batch,
                                         max_prefill_tokens=batch * prompt), suggest=False)
            pg = predicted.per_gpu_bytes
            emit({"batch": batch, "planner_bytes": {"weights": pg.weights, "kv_cache": pg.kv_cache,
                                                    "overhead": pg.overhead, "total": pg.total},
                  "max_memory_allocated": measured, "planner_error": round(pg.total / measured - 1, 4)})
    report.save(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
