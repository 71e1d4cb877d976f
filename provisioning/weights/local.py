"""file:///path and plain paths: a model directory already on this host."""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from runtime.errors import UserError


def fetch_local(source: str) -> Path:
    path = Path(urlparse(source).path if source.startswith("file:") else source).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(f"model.source: {source!r}: {path} has no config.json "
                        "(expected a Hugging Face model directory)")
    return path
