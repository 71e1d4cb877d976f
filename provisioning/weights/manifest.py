"""A model directory's manifest: every file's size and sha256, written last, checked on reuse."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "herd-manifest.json"
CHUNK = 8 * 2**20


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path, source: str) -> dict:
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256_of(p)}
             for p in sorted(directory.iterdir())
             if p.is_file() and p.name != MANIFEST and not p.name.endswith((".partial", ".partial.chunks"))}
    manifest = {"source": source, "files": files}
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(directory / MANIFEST)
    return manifest


def write_manifest_entries(directory: Path, source: str, known: dict[str, str | None]) -> dict:
    """A manifest for fetched files: the store's sha256 where it published one, computed otherwise."""
    files = {}
    for name, sha in sorted(known.items()):
        path = directory / name
        files[name] = {"size": path.stat().st_size, "sha256": sha or sha256_of(path)}
    manifest = {"source": source, "files": files}
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(directory / MANIFEST)
    return manifest


def verify(directory: Path, deep: bool = True) -> list[str]:
    """Problems found (empty = verified). Without a manifest the directory is unverified."""
    path = directory / MANIFEST
    if not path.is_file():
        return [f"{directory}: no {MANIFEST}"]
    problems = []
    for name, want in json.loads(path.read_text())["files"].items():
        file = directory / name
        if not file.is_file():
            problems.append(f"{name}: missing")
        elif file.stat().st_size != want["size"]:
            problems.append(f"{name}: size {file.stat().st_size} != {want['size']}")
        elif deep and sha256_of(file) != want["sha256"]:
            problems.append(f"{name}: sha256 mismatch")
    return problems
