"""file:///path and plain paths: a model directory already on this host, used in place (no copy).

With a herd-manifest.json beside it (`herd weights publish` writes one, every fetch leaves one), every
file is checked against it (size and sha256) before the directory is used; without one it is used as
it is, and said so."""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from rich.console import Console

from provisioning.weights.manifest import MANIFEST, verify
from runtime.errors import UserError


def fetch_local(source: str, *, quiet: bool = False, report=None, field: str = "model.source",
                marker: str = "config.json") -> Path:
    path = Path(urlparse(source).path if source.startswith("file:") else source).expanduser()
    if not (path / marker).is_file():
        what = "a LoRA adapter directory" if marker == "adapter_config.json" else "a Hugging Face model directory"
        raise UserError(f"{field}: {source!r}: {path} has no {marker} (expected {what})")
    console = Console(stderr=True, quiet=quiet)
    files = [p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST]
    if report is not None:
        report.files = report.reused_files = len(files)
        report.bytes_total = sum(p.stat().st_size for p in files)
    if not (path / MANIFEST).is_file():
        if report is not None:
            report.unverified = sorted(str(p.relative_to(path)) for p in files)
        console.print(f"weights: {path} used in place, unverified (no {MANIFEST}; "
                      f"`herd weights publish` or a fetch writes one)")
        return path
    with console.status(f"weights: verifying {path} against its {MANIFEST}"):
        problems = verify(path)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"{field}: {source!r}: {path} does not match its {MANIFEST}: {problems[0]}{more}")
    console.print(f"weights: {path} used in place, verified against its {MANIFEST}")
    return path
