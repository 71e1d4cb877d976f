"""Resumable, verified, parallel file transfer shared by every remote source.

A file arrives as `NAME.partial`, in fixed-size chunks fetched concurrently with ranged reads and
written at their offsets; each finished chunk is recorded in `NAME.partial.chunks` (whose first line
is the chunk size, so a resume with another setting still maps indices to the same bytes), so a killed
fetch resumes where it stopped. When every chunk is there the file is hashed (by one verifier thread,
from the page cache, while the next file downloads), compared with the manifest, and only then renamed
over NAME. A verified file is never replaced by an unverified one.

Every remote source (S3, GCS, the Hub) hands its file list to a Transfer, so this is where entry
names are checked (Transfer.check): a name that is not a plain relative path, or that resolves
outside the destination through a symlink already there, is refused before anything is written.
The Hub's files move through huggingface_hub's own client (provisioning/weights/hub.py) but their
names, the files already present and the partial files' paths still come from here.
"""
from __future__ import annotations

import concurrent.futures as futures
import hashlib
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from provisioning.weights.manifest import ALLOWED_NAMES, CHUNK, git_blob_sha1_of, sha256_of, unsafe_reason
from runtime.errors import UserError

# read_into(name, start, end_exclusive, buffer) -> bytes written into buffer (end - start when whole)
ReadInto = Callable[[str, int, int, memoryview], int]


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    sha256: str | None   # None: the source published no checksum (sizes are still checked)
    # The git blob id (sha1 of "blob SIZE\0" + bytes): the Hub's etag for files kept in git rather than
    # LFS (config.json, tokenizer files); checked where no sha256 is published.
    git_sha1: str | None = None


class ChecksumMismatch(Exception):
    pass


class Transfer:
    """Moves a set of files into one directory; reports bytes to a progress callback."""

    def __init__(self, read_into: ReadInto | None, dest: Path, *, source: str = "", chunk_bytes: int = 16 * 2**20,
                 concurrency: int = 8, on_bytes: Callable[[int], None] = lambda n: None):
        self.read_into, self.dest, self.source = read_into, dest, source
        self.chunk_bytes, self.concurrency, self.on_bytes = chunk_bytes, concurrency, on_bytes
        self.moved = 0
        self._lock = threading.Lock()
        self._buffers = threading.local()   # one chunk buffer per download thread, reused

    def check(self, files: list[RemoteFile]) -> None:
        """Refuse the whole list if any entry could land outside the destination: before any byte is
        read or written, so a bad listing or a tampered manifest leaves no trace anywhere."""
        root = os.path.realpath(self.dest)
        for f in files:
            reason = unsafe_reason(f.name)
            if reason is None:
                # Symlinks already in the destination: the file, its parent folders and our own
                # transfer files must all resolve inside it (realpath follows every existing link).
                final = self.dest / f.name
                for path in (final, final.with_name(final.name + ".partial"),
                             final.with_name(final.name + ".partial.chunks")):
                    real = os.path.realpath(path)
                    if real != root and not real.startswith(root.rstrip(os.sep) + os.sep):
                        reason = f"{path.relative_to(self.dest)} resolves to {real}, outside {self.dest}"
                        break
            if reason:
                raise UserError(f"{self.source or 'weights'}: entry {f.name!r} refused: {reason} "
                                f"(allowed: {ALLOWED_NAMES}, inside {self.dest}); nothing was written")

    def needed(self, files: list[RemoteFile]) -> list[RemoteFile]:
        """Files not already present and verified (a present file of the wrong size is refetched)."""
        self.check(files)
        return [f for f in files if not self._verified(f)]

    def _verified(self, f: RemoteFile) -> bool:
        return matches(self.dest / f.name, f)

    def remaining_bytes(self, f: RemoteFile) -> int:
        chunk, done = self._resume_state(f)
        return sum(min(chunk, f.size - i * chunk) for i in range(self._chunk_count(f, chunk)) if i not in done)

    def fetch(self, files: list[RemoteFile]) -> int:
        """Fetch every file not yet verified; returns bytes moved. Raises ChecksumMismatch for the first
        file that did not verify (the others are in place)."""
        self.check(files)
        self.dest.mkdir(parents=True, exist_ok=True)
        # Hashing apart from the download threads keeps them at one copy per byte; one file's hash
        # overlaps the next file's download.
        with futures.ThreadPoolExecutor(self.concurrency) as pool, futures.ThreadPoolExecutor(1) as verifier:
            checks = []
            for f in files:
                self._download(f, pool)
                checks.append(verifier.submit(self._verify_and_place, f))
            for check in checks:
                check.result()
        return self.moved

    # ---------------------------------------------------------------- one file
    @staticmethod
    def _chunk_count(f: RemoteFile, chunk: int) -> int:
        return max(1, -(-f.size // chunk))

    def paths(self, f: RemoteFile) -> tuple[Path, Path, Path]:
        """(final, NAME.partial, NAME.partial.chunks), their folder created: only for checked names."""
        return self._paths(f)

    def _paths(self, f: RemoteFile) -> tuple[Path, Path, Path]:
        final = self.dest / f.name
        final.parent.mkdir(parents=True, exist_ok=True)
        return final, final.with_name(final.name + ".partial"), final.with_name(final.name + ".partial.chunks")

    def _resume_state(self, f: RemoteFile) -> tuple[int, set[int]]:
        """(chunk size, chunks already on disk) of an interrupted transfer; a fresh start otherwise."""
        _, partial, log = self._paths(f)
        if not partial.exists() or not log.exists():
            return self.chunk_bytes, set()
        lines = log.read_text().splitlines()
        if not lines or not lines[0].startswith("chunk="):
            return self.chunk_bytes, set()
        chunk = int(lines[0].removeprefix("chunk="))
        # A line is written only after its chunk is on disk; a torn last line is ignored.
        done = {int(line[:-1]) for line in lines[1:] if line.endswith(";") and line[:-1].isdigit()}
        return chunk, done

    def _download(self, f: RemoteFile, pool: futures.ThreadPoolExecutor) -> None:
        _, partial, log = self._paths(f)
        chunk, done = self._resume_state(f)
        # O_NOFOLLOW throughout: check() refused symlinks leading out, and a link planted since then
        # fails here instead of being written through.
        if not done:
            partial.unlink(missing_ok=True)
            log.unlink(missing_ok=True)
            log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            try:
                os.write(log_fd, f"chunk={chunk}\n".encode())
            finally:
                os.close(log_fd)
        fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            os.ftruncate(fd, f.size)
            log_fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW, 0o644)
            try:
                todo = [i for i in range(self._chunk_count(f, chunk)) if i not in done]
                jobs = [pool.submit(self._chunk, f, i, chunk, fd, log_fd) for i in todo]
                for job in futures.as_completed(jobs):
                    job.result()
            finally:
                os.close(log_fd)
            # No fsync: what a crash could leave half-written is caught by the sha256 check every run
            # makes of present files, and fetched again.
        finally:
            os.close(fd)

    def _verify_and_place(self, f: RemoteFile) -> None:
        final, partial, log = self._paths(f)
        got = sha256_of(partial)
        if f.sha256 is not None and got != f.sha256:
            # Start this file over next time; the previous good copy (if any) is untouched.
            partial.unlink(missing_ok=True)
            log.unlink(missing_ok=True)
            raise ChecksumMismatch(f"{f.name}: sha256 {got[:12]}... does not match the manifest's "
                                   f"{f.sha256[:12]}...; the download was discarded")
        os.replace(partial, final)
        log.unlink(missing_ok=True)

    def _chunk(self, f: RemoteFile, index: int, chunk: int, fd: int, log_fd: int) -> None:
        if self.read_into is None:   # made to check names and paths only (the Hub's transfer)
            raise TypeError("this Transfer has no reader: it cannot fetch")
        start = index * chunk
        end = min(f.size, start + chunk)
        buffer = getattr(self._buffers, "view", None)
        if buffer is None or len(buffer) < end - start:
            buffer = self._buffers.view = memoryview(bytearray(max(chunk, end - start)))
        view = buffer[:end - start]
        got = self.read_into(f.name, start, end, view) if end > start else 0
        if got != end - start:
            raise IOError(f"{f.name}: asked for bytes {start}-{end}, got {got}")
        os.pwrite(fd, view, start)
        os.write(log_fd, f"{index};\n".encode())
        with self._lock:
            self.moved += got
        self.on_bytes(got)


def matches(path: Path, f: RemoteFile) -> bool:
    """Whether the file at path (symlinks not followed) is the listed one: its size, and its sha256 or,
    where only that is published, its git blob id."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_size != f.size:
        return False
    if f.sha256 is not None:
        return sha256_of(path) == f.sha256
    if f.git_sha1 is not None:
        return git_blob_sha1_of(path) == f.git_sha1
    return True


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


__all__ = ["CHUNK", "ChecksumMismatch", "ReadInto", "RemoteFile", "Transfer", "matches", "sha256_bytes"]
