"""Where things live on a node, shared by the runtime and the provisioning steps."""
from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse


def cache_root() -> Path:
    return Path(os.environ.get("HERD_CACHE", Path.home() / ".cache" / "herd"))


def model_dir_for(model_id: str) -> Path:
    """The converted/verified model directory for a catalog id."""
    return cache_root() / "models" / model_id


def adapter_dir_for(model_dir: Path, name: str, source: str = "") -> Path:
    """Where a LoRA adapter of the model in `model_dir` is served from: a local source in place (as the
    weights are), else fetched beside the model, never inside it (the model's manifest covers the
    model's files only)."""
    if source.startswith("file:") or source.startswith("/"):
        return Path(urlparse(source).path if source.startswith("file:") else source)
    return model_dir.with_name(f"{model_dir.name}.adapters") / name


def guard_dir_for(model_dir: Path, model_id: str, source: str | None = None) -> Path:
    """Where the guard herd serves (serving.guard.model) is loaded from: a local source in place, else
    beside the served model, under its own id (the same directory when the guard is the served model)."""
    source = source or ""
    if source.startswith("file:") or source.startswith("/"):
        return Path(urlparse(source).path if source.startswith("file:") else source)
    return model_dir.parent / model_id
