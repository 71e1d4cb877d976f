"""Where things live on a node, shared by the runtime and the provisioning steps."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("HERD_CACHE", Path.home() / ".cache" / "herd"))


def model_dir_for(model_id: str) -> Path:
    """The converted/verified model directory for a catalog id."""
    return cache_root() / "models" / model_id
