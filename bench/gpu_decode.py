"""GPU decode speed of herd's engine against plain PyTorch, against the memory-bandwidth floor, and the
planner's memory prediction against what the GPU allocated.

One GPU, a random-init Llama-3.1-8B shape in bf16 (no weights can be downloaded on the GPU machine).
For batch 1, 8 and 32 with a 512-token prompt and 128 new tokens, three sides run the same rows:
- `generate`: transformers' eager `generate` with its dynamic cache (what most scripts call);
- `generate-static-compiled`: `generate` with `cache_implementation="static"` under torch.compile
  (mode reduce-overhead: CUDA graphs), the fastest plain-PyTorch path;
- `herd-static`: herd's engine as it ships on GPUs (fused QKV and gate/up, split-cache decode
  attention, the decode step as a CUDA graph, the host's work overlapped with the next step).
The two plain sides run on the checkpoint as loaded; herd's side on its own fused copy. Every side is
warmed up first (compilation, graph capture), then --rounds interleaved rounds, the side that goes first
alternating; best and spread (max/min) reported.
- tokens/s end to end, time to first token, ms per decode step;
- fraction of the floor: the bytes a decode step must read (every weight except the input embedding
  table, which a step only indexes, plus the KV cache at the average context) over the measured copy
  bandwidth, divided by the measured step time;
- herd's step time inside the engine (token choice, payload, host transfer included) and of the graph
  alone (steps queued back to back, one synchronisation at the end): the gap is the engine's overhead;
- the decode step's launches seen from the host: one cudaGraphLaunch per step when the graph replays;
- decode attention alone, herd's split-cache kernel against SDPA on the same grouped query, at short
  and long caches;
- memory, like for like: the planner's allocation part (weights + KV + activations + logits) against
  torch's peak allocated bytes for that batch, and the planner's device total (adds CUDA context and
  allocator reserve) against the peak reserved bytes plus the measured context.

`--tiny` runs the same code on CPU with a tiny config (a check that the script works, not a figure).
Usage: python bench/gpu_decode.py [--tiny] [--rounds 5] [--out bench/results/gpu-decode-H200.txt]
"""
from __future__ import annotations

import argparse
import copy
import functools
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
from runtime.engine.attention import split_cache  # noqa: E402
from runtime.engine.decode import Row, decode_batch  # noqa: E402
from runtime.engine.fused import fuse_projections  # noqa: E402
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
                         tie_word_embeddings=arch.tie_word_embeddings, attention_bias=arch.attention_bias)
    torch.set_default_dtype(dtype)
    with torch.device(device):      # random init on the device: seconds even for billions of weights
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


def run_generate(model, ids, new: int, device, **extra) -> tuple[float, float]:
    """(time to first token, whole run) of plain `generate`, greedy, exactly `new` tokens; `extra`
    selects the static cache and its compilation."""
    plain = {"attention_mask": torch.ones_like(ids), "do_sample": False, "pad_token_id": 0, **extra}
    total = timed(lambda: model.generate(ids, max_new_tokens=new, min_new_tokens=new, **plain), device)
    # After the full run: a static cache made for it is reused by the shorter one (no new allocation).
    ttft = timed(lambda: model.generate(ids, max_new_tokens=1, **plain), device)
    return ttft, total


@functools.cache
def static_compiled():
    """`generate`'s fastest plain-PyTorch path: a static cache, the decode step under torch.compile
    with CUDA graphs (mode reduce-overhead), shapes specialised."""
    from transformers.generation.configuration_utils import CompileConfig
    return {"cache_implementation": "static",
            "compile_config": CompileConfig(mode="reduce-overhead", dynamic=False)}


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
def step_launches(static: StaticBatch, rows, steps: int) -> dict[str, float]:
    """Launch calls per decode step seen from the host: a replayed CUDA graph is one cudaGraphLaunch;
    the model's kernels launched one by one would show as hundreds of kernel launches."""
    from torch.profiler import ProfilerActivity, profile
    static.join(rows)
    tokens = [1] * len(rows)
    static.step(tokens)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            static.step(tokens)
        torch.cuda.synchronize()
    static.keep([])
    counts = {e.key: e.count for e in prof.key_averages()}
    kernels = sum(n for k, n in counts.items()
                  if k in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC"))
    return {"graph_launches_per_step": counts.get("cudaGraphLaunch", 0) / steps,
            "kernel_launches_per_step": kernels / steps}


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


@torch.inference_mode()
def attention_alone(arch: Architecture, device, dtype, emit) -> None:
    """Decode attention of one layer, herd's split-cache kernel against SDPA on the same grouped query
    and mask, each captured 20 times in a CUDA graph and replayed (device time, no launch gaps)."""
    import torch.nn.functional as F

    from runtime.engine import split_kv_attention
    kv, group, dim = arch.num_key_value_heads, arch.num_attention_heads // arch.num_key_value_heads, arch.head_dim
    for batch, length in [(1, 640), (1, 4096), (1, 32768), (32, 640), (32, 4096)]:
        q = torch.randn(batch, kv, group, dim, device=device, dtype=dtype)
        k, v = (torch.randn(batch, kv, length, dim, device=device, dtype=dtype) for _ in range(2))
        mask = torch.ones(batch, 1, 1, length, dtype=torch.bool, device=device)
        mask[..., length - length // 8:] = False    # a static cache's unused end
        sides = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=dim ** -0.5),
                 "herd_split": lambda: split_kv_attention.decode(q, k, v, mask, dim ** -0.5)}
        row = {"bench": "decode_attention", "batch": batch, "cache": length}
        for name, fn in sides.items():
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(20):
                    fn()
            graph.replay()
            torch.cuda.synchronize()
            best = min(timed(graph.replay, device) for _ in range(5))
            row[f"{name}_us"] = round(best / 20 * 1e6, 2)
        row["bytes_read_MB"] = round(2 * k.numel() * k.element_size() * 7 / 8 / 1e6, 1)
        row["herd_split_GBps"] = round(row["bytes_read_MB"] * 1e6 / (row["herd_split_us"] * 1e-6) / 1e9, 1)
        row["sdpa_over_herd"] = round(row["sdpa_us"] / row["herd_split_us"], 2)
        emit(row)


def versions() -> dict:
    return {"torch": torch.__version__, "transformers": importlib.metadata.version("transformers"),
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "git_sha": os.environ.get("HERD_GIT_SHA", "unknown")}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny config: checks the script runs")
    parser.add_argument("--batches", default="1,32,8")   # the goals' batches first
    parser.add_argument("--rounds", type=int, default=5)
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
    model = build(arch, device, dtype)          # the checkpoint as loaded: the plain sides
    herd_model = copy.deepcopy(model)          # herd's side, as herd loads it on a GPU: fused
    fused_modules = fuse_projections(herd_model)
    read_bytes = step_read_bytes(model)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_per_token = arch.kv_bytes_per_token(2 if gpu else 4)
    accel = next((v for k, v in ACCELERATORS.items() if k in name), "h100-80gb")
    emit({"herd_model": {"fused_modules": fused_modules, "decode_attention":
                         "herd_split" if split_cache(device.type) else "sdpa",
                         "overlap_host": gpu}})
    if gpu:
        try:
            attention_alone(arch, device, dtype, emit)
        except Exception as err:   # noqa: BLE001
            emit({"bench": "decode_attention", "error": f"{type(err).__name__}: {err}"[:2000]})
    summary = {}
    sides = ["generate", "generate-static-compiled", "herd-static"] if gpu else ["generate", "herd-static"]

    for batch in [int(b) for b in args.batches.split(",")]:
        ids = torch.randint(1, arch.vocab_size, (batch, prompt), device=device)
        rows = [Row(ids[i].tolist(), new, id=str(i)) for i in range(batch)]
        if gpu:
            gc.collect()
            torch.cuda.empty_cache()
            before, before_reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        static = StaticBatch(herd_model, pad_id=0, max_len=prompt + new)
        herd_step: list[float] = []

        def run(side):
            if side == "herd-static":
                ttft, total, step = run_herd(herd_model, rows, static, device)
                herd_step.append(step)
                return ttft, total
            # One CompileConfig for every call: generate keeps its compiled step while the config is equal.
            return run_generate(model, ids, new, device, **(static_compiled() if side.endswith("compiled") else {}))
        # Warm-up, every side: compilation and graph capture, kernels and caches. A side that cannot
        # run is reported and left out (herd's falls back to SDPA decode attention once).
        started = time.perf_counter()
        try:
            run("herd-static")
        except Exception as err:   # noqa: BLE001 - the run reports it and measures the rest
            emit({"batch": batch, "error": f"herd-static: {type(err).__name__}: {err}"[:2000],
                  "fallback": "HERD_DECODE_ATTENTION=sdpa"})
            os.environ["HERD_DECODE_ATTENTION"] = "sdpa"
            torch._dynamo.reset()
            static = StaticBatch(herd_model, pad_id=0, max_len=prompt + new)
            run("herd-static")
        herd_step.clear()
        warm = {"herd-static": round(time.perf_counter() - started, 1)}
        peak_allocated = peak_reserved = 0
        if gpu:   # herd alone: generate's caches and blocks must not count in herd's peaks
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            run("herd-static")
            herd_step.clear()
            peak_allocated, peak_reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        for side in list(sides[:-1]):
            started = time.perf_counter()
            try:
                run(side)
            except Exception as err:   # noqa: BLE001
                emit({"batch": batch, "error": f"{side}: {type(err).__name__}: {err}"[:2000]})
                sides = [s for s in sides if s != side]
                continue
            warm[side] = round(time.perf_counter() - started, 1)
        emit({"batch": batch, "warmup_s": warm})
        times: dict[str, list[tuple[float, float]]] = {side: [] for side in sides}   # (ttft, total)
        for r in range(args.rounds):   # interleaved, the first side alternating: drift hits all alike
            for side in (sides if r % 2 == 0 else sides[::-1]):
                times[side].append(run(side))
        graph_s = min(graph_step(static, rows, 32, device) for _ in range(3))
        floor_ms = (read_bytes + kv_per_token * (prompt + new / 2) * batch) / bw * 1000
        rates = {}
        for side in sides:
            ttft = min(t for t, _ in times[side])
            totals = [t for _, t in times[side]]
            ms_step = (min(herd_step) * 1000 if side == "herd-static"
                       else max(min(totals) - ttft, 1e-9) / (new - 1) * 1000)
            rates[side] = batch * new / min(totals)
            emit({"batch": batch, "engine": side, "tokens_per_s": round(rates[side], 1),
                  "ms_per_step": round(ms_step, 3), "floor_ms_per_step": round(floor_ms, 3),
                  "fraction_of_floor": round(floor_ms / ms_step, 3), "ttft_s": round(ttft, 4),
                  "totals_s": [round(t, 4) for t in totals], "spread_max_over_min": round(max(totals) / min(totals), 3)})
        launches = step_launches(static, rows, 8) if gpu else {}
        emit({"batch": batch, "engine": "herd-graph-only", "ms_per_step": round(graph_s * 1000, 3),
              "fraction_of_floor": round(floor_ms / (graph_s * 1000), 3),
              "engine_overhead_ms_per_step": round(min(herd_step) * 1000 - graph_s * 1000, 3), **launches})
        if gpu and args.profile and batch == 1:
            profile_steps(static, rows, 8, args.profile)
        for side in sides[:-1]:
            summary[f"batch_{batch}_herd_vs_{side}"] = round(rates["herd-static"] / rates[side], 2)
        summary[f"batch_{batch}_herd_fraction_of_floor"] = round(floor_ms / (min(herd_step) * 1000), 3)
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
        report.save(args.out)      # what is measured so far survives a stage's time limit
        if gpu:
            torch._dynamo.reset()   # this batch's graphs and their memory pools go
    emit({"summary": summary})
    report.save(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
