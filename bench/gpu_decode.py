"""GPU decode speed of herd's engine vs plain `generate`, against the memory-bandwidth floor, and the
planner's memory prediction against what the GPU allocated.

One GPU, a random-init Llama-3.1-8B shape in bf16 (no weights can be downloaded on the GPU machine).
For batch 1, 8 and 32 with a 512-token prompt and 128 new tokens, both sides warmed up first (compile
and graph capture for herd, one full run for `generate`), then several interleaved rounds, best kept:
- tokens/s end to end, time to first token, ms per decode step;
- fraction of the floor: the bytes a decode step must read (every weight except the input embedding
  table, which a step only indexes, plus the KV cache at the average context) over the measured copy
  bandwidth, divided by the measured step time;
- herd's step time inside the engine (token choice, payload, host transfer included) and of the graph
  alone (steps queued back to back, one synchronisation at the end): the gap is the engine's overhead;
- memory, like for like: the planner's allocation part (weights + KV + activations + logits) against
  torch's peak allocated bytes for that batch, and the planner's device total (adds CUDA context and
  allocator reserve) against the peak reserved bytes plus the measured context.

`--tiny` runs the same code on CPU with a tiny config (a check that the script works, not a figure).
Usage: python bench/gpu_decode.py [--tiny] [--rounds 3] [--out bench/results/gpu-decode-H200.txt]
"""
from __future__ import annotations

import argparse
import gc
import importlib.metadata
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import Report  # noqa: E402

from runtime.planning import catalog  # noqa: E402
from runtime.planning.architecture import Architecture  # noqa: E402
from runtime.engine.decode import Row, decode_batch  # noqa: E402
from runtime.engine.static_batch import StaticBatch  # noqa: E402
from runtime.planning.planner import Hardware, PlanRequest, plan  # noqa: E402

PROMPT, NEW = 512, 128
# The catalog entry whose memory and bandwidth the planner is asked about, by device name.
ACCELERATORS = {"H200": "h200-141gb", "H100": "h100-80gb", "A100-SXM4-80GB": "a100-80gb", "A100": "a100-40gb"}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device, nbytes: int, reps: int = 20) -> float:
    """Bytes read + written per second by a device-to-device copy (best of 3 bursts)."""
    src = torch.randn(nbytes // 2, device=device).to(torch.bfloat16)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(4):
        dst.copy_(src)
        sync(device)
        started = time.perf_counter()
        for _ in range(reps):
            dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - started)
    return 2 * src.numel() * src.element_size() * reps / best


def build(arch: Architecture, device, dtype):
    from transformers.models.llama import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=arch.vocab_size, hidden_size=arch.hidden_size,
                         num_hidden_layers=arch.num_hidden_layers, num_attention_heads=arch.num_attention_heads,
                         num_key_value_heads=arch.num_key_value_heads, head_dim=arch.head_dim,
                         intermediate_size=arch.intermediate_size, max_position_embeddings=4096,
                         tie_word_embeddings=arch.tie_word_embeddings)
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    return model


def step_read_bytes(model) -> int:
    """Weight bytes one decode step reads: all of them but the input embedding table, which a step
    indexes one row of per sequence (when tied to lm_head, lm_head reads it in full: counted once)."""
    embed = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    tied = model.get_output_embeddings().weight.data_ptr() == embed.data_ptr()
    return total if tied else total - embed.numel() * embed.element_size()


def timed(fn, device) -> float:
    sync(device)
    started = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - started


def run_generate(model, ids, new: int, device) -> tuple[float, float]:
    """(time to first token, whole run) of plain `generate`, greedy, exactly `new` tokens."""
    plain = {"attention_mask": torch.ones_like(ids), "do_sample": False, "pad_token_id": 0}
    ttft = timed(lambda: model.generate(ids, max_new_tokens=1, **plain), device)
    total = timed(lambda: model.generate(ids, max_new_tokens=new, min_new_tokens=new, **plain), device)
    return ttft, total


def run_herd(model, rows, static: StaticBatch, device) -> tuple[float, float, float]:
    """(time to first token, whole run, median step) of herd's engine: the times at which each step's
    tokens reached the host, as a server would stream them."""
    stamps: list[float] = []

    def on_step(events):
        stamps.append(time.perf_counter())
        return set()
    sync(device)
    started = time.perf_counter()
    decode_batch(model, rows, batch=static, on_step=on_step)
    sync(device)
    total = time.perf_counter() - started
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return stamps[0] - started, total, statistics.median(steps)


@torch.inference_mode()
def graph_step(static: StaticBatch, rows, steps: int, device) -> float:
    """Seconds per decode step of the graph alone: steps queued back to back, one sync at the end."""
    static.join(rows)
    tokens = [1] * len(rows)
    static.step(tokens)
    took = timed(lambda: [static.step(tokens) for _ in range(steps)], device)
    static.keep([])
    return took / steps


@torch.inference_mode()
def profile_steps(static: StaticBatch, rows, steps: int, path: Path) -> None:
    """Where a decode step's device time goes: the kernels of `steps` graph replays, by total time."""
    from torch.profiler import ProfilerActivity, profile
    static.join(rows)
    tokens = [1] * len(rows)
    static.step(tokens)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            static.step(tokens)
        torch.cuda.synchronize()
    static.keep([])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90))


def versions() -> dict:
    return {"torch": torch.__version__, "transformers": importlib.metadata.version("transformers"),
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "git_sha": os.environ.get("HERD_GIT_SHA", "unknown")}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny config: checks the script runs")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--profile", type=Path, help="GPU: write the batch-1 decode step's kernel table here")
    args = parser.parse_args()
    gpu = torch.cuda.is_available() and not args.tiny
    if not gpu and not args.tiny:
        sys.exit("gpu_decode: no CUDA device here; run on a GPU machine (bench/gpu_run.sh) or pass --tiny")
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
    context_bytes = 0
    if gpu:
        torch.cuda.init()
        free, total_mem = torch.cuda.mem_get_info()
        context_bytes = total_mem - free - torch.cuda.memory_reserved()
    bw = copy_bandwidth(device, 2 * 2**30 if gpu else 64 * 2**20)
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
    emit({"bench": "gpu_decode", "device": name, "machine": platform.node(), "dtype": str(dtype),
          "copy_bandwidth_GBps": round(bw / 1e9, 1), "cuda_context_bytes": context_bytes,
          "prompt": prompt, "new_tokens": new, "rounds": args.rounds, **versions()})
    model = build(arch, device, dtype)
    read_bytes = step_read_bytes(model)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_per_token = arch.kv_bytes_per_token(2 if gpu else 4)
    accel = next((v for k, v in ACCELERATORS.items() if k in name), "h100-80gb")
    summary = {}

    for batch in [int(b) for b in args.batches.split(",")]:
        ids = torch.randint(1, arch.vocab_size, (batch, prompt), device=device)
        rows = [Row(ids[i].tolist(), new, id=str(i)) for i in range(batch)]
        if gpu:
            gc.collect()
            torch.cuda.empty_cache()
            before, before_reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        static = StaticBatch(model, pad_id=0, max_len=prompt + new)
        # Warm-up, both sides: compilation and graph capture for herd, kernels and caches for generate.
        run_herd(model, rows, static, device)
        run_generate(model, ids, new, device)
        peak_allocated = peak_reserved = 0
        if gpu:   # herd alone: generate's cache and blocks must not count in herd's peaks
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            run_herd(model, rows, static, device)
            peak_allocated, peak_reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        best: dict[str, list[tuple[float, float]]] = {"generate": [], "herd": []}   # (ttft, total)
        herd_step = []
        for _ in range(args.rounds):   # interleaved: drift hits both sides alike
            best["generate"].append(run_generate(model, ids, new, device))
            ttft, total, step = run_herd(model, rows, static, device)
            best["herd"].append((ttft, total))
            herd_step.append(step)
        graph_s = min(graph_step(static, rows, 32, device) for _ in range(args.rounds))
        floor_ms = (read_bytes + kv_per_token * (prompt + new / 2) * batch) / bw * 1000
        results = {}
        for engine in ("generate", "herd"):
            ttft = min(t for t, _ in best[engine])
            total = min(t for _, t in best[engine])
            ms_step = (min(herd_step) * 1000 if engine == "herd"
                       else max(total - ttft, 1e-9) / (new - 1) * 1000)
            results[engine] = batch * new / total
            emit({"batch": batch, "engine": engine if engine == "generate" else "herd-static",
                  "tokens_per_s": round(batch * new / total, 1), "ms_per_step": round(ms_step, 3),
                  "floor_ms_per_step": round(floor_ms, 3), "fraction_of_floor": round(floor_ms / ms_step, 3),
                  "ttft_s": round(ttft, 4), "totals_s": [round(t, 4) for _, t in best[engine]]})
        emit({"batch": batch, "engine": "herd-graph-only", "ms_per_step": round(graph_s * 1000, 3),
              "fraction_of_floor": round(floor_ms / (graph_s * 1000), 3),
              "engine_overhead_ms_per_step": round(min(herd_step) * 1000 - graph_s * 1000, 3)})
        if gpu and args.profile and batch == 1:
            profile_steps(static, rows, 8, args.profile)
        summary[f"batch_{batch}_herd_vs_generate"] = round(results["herd"] / results["generate"], 2)
        if gpu:
            hw = Hardware(accelerator=catalog.accelerator(accel), devices_per_node=1)
            predicted = plan(PlanRequest(architecture=arch, hardware=hw, tensor=1, pipeline=1,
                                         max_model_len=prompt + new, concurrency=batch,
                                         max_prefill_tokens=batch * prompt), suggest=False)
            pg, parts = predicted.per_gpu_bytes, predicted.overhead_breakdown
            allocation_part = pg.weights + pg.kv_cache + parts["activations"] + parts["logits"]
            measured_alloc = peak_allocated - before + weight_bytes
            measured_device = peak_reserved - before_reserved + weight_bytes + context_bytes
            emit({"batch": batch, "planner_bytes": {"weights": pg.weights, "kv_cache": pg.kv_cache,
                                                    **parts, "total": pg.total},
                  "measured_bytes": {"weights": weight_bytes, "peak_allocated": measured_alloc,
                                     "allocator_reserve": peak_reserved - peak_allocated,
                                     "peak_reserved_plus_context": measured_device},
                  "planner_allocation_error": round(allocation_part / measured_alloc - 1, 4),
                  "planner_device_error": round(pg.total / measured_device - 1, 4)})
        del static
    emit({"summary": summary})
    report.save(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
