"""hf://ORG/REPO[@REVISION]: the Hugging Face Hub through its own client, huggingface_hub, with herd's
manifest and sha256 verification on top.

Everything the Hub's client knows is taken from it, never re-implemented: the endpoint (HF_ENDPOINT),
the token (HF_TOKEN, or the one `hf auth login` saved), offline mode (HF_HUB_OFFLINE), proxies (the
usual *_PROXY variables), the cache (HF_HUB_CACHE, or HF_HOME/hub). herd only asks whether a token
exists (to word the gated-repo error); it never prints or logs one.

1. Listing: `HfApi().model_info(files_metadata=True)`: each file's size, the sha256 of LFS files, the
   git blob id of the small ones, and the commit the revision points at. Offline (HF_HUB_OFFLINE=1, or
   the Hub unreachable): the snapshot of that revision in the user's Hugging Face cache, each file's
   expected hash being the name of its blob there (the Hub's etag: sha256 for LFS files, git blob id
   for the others). Every name goes through Transfer.check before anything is read or written.
2. The user's Hugging Face cache is read, never written: a file already there is hashed against the
   listing and, when it matches, hard-linked (copied across filesystems) into the model directory:
   0 bytes downloaded. A cached file that does not match is left exactly as it is and the file is
   fetched again into the model directory.
3. Transfer, per missing file: the Hub's metadata (`get_hf_file_metadata`, a HEAD on the resolve URL
   that redirects LFS files to the CDN); files stored with Xet go through hf_xet (`xet_get`), the
   others through huggingface_hub's `http_get` to the CDN location, into NAME.partial, hashed while
   they arrive. An interrupted HTTP transfer keeps its bytes, tagged with the etag they belong to
   (NAME.partial.chunks), and the next run asks only for the rest (a Range request). A file is renamed
   over NAME only once its hash matches the listing, so a verified copy is never replaced by a bad one.
"""
from __future__ import annotations

import concurrent.futures as futures
import hashlib
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast
from urllib.parse import urlparse

from tqdm import tqdm   # huggingface_hub's dependency; its downloads take a tqdm class for progress

from provisioning.weights.manifest import CHUNK, unsafe_reason
from provisioning.weights.transfer import ChecksumMismatch, RemoteFile, Transfer, matches
from runtime.errors import UserError

# What serving needs from a Hugging Face repo (not the .bin/.pth duplicates or original/ folders).
HF_WANTED_SUFFIXES = (".safetensors", ".safetensors.index.json", ".model", ".jinja")
HF_WANTED_NAMES = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt"}
SHA256 = re.compile(r"[0-9a-f]{64}")
GIT_SHA1 = re.compile(r"[0-9a-f]{40}")
ETAG_TAG = "hub-etag="   # first line of NAME.partial.chunks for a Hub transfer


def wanted(name: str) -> bool:
    return "/" not in name and (name in HF_WANTED_NAMES or name.endswith(HF_WANTED_SUFFIXES))


def parse(uri: str) -> tuple[str, str | None]:
    parsed = urlparse(uri)
    repo, _, revision = (parsed.netloc + parsed.path).strip("/").partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise UserError(f"model.source: {uri!r}: expected hf://ORG/REPO[@REVISION]")
    return repo, revision or None


@dataclass
class Listing:
    files: list[RemoteFile]
    commit: str | None
    offline_reason: str | None = None       # why the listing came from the cache, not the Hub
    snapshot: Path | None = None            # the cache snapshot it came from (offline)


def _endpoint() -> str:
    from huggingface_hub import constants
    return constants.ENDPOINT


def _cache_dir() -> Path:
    from huggingface_hub import constants
    return Path(constants.HF_HUB_CACHE)


def _has_token() -> bool:
    from huggingface_hub import get_token
    return get_token() is not None


def _gated(uri: str, repo: str) -> UserError:
    held = ("the token in use has no access to it" if _has_token()
            else "no token was found (HF_TOKEN, or `hf auth login`)")
    return UserError(f"{uri}: {repo} is gated and {held}: accept its licence at {_endpoint()}/{repo} with "
                     "your account, then run `hf auth login` or set HF_TOKEN to a token of that account")


class HubSource:
    def __init__(self, uri: str):
        self.uri = uri
        self.repo, self.revision = parse(uri)

    # ------------------------------------------------------------------ listing
    def list(self) -> Listing:
        import httpx2
        from huggingface_hub import HfApi
        from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled,
                                            RepositoryNotFoundError, RevisionNotFoundError)
        try:
            info = HfApi().model_info(self.repo, revision=self.revision, files_metadata=True)
        except OfflineModeIsEnabled:
            return self.list_cached("HF_HUB_OFFLINE is set")
        except (httpx2.ConnectError, httpx2.TimeoutException) as err:
            return self.list_cached(f"{_endpoint()} cannot be reached ({type(err).__name__})")
        except GatedRepoError:
            raise _gated(self.uri, self.repo) from None
        except RevisionNotFoundError:
            raise UserError(f"{self.uri}: revision {self.revision!r} does not exist in {self.repo}") from None
        except RepositoryNotFoundError:
            hint = "" if _has_token() else " (private? run `hf auth login` or set HF_TOKEN)"
            raise UserError(f"{self.uri}: repository {self.repo!r} not found on {_endpoint()}{hint}") from None
        except HfHubHTTPError as err:
            raise UserError(f"{self.uri}: the Hub answered HTTP {err.response.status_code} to the listing") from None
        files = []
        for s in info.siblings or []:
            # Subfolders and unwanted files are skipped; a malformed name (`../x`, `/etc/x`) is not:
            # it goes on to the transfer, which refuses the listing and names it.
            if unsafe_reason(s.rfilename) is None and not wanted(s.rfilename):
                continue
            size = s.size if s.size is not None else (s.lfs.size if s.lfs else None)
            if size is None:
                raise UserError(f"{self.uri}: the Hub listed {s.rfilename!r} without a size")
            files.append(RemoteFile(s.rfilename, size, s.lfs.sha256 if s.lfs else None,
                                    None if s.lfs else s.blob_id))
        self._require_weights(files)
        return Listing(sorted(files, key=lambda f: f.name), info.sha)

    def list_cached(self, why: str) -> Listing:
        """The revision's snapshot in the user's cache, expected hashes from its blob names."""
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError
        where = f"{self.repo}@{self.revision or 'main'}"
        try:
            snapshot = Path(snapshot_download(self.repo, revision=self.revision, local_files_only=True,
                                              allow_patterns=[f"*{s}" for s in HF_WANTED_SUFFIXES]
                                              + sorted(HF_WANTED_NAMES)))
        except IncompleteSnapshotError as err:
            missing = re.search(r"\d+ file\(s\) are missing \([^)]*\)", str(err))
            raise UserError(f"{self.uri}: {why}, and the Hugging Face cache's snapshot of {where} is "
                            f"incomplete{f' ({missing.group(0)})' if missing else ''}") from None
        except LocalEntryNotFoundError:
            raise UserError(f"{self.uri}: {why}, and the Hugging Face cache ({_cache_dir()}) holds no "
                            f"snapshot of {where}: fetch it once with the Hub reachable") from None
        files = []
        for entry in sorted(os.scandir(snapshot), key=lambda e: e.name):
            if not wanted(entry.name) or not entry.is_file():
                continue
            blob = os.path.basename(os.path.realpath(entry.path))
            files.append(RemoteFile(entry.name, entry.stat().st_size,
                                    blob if SHA256.fullmatch(blob) else None,
                                    blob if GIT_SHA1.fullmatch(blob) else None))
        self._require_weights(files, f" in the cache's snapshot {snapshot}")
        self._require_shards(files, snapshot)
        return Listing(files, snapshot.name, offline_reason=why, snapshot=snapshot)

    def _require_weights(self, files: list[RemoteFile], where: str = "") -> None:
        if not any(f.name.endswith(".safetensors") for f in files):
            raise UserError(f"{self.uri}: no .safetensors weights{where}")

    def _require_shards(self, files: list[RemoteFile], snapshot: Path) -> None:
        """Offline there is no listing to say what is missing; a sharded checkpoint's index does."""
        import json
        names = {f.name for f in files}
        for index in (f.name for f in files if f.name.endswith(".safetensors.index.json")):
            try:
                shards = set(json.loads((snapshot / index).read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError, AttributeError):
                raise UserError(f"{self.uri}: {index} in the cache's snapshot is not a safetensors index") from None
            missing = sorted(shards - names)
            if missing:
                raise UserError(f"{self.uri}: the Hub cannot be reached and the cache's snapshot {snapshot} "
                                f"lacks {', '.join(missing[:3])}" + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
        if "config.json" not in names:
            raise UserError(f"{self.uri}: the Hub cannot be reached and the cache's snapshot {snapshot} lacks config.json")

    # ------------------------------------------------------------------ the user's cache
    def cached_candidates(self, f: RemoteFile, commit: str | None) -> list[Path]:
        """Where the user's Hugging Face cache may hold this file: the snapshot of this commit, else
        the blob named by its hash (any revision that holds the same bytes)."""
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.file_download import repo_folder_name
        found = []
        for revision in dict.fromkeys(r for r in (commit, self.revision) if r):
            try:
                path = try_to_load_from_cache(self.repo, f.name, revision=revision)
            except ValueError:   # a name the library itself refuses
                path = None
            if isinstance(path, str):
                found.append(Path(path))
        etag = f.sha256 or f.git_sha1
        if etag:
            blob = _cache_dir() / repo_folder_name(repo_id=self.repo, repo_type="model") / "blobs" / etag
            if blob.is_file():
                found.append(blob)
        unique: dict[str, Path] = {}
        for path in found:
            unique.setdefault(os.path.realpath(path), path)
        return [Path(real) for real in unique]


class _Quiet(tqdm):
    """A progress bar for huggingface_hub that shows nothing (herd draws its own): tqdm, disabled."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "disable": True})


class _Incoming:
    """The partial file http_get writes into, hashing what arrives (after the bytes kept from an
    interrupted run) with the one hash the listing gives for it: sha256 for LFS files, the git blob id
    for the others. http_get rewinds and truncates it when a server ignores the Range."""

    def __init__(self, out, file: RemoteFile, on_bytes):
        self.f, self.file, self.on_bytes = out, file, on_bytes
        self.digest = self._fresh()
        self.received = 0

    def _fresh(self):
        if self.file.sha256 is None and self.file.git_sha1 is not None:
            return hashlib.sha1(b"blob %d\0" % self.file.size, usedforsecurity=False)
        return hashlib.sha256()

    def absorb_prefix(self) -> int:
        self.f.seek(0)
        while block := self.f.read(CHUNK):
            self.digest.update(block)
        return self.f.tell()

    def write(self, data) -> int:
        n = self.f.write(data)
        self.digest.update(data)
        self.received += n
        self.on_bytes(n)
        return n

    def tell(self) -> int:
        return self.f.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.f.seek(offset, whence)

    def truncate(self, size: int | None = None) -> int:
        at = self.f.truncate(size)
        if self.f.tell() == 0:
            self.digest = self._fresh()
        return at

    def flush(self) -> None:
        self.f.flush()


@dataclass
class HubResult:
    moved: int = 0              # bytes received from the Hub (or its CDN)
    from_cache: int = 0         # files taken from the user's Hugging Face cache
    cache_mismatches: tuple[str, ...] = ()   # cached files that did not verify (left untouched)


class HubTransfer:
    """Fills the model directory for one listing: present and verified files stay, cached ones are
    linked in, the rest are downloaded through huggingface_hub."""

    def __init__(self, source: HubSource, dest: Path, listing: Listing, *, concurrency: int = 8,
                 on_bytes=lambda n: None):
        self.source, self.dest, self.listing = source, dest, listing
        self.concurrency, self.on_bytes = max(1, concurrency), on_bytes
        self.transfer = Transfer(None, dest, source=source.uri)
        self._lock = threading.Lock()
        self.result = HubResult()

    def plan(self, needed: list[RemoteFile]) -> tuple[dict[str, Path], list[RemoteFile], list[str]]:
        """(files to take from the cache -> the verified cached file, files to download, names whose
        cached copy did not verify). Hashing the cached candidates runs in parallel."""
        def look(f: RemoteFile):
            bad = []
            for path in self.source.cached_candidates(f, self.listing.commit):
                if matches(path, f):
                    return f, path, bad
                bad.append(path)
            return f, None, bad
        from_cache, download, mismatched = {}, [], []
        with futures.ThreadPoolExecutor(self.concurrency) as pool:
            for f, path, bad in pool.map(look, needed):
                if path is not None:
                    from_cache[f.name] = path
                else:
                    download.append(f)
                    if bad:
                        mismatched.append(f.name)
        return from_cache, download, mismatched

    def resumable_bytes(self, f: RemoteFile) -> int:
        _, partial, log = self.transfer.paths(f)
        if self._partial_etag(log) is None:
            return 0
        try:
            return min(os.lstat(partial).st_size, f.size)
        except OSError:
            return 0

    @staticmethod
    def _partial_etag(log: Path) -> str | None:
        try:
            first = log.read_text().split("\n", 1)[0]
        except OSError:
            return None
        return first.removeprefix(ETAG_TAG) if first.startswith(ETAG_TAG) else None

    # ------------------------------------------------------------------ from the cache
    def place_from_cache(self, f: RemoteFile, cached: Path) -> None:
        """Bring a verified cached file in via NAME.partial; the cache file itself is only read.
        LFS files (the weights: large, never edited) are cloned where the filesystem can (a reflink:
        shared blocks, copy-on-write), else hard-linked (same inode: no second copy on disk), else
        copied; the small git files (config, tokenizer: what people edit) are always copied, so an
        edit in the model directory can never reach the user's cache."""
        final, partial, log = self.transfer.paths(f)
        partial.unlink(missing_ok=True)
        log.unlink(missing_ok=True)
        if f.sha256 is None or not (_reflink(cached, partial) or _hardlink(cached, partial)):
            self._copy_verified(f, cached, partial)
        elif not matches(partial, f):   # changed between the check and the link
            partial.unlink(missing_ok=True)
            raise ChecksumMismatch(f"{f.name}: the cached copy changed while it was being linked")
        os.replace(partial, final)
        with self._lock:
            self.result.from_cache += 1
        self.on_bytes(f.size)

    def _copy_verified(self, f: RemoteFile, cached: Path, partial: Path) -> None:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as out, open(cached, "rb") as src:
            incoming = _Incoming(out, f, lambda n: None)
            while block := src.read(CHUNK):
                incoming.write(block)
        if not self._hash_ok(f, incoming):
            partial.unlink(missing_ok=True)
            raise ChecksumMismatch(f"{f.name}: the copy from the Hugging Face cache did not verify")

    # ------------------------------------------------------------------ from the Hub
    def download(self, f: RemoteFile) -> None:
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, RemoteEntryNotFoundError,
                                            RepositoryNotFoundError)
        from huggingface_hub.utils import build_hf_headers
        revision = self.listing.commit or self.source.revision
        url = hf_hub_url(self.source.repo, f.name, revision=revision)
        final, partial, log = self.transfer.paths(f)
        try:
            meta = get_hf_file_metadata(url)
        except GatedRepoError:
            raise _gated(self.source.uri, self.source.repo) from None
        except RemoteEntryNotFoundError:
            raise UserError(f"{self.source.uri}: {f.name} is listed but the Hub has no such file") from None
        except RepositoryNotFoundError:
            raise UserError(f"{self.source.uri}: {f.name}: access refused (run `hf auth login` or set "
                            "HF_TOKEN to a token with access)") from None
        except HfHubHTTPError as err:
            raise UserError(f"{self.source.uri}: {f.name}: HTTP {err.response.status_code} from the Hub") from None
        if meta.size is not None and meta.size != f.size:
            raise UserError(f"{self.source.uri}: {f.name}: the Hub lists {f.size} bytes but serves {meta.size}")
        etag = meta.etag or f.sha256 or f.git_sha1 or ""
        headers = build_hf_headers()   # with the token the library finds; never logged by herd
        from huggingface_hub.utils._runtime import is_xet_available
        if meta.xet_file_data is not None and is_xet_available():
            self._download_xet(f, meta, headers, partial, log, etag)
        else:
            location = meta.location or url
            if not _same_host(location, url):
                # A signed CDN URL: the Hub's token stays with the Hub (as huggingface_hub does).
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            self._download_http(f, location, headers, partial, log, etag)
        os.replace(partial, final)
        log.unlink(missing_ok=True)

    def _download_http(self, f: RemoteFile, location: str, headers: dict, partial: Path, log: Path,
                       etag: str) -> None:
        import httpx2
        from huggingface_hub.errors import HfHubHTTPError
        from huggingface_hub.file_download import http_get
        resume = self._partial_etag(log) == etag
        if not resume:
            partial.unlink(missing_ok=True)
            log.unlink(missing_ok=True)
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "w") as out:
                out.write(f"{ETAG_TAG}{etag}\n")
        fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "r+b") as out:
            if os.fstat(fd).st_size > f.size:   # longer than the file: not a prefix of it
                out.truncate(0)
            incoming = _Incoming(out, f, self._count)
            have = incoming.absorb_prefix() if resume else 0
            self.on_bytes(have)
            try:
                # http_get declares a BinaryIO and uses write, tell, seek and truncate: _Incoming's.
                http_get(location, cast(BinaryIO, incoming), resume_size=have, headers=headers, expected_size=f.size,
                         displayed_filename=f.name, tqdm_class=_Quiet)
            except HfHubHTTPError as err:
                raise UserError(f"{self.source.uri}: {f.name}: HTTP {err.response.status_code} after "
                                f"{have + incoming.received} of {f.size} bytes; what arrived is kept: run "
                                "again to fetch the rest") from None
            except (httpx2.TransportError, OSError) as err:
                raise UserError(f"{self.source.uri}: {f.name}: transfer failed after {have + incoming.received} "
                                f"of {f.size} bytes ({type(err).__name__}); what arrived is kept: run again "
                                "to fetch the rest") from None
        if not self._hash_ok(f, incoming):
            partial.unlink(missing_ok=True)
            log.unlink(missing_ok=True)
            raise ChecksumMismatch(self._mismatch(f, incoming.digest.hexdigest()))

    def _download_xet(self, f: RemoteFile, meta, headers: dict, partial: Path, log: Path, etag: str) -> None:
        """hf_xet writes the whole file itself (its chunks deduplicated and cached by hf_xet): no byte
        ranges to resume here, so an interrupted Xet transfer starts the file over."""
        from huggingface_hub.file_download import xet_get
        partial.unlink(missing_ok=True)
        log.unlink(missing_ok=True)
        xet_get(incomplete_path=partial, xet_file_data=meta.xet_file_data, headers=headers,
                expected_size=f.size, displayed_filename=f.name, tqdm_class=_Quiet)
        self._count(f.size)
        with open(partial, "rb") as src:
            incoming = _Incoming(src, f, lambda n: None)
            incoming.absorb_prefix()
        if not self._hash_ok(f, incoming):
            partial.unlink(missing_ok=True)
            raise ChecksumMismatch(self._mismatch(f, incoming.digest.hexdigest()))

    def _count(self, n: int) -> None:
        with self._lock:
            self.result.moved += n
        self.on_bytes(n)

    @staticmethod
    def _hash_ok(f: RemoteFile, incoming: _Incoming) -> bool:
        want = f.sha256 or f.git_sha1
        return want is None or incoming.digest.hexdigest() == want

    @staticmethod
    def _mismatch(f: RemoteFile, got: str) -> str:
        kind = "sha256" if f.sha256 else "git blob id"
        return (f"{f.name}: {kind} {got[:12]}... does not match the Hub's {kind} "
                f"{(f.sha256 or f.git_sha1 or '')[:12]}...; the download was discarded")

    # ------------------------------------------------------------------ all together
    def run(self, from_cache: dict[str, Path], download: list[RemoteFile]) -> None:
        """Cached files first (local), then downloads, `concurrency` at a time; the first failure
        stops new work and is raised once the running ones end (their bytes kept)."""
        by_name = {f.name: f for f in self.listing.files}
        with futures.ThreadPoolExecutor(self.concurrency) as pool:
            jobs = [pool.submit(self.place_from_cache, by_name[name], path) for name, path in from_cache.items()]
            jobs += [pool.submit(self.download, f) for f in download]
            failure = None
            for job in futures.as_completed(jobs):
                try:
                    job.result()
                except BaseException as err:   # noqa: BLE001 - re-raised below
                    if failure is None:
                        failure = err
                        for other in jobs:
                            other.cancel()
            if failure is not None:
                raise failure


def _reflink(src: Path, dst: Path) -> bool:
    """A copy-on-write clone (FICLONE: btrfs, XFS, bcachefs; not ext4); False where unsupported."""
    import fcntl
    ficlone = 0x40049409
    try:
        with open(src, "rb") as s:
            fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            try:
                fcntl.ioctl(fd, ficlone, s.fileno())
                return True
            except OSError:
                return False
            finally:
                os.close(fd)
    except OSError:
        return False
    finally:
        if not (os.path.exists(dst) and os.path.getsize(dst) == os.path.getsize(src)):
            dst.unlink(missing_ok=True)


def _hardlink(src: Path, dst: Path) -> bool:
    """False across filesystems, or where the kernel refuses (protected_hardlinks: a cache of
    another user's)."""
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst, follow_symlinks=False)
        return True
    except OSError:
        return False


def _same_host(a: str, b: str) -> bool:
    return urlparse(a).netloc == urlparse(b).netloc


def fetch_hub(source: str, dest: Path, *, console, progress, task, report, concurrency: int = 8) -> None:
    """The hf:// part of a fetch (fetching.fetch_remote draws the progress and writes the manifest)."""
    from provisioning.weights.manifest import write_manifest_entries
    hub = HubSource(source)
    with console.status("weights: listing the repository"):
        listing = hub.list()
    if listing.offline_reason:
        console.print(f"weights: {listing.offline_reason}: using the Hugging Face cache's snapshot {listing.snapshot}")
    files = listing.files
    report.files, report.bytes_total = len(files), sum(f.size for f in files)
    progress.update(task, total=report.bytes_total)
    mover = HubTransfer(hub, dest, listing, concurrency=concurrency, on_bytes=lambda n: progress.advance(task, n))
    started = time.monotonic()
    with console.status("weights: checking what is already here"):
        needed = mover.transfer.needed(files)   # refuses names that would leave dest, before any write
        from_cache, download, mismatched = mover.plan(needed)
    if listing.offline_reason and download:
        # Offline, the listing is the cache itself: a file to download is a cached file that failed.
        raise UserError(f"{source}: {listing.offline_reason} and the cached {', '.join(f.name for f in download)} "
                        f"does not match its hash (the cache was left as is); fetch with the Hub reachable")
    dest.mkdir(parents=True, exist_ok=True)
    report.reused_files = len(files) - len(needed)
    progress.advance(task, sum(f.size for f in files if f not in needed))
    dest_dev = os.stat(dest).st_dev
    want = (sum(f.size - mover.resumable_bytes(f) for f in download)
            + sum(by.size for by in needed if by.name in from_cache and os.stat(from_cache[by.name]).st_dev != dest_dev))
    free = shutil.disk_usage(dest).free
    if want > free:
        raise UserError(f"{dest}: not enough disk: {(want - free) / 1e9:.2f} GB more needed "
                        f"({free / 1e9:.2f} GB free)")
    for name in mismatched:
        console.print(f"weights: {name} in the Hugging Face cache does not match the Hub's hash; fetching it "
                      f"again into {dest} (the cache is left as is)")
    try:
        mover.run(from_cache, download)
    except ChecksumMismatch as bad:
        raise UserError(f"{source}: {bad}") from None
    finally:
        report.bytes_moved, report.seconds = mover.result.moved, time.monotonic() - started
        report.cached_files, report.cache_mismatches = mover.result.from_cache, list(mismatched)
    report.unverified = [f.name for f in files if f.sha256 is None and f.git_sha1 is None]
    extra = {"revision": listing.commit} if listing.commit else None
    write_manifest_entries(dest, source, {f.name: f.sha256 for f in files}, extra=extra)


__all__ = ["HubSource", "HubTransfer", "Listing", "fetch_hub", "parse", "wanted"]
