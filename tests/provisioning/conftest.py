"""Real storage servers on loopback for the weight sources: moto's S3 server, the GCS emulator, and
a small hub (the Hub cannot be reached from here) serving the Hub's metadata and resolve endpoints,
with a CDN host beside it for LFS files."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote

import httpx
import pytest

from tests.runtime.conftest import free_port


def _wait(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


@pytest.fixture(scope="session")
def moto_s3():
    """moto's real server process; yields the environment a client needs."""
    port = free_port()
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    _wait(url)
    yield {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    port = free_port()
    exe = shutil.which("gcp-storage-emulator", path=str(Path(sys.executable).parent))
    data = tmp_path_factory.mktemp("gcs")
    proc = subprocess.Popen([exe, "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory"],
                            cwd=data, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    _wait(url)
    yield {"STORAGE_EMULATOR_HOST": url}
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def env(monkeypatch):
    """Apply a fixture's environment to this process (clients read it) and to children."""
    def apply(values: dict) -> dict:
        for key, value in values.items():
            monkeypatch.setenv(key, value)
        return values
    return apply


def new_bucket(kind: str, label: str) -> str:
    """A fresh bucket in the emulator the environment points at: moto's S3 (kind "s3") or the GCS one."""
    name = f"herd-{label}-{os.getpid()}-{time.monotonic_ns() % 10**7}"
    if kind == "s3":
        import boto3
        boto3.client("s3").create_bucket(Bucket=name)
    else:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage
        storage.Client(credentials=AnonymousCredentials(), project="t").create_bucket(name)
    return name


def tree_state(root, digests: bool = False) -> dict:
    """Every path under root with its type, size and mtime (symlinks not followed) and, with `digests`,
    each regular file's sha256: compared before and after to show nothing under root changed."""
    from provisioning.weights.manifest import sha256_of
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            state = (st.st_mode, st.st_size, st.st_mtime_ns)
            if digests:
                state += (sha256_of(path) if os.path.isfile(path) and not os.path.islink(path) else None,)
            found[os.path.relpath(path, root)] = state
    return found


def make_model_dir(path: Path, shards: int = 3, shard_bytes: int = 3 * 2**20, seed: int = 1) -> Path:
    """A model-shaped directory: config, tokenizer files and several safetensors-named shards."""
    import random
    path.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    (path / "tokenizer.json").write_text(json.dumps({"version": "1.0", "seed": seed}))
    for i in range(shards):
        (path / f"model-{i + 1:05d}-of-{shards:05d}.safetensors").write_bytes(rng.randbytes(shard_bytes + i))
    return path


class FakeHub:
    """The Hub on loopback, speaking the parts of its HTTP API that huggingface_hub uses to list and
    download a model repo, with the Hub's headers:

    - GET /api/models/{repo}[/revision/{rev}] (sizes, LFS sha256, git blob ids, the commit);
    - HEAD and GET /{repo}/resolve/{rev}/{file}: small files from the hub itself (ETag = git blob id);
      LFS files answer 302 to a second loopback server, the CDN (X-Linked-Etag = sha256,
      X-Linked-Size), which serves them with Range, as the real Hub does;
    - gated repos: the listing is public, files answer 401 without a token and 403 with another one,
      with X-Error-Code: GatedRepo (the Hub's error headers);
    - faults[file]: a queue of faults for the next content requests of that file ("truncate:N" sends
      the headers of the full answer then closes after N bytes; "503" answers 503).

    It records every request (method, path, user agent, Range, whether a token came) and counts the
    content bytes it serves per file, hub and CDN apart. Hashes are cached per (path, size, mtime):
    a listing costs no re-hashing of the files."""

    def __init__(self, cdn: bool = True, block_delay: float = 0.0):
        self.repos: dict[str, Path] = {}
        self.gated: set[str] = set()
        self.revisions: set[str] = {"main"}     # names accepted besides the commit itself
        self.extra_siblings: dict[str, list[dict]] = {}   # listed entries with no file behind them
        self.xet: bool = False                  # announce Xet storage (X-Xet-Hash) for LFS files
        self.token: str | None = None
        self.faults: dict[str, list[str]] = {}
        self.block_delay = block_delay          # seconds between 1-MiB blocks (slow links)
        self.requests: list[dict] = []
        self.served: dict[str, int] = {}        # content bytes per file, from the hub itself
        self.cdn_served: dict[str, int] = {}    # content bytes per file, from the CDN
        self._hashes: dict[tuple, tuple[str, str]] = {}
        self._lock = threading.Lock()
        hub = self

        def hashes(path: Path) -> tuple[str, str]:
            """(sha256, git blob id) of a file, computed once per version of it."""
            st = path.stat()
            key = (str(path), st.st_size, st.st_mtime_ns)
            with hub._lock:
                if key in hub._hashes:
                    return hub._hashes[key]
            sha, git = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % st.st_size)
            with open(path, "rb") as f:
                while block := f.read(8 * 2**20):
                    sha.update(block)
                    git.update(block)
            value = (sha.hexdigest(), git.hexdigest())
            with hub._lock:
                hub._hashes[key] = value
            return value
        self.hashes = hashes

        class Base(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_name = "hub"

            def log_message(self, *args):
                pass

            def _record(self):
                hub.requests.append({"server": self.server_name, "method": self.command, "path": self.path,
                                     "user_agent": self.headers.get("User-Agent", ""),
                                     "range": self.headers.get("Range"),
                                     "authorized": bool(self.headers.get("Authorization"))})

            def _json(self, status, payload, headers=()):
                body = json.dumps(payload).encode()
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _error(self, status, code, message):
                self._json(status, {"error": message}, [("X-Error-Code", code), ("X-Error-Message", message)])

            def _content(self, path: Path, name: str, counter: dict, extra_headers=()):
                """The file's bytes (or the asked-for range), faults applied, bytes counted."""
                size = path.stat().st_size
                rng = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                start = int(rng.group(1)) if rng else 0
                end = min(int(rng.group(2)), size - 1) if rng and rng.group(2) else size - 1
                fault = None
                if self.command == "GET":
                    with hub._lock:
                        queue = hub.faults.get(name)
                        fault = queue.pop(0) if queue else None
                if fault == "503":
                    self._json(503, {"error": "unavailable"})
                    return
                if rng and start >= size:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206 if rng else 200)
                for k, v in extra_headers:
                    self.send_header(k, v)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(end - start + 1))
                self.end_headers()
                if self.command == "HEAD":
                    return
                limit = int(fault.split(":")[1]) if fault and fault.startswith("truncate:") else None
                # Only the asked-for bytes, as a CDN serves them (not the whole file per range).
                with open(path, "rb") as f:
                    f.seek(start)
                    left = end - start + 1 if limit is None else min(limit, end - start + 1)
                    while left > 0:
                        block = f.read(min(left, 2**20))
                        if not block:
                            break
                        self.wfile.write(block)
                        with hub._lock:
                            counter[name] = counter.get(name, 0) + len(block)
                        left -= len(block)
                        if hub.block_delay:
                            time.sleep(hub.block_delay)
                if limit is not None:
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)

        class Hub(Base):
            def _deny(self, repo) -> bool:
                auth = self.headers.get("Authorization", "")
                if repo not in hub.gated or auth == f"Bearer {hub.token}":
                    return False
                if not auth:
                    self._error(401, "GatedRepo", f"Access to model {repo} is restricted. You must have access "
                                "to it and be authenticated to access it. Please log in.")
                else:
                    self._error(403, "GatedRepo", f"Access to model {repo} is restricted and you are not in "
                                "the authorized list.")
                return True

            def do_HEAD(self):
                self.do_GET()

            def do_GET(self):
                self._record()
                path = self.path.split("?")[0]
                m = re.match(r"^/api/models/([^/]+/[^/]+?)(?:/revision/([^/]+))?$", path)
                if m:
                    return self._info(m.group(1), unquote(m.group(2) or "main"))
                m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
                if m:
                    return self._file(m.group(1), unquote(m.group(2)), unquote(m.group(3)))
                self._error(404, "EntryNotFound", "not found")

            def _commit(self, repo) -> str:
                digest = hashlib.sha1(repo.encode())
                for f in sorted(hub.repos[repo].iterdir()):
                    digest.update(f.name.encode() + hub.hashes(f)[0].encode())
                return digest.hexdigest()

            def _revision_ok(self, repo, revision) -> bool:
                if revision in hub.revisions or revision == self._commit(repo):
                    return True
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                return False

            def _info(self, repo, revision):
                if repo not in hub.repos:
                    return self._error(401, "RepoNotFound", "Repository not found")
                if not self._revision_ok(repo, revision):
                    return
                siblings = []
                for f in sorted(hub.repos[repo].iterdir()):
                    sha, git = hub.hashes(f)
                    size = f.stat().st_size
                    entry = {"rfilename": f.name, "size": size, "blobId": git}
                    if f.suffix == ".safetensors":
                        entry["lfs"] = {"sha256": sha, "size": size, "pointerSize": 134}
                    siblings.append(entry)
                siblings += hub.extra_siblings.get(repo, [])
                gated = "manual" if repo in hub.gated else False
                self._json(200, {"id": repo, "modelId": repo, "sha": self._commit(repo), "private": False,
                                 "gated": gated, "siblings": siblings})

            def _file(self, repo, revision, name):
                if repo not in hub.repos:
                    return self._error(401, "RepoNotFound", "Repository not found")
                if self._deny(repo) or not self._revision_ok(repo, revision):
                    return
                path = hub.repos[repo] / name
                if not path.is_file():
                    return self._error(404, "EntryNotFound", f"{name} does not exist")
                sha, git = hub.hashes(path)
                commit = [("X-Repo-Commit", self._commit(repo))]
                if path.suffix != ".safetensors":
                    return self._content(path, name, hub.served, commit + [("ETag", f'"{git}"')])
                lfs = commit + [("X-Linked-Etag", f'"{sha}"'), ("X-Linked-Size", str(path.stat().st_size)),
                                ("ETag", f'"{hashlib.sha1(sha.encode()).hexdigest()}"')]
                if hub.xet:
                    lfs += [("X-Xet-Hash", sha),
                            ("X-Xet-Refresh-Route", f"/api/models/{repo}/xet-read-token/{self._commit(repo)}")]
                if hub.cdn_url is None:
                    return self._content(path, name, hub.served, lfs)
                # LFS files live on the CDN: a signed URL on another host.
                self.send_response(302)
                for k, v in lfs:
                    self.send_header(k, v)
                self.send_header("Location", f"{hub.cdn_url}/lfs/{sha}?name={quote(name)}&X-Amz-Signature=loopback")
                self.send_header("Content-Length", "0")
                self.end_headers()

        class Cdn(Base):
            server_name = "cdn"

            def do_HEAD(self):
                self.do_GET()

            def do_GET(self):
                self._record()
                m = re.match(r"^/lfs/([0-9a-f]{64})\?name=([^&]+)", self.path)
                if not m:
                    return self._error(404, "NotFound", "no such object")
                for repo_dir in hub.repos.values():
                    path = repo_dir / unquote(m.group(2))
                    if path.is_file() and hub.hashes(path)[0] == m.group(1):
                        return self._content(path, path.name, hub.cdn_served)
                self._error(404, "NotFound", "no such object")

        # A backlog above socketserver's 5: concurrent clients queue instead of waiting out SYN retries.
        server_class = type("HubServer", (ThreadingHTTPServer,), {"request_queue_size": 128, "daemon_threads": True})
        self.server = server_class(("127.0.0.1", 0), Hub)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.cdn = server_class(("127.0.0.1", 0), Cdn) if cdn else None
        self.cdn_url = f"http://127.0.0.1:{self.cdn.server_address[1]}" if cdn else None
        if self.cdn:
            threading.Thread(target=self.cdn.serve_forever, daemon=True).start()

    def content_bytes(self) -> int:
        """Bytes of file content served so far, hub and CDN together."""
        return sum(self.served.values()) + sum(self.cdn_served.values())

    def reset_counts(self) -> None:
        self.requests.clear()
        self.served.clear()
        self.cdn_served.clear()

    def close(self):
        self.server.shutdown()
        if self.cdn:
            self.cdn.shutdown()


@pytest.fixture
def fake_hub():
    hub = FakeHub()
    yield hub
    hub.close()


@pytest.fixture
def hub_env(monkeypatch, tmp_path, fake_hub):
    """Point the Hub's client at the loopback hub and a Hugging Face home of this test's own, for this
    process and its children. huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_HUB_CACHE and
    HF_HUB_OFFLINE when it is imported: the same values are set on its constants here, as a fresh
    process would read them. No token and no cache of the machine's own can leak in."""
    from huggingface_hub import constants

    def apply(offline: bool = False, **extra) -> dict:
        home = tmp_path / "hf-home"
        values = {"HF_ENDPOINT": fake_hub.url, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
                  "HF_TOKEN_PATH": str(home / "token"), "HF_XET_CACHE": str(home / "xet"),
                  "HF_HUB_OFFLINE": "1" if offline else "0", "HF_HUB_DISABLE_TELEMETRY": "1",
                  "NO_PROXY": "127.0.0.1,localhost", **extra}
        for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "TRANSFORMERS_OFFLINE"):
            monkeypatch.delenv(key, raising=False)
        for key, value in values.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setattr(constants, "ENDPOINT", fake_hub.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            fake_hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HOME", str(home))
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
        return values
    return apply


class CountingProxy:
    """A proxy on loopback. As a reverse proxy in front of a store's server (the GCS emulator) it counts
    the bytes of every object download it passes on (`?alt=media`), records their Range, and can slow
    them down, so a test can kill a fetch midway and then count exactly what the resume asks for.
    As a forward proxy (HTTP_PROXY; requests naming an absolute http:// URL) it records every URL."""

    def __init__(self, target: str = "", block_delay: float = 0.0):
        import http.client
        from urllib.parse import urlparse
        self.target = urlparse(target)
        self.block_delay = block_delay
        self.media: list[dict] = []      # one entry per object download: path, range, bytes
        self.forwarded: list[str] = []   # absolute URLs asked for as a forward proxy
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                target, path = proxy.target, self.path
                if path.startswith("http://"):
                    with proxy._lock:
                        proxy.forwarded.append(path)
                    target = urlparse(path)
                    path = target.path + (f"?{target.query}" if target.query else "")
                upstream = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "connection", "proxy-connection")}
                upstream.request(self.command, path, body=body or None, headers=headers)
                answer = upstream.getresponse()
                data = answer.read()
                upstream.close()
                self.send_response(answer.status)
                for k, v in answer.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # A HEAD answer keeps the length of the body it does not carry.
                length = answer.getheader("Content-Length", "0") if self.command == "HEAD" else len(data)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                if self.command == "HEAD":
                    return
                media = "alt=media" in self.path and self.command == "GET"
                for at in range(0, len(data), 256 * 2**10):
                    block = data[at:at + 256 * 2**10]
                    try:
                        self.wfile.write(block)
                    except (BrokenPipeError, ConnectionResetError):   # the client was killed
                        self.close_connection = True
                        return
                    if media and proxy.block_delay:
                        time.sleep(proxy.block_delay)
                if media:
                    with proxy._lock:
                        proxy.media.append({"path": self.path, "range": self.headers.get("Range"),
                                            "bytes": len(data), "status": answer.status})

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward

        server_class = type("ProxyServer", (ThreadingHTTPServer,), {"request_queue_size": 128, "daemon_threads": True})
        self.server = server_class(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def media_bytes(self) -> int:
        return sum(m["bytes"] for m in self.media)

    def close(self):
        self.server.shutdown()
