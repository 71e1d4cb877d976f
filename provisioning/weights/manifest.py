"""A model directory's manifest: every file's size and sha256, written last, checked on reuse."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "herd-manifest.json"
CHUNK = 8 * 2**20
# Our own files beside the weights: an entry of a store or manifest named like one of them could
# overwrite another file's transfer in progress.
RESERVED_SUFFIXES = (".partial", ".partial.chunks")
ALLOWED_NAMES = ("relative names of non-empty segments separated by '/', "
                 "without '..' or '.' segments, backslashes or NUL")


def unsafe_reason(name: str) -> str | None:
    """Why an entry name (from a store listing, a hub listing or a manifest) could write outside the
    model directory or over our own files; None when it is a plain relative name. Lexical only: the
    transfer also resolves symlinks already on disk (see Transfer.check)."""
    if not isinstance(name, str) or not name:
        return "an empty name"
    if "\0" in name:
        return "a NUL byte in the name"
    if "\\" in name:
        # Not a separator on Linux, but one to Windows tools and to anything that normalises paths;
        # no model file needs one.
        return "a backslash in the name"
    if name.startswith("/"):
        return "an absolute path"
    for segment in name.split("/"):
        if segment in ("", "."):
            return "an empty or '.' path segment"
        if segment == "..":
            return "a '..' path segment"
    if name.endswith(RESERVED_SUFFIXES) or name == MANIFEST + ".tmp":
        return "a name reserved for herd's own transfer files"
    return None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def git_blob_sha1_of(path: Path) -> str:
    """The git blob id of a file: what the Hub lists (and sends as its etag) for files not in LFS."""
    digest = hashlib.sha1(b"blob %d\0" % os.path.getsize(path), usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path, source: str) -> dict:
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256_of(p)}
             for p in sorted(directory.iterdir())
             if p.is_file() and p.name != MANIFEST and not p.name.endswith((".partial", ".partial.chunks"))}
    manifest = {"source": source, "files": files}
    _write_replacing(directory, json.dumps(manifest, indent=1))
    return manifest


def _write_replacing(directory: Path, text: str) -> None:
    """Write the manifest beside itself and rename it over the old one. A symlink left where the
    temporary file goes is removed, never written through (O_NOFOLLOW, O_EXCL)."""
    tmp = directory / (MANIFEST + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, directory / MANIFEST)   # replaces a symlink named MANIFEST itself, not its target


def write_manifest_entries(directory: Path, source: str, known: dict[str, str | None],
                           extra: dict | None = None) -> dict:
    """A manifest for fetched files: the store's sha256 where it published one, computed otherwise;
    `extra` adds fields (the Hub's commit)."""
    files = {}
    for name, sha in sorted(known.items()):
        path = directory / name
        files[name] = {"size": path.stat().st_size, "sha256": sha or sha256_of(path)}
    manifest = {"source": source, **(extra or {}), "files": files}
    _write_replacing(directory, json.dumps(manifest, indent=1))
    return manifest


def verify(directory: Path, deep: bool = True) -> list[str]:
    """Problems found (empty = verified). Without a manifest the directory is unverified."""
    path = directory / MANIFEST
    if not path.is_file():
        return [f"{directory}: no {MANIFEST}"]
    problems = []
    root = os.path.realpath(directory)
    for name, want in json.loads(path.read_text())["files"].items():
        file = directory / name
        # A tampered manifest must not vouch for files elsewhere (an entry resolving outside the
        # directory is a problem, not a file to hash).
        reason = unsafe_reason(name) or (None if _inside(root, file) else "resolves outside the directory")
        if reason:
            problems.append(f"{name!r}: refused: {reason}")
        elif not file.is_file():
            problems.append(f"{name}: missing")
        elif file.stat().st_size != want["size"]:
            problems.append(f"{name}: size {file.stat().st_size} != {want['size']}")
        elif deep and sha256_of(file) != want["sha256"]:
            problems.append(f"{name}: sha256 mismatch")
    return problems


def _inside(root: str, path: Path) -> bool:
    real = os.path.realpath(path)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)
