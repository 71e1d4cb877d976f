"""Real storage servers on loopback for the weight sources: moto's S3 server, the GCS emulator, and
a small hub (the Hub cannot be reached from here) serving the Hub's metadata and resolve endpoints."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

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
    """Serves repos from local directories the way the Hub does: /api/models/{repo}/revision/{rev}
    (with LFS sha256 and sizes) and /{repo}/resolve/{rev}/{file} (with Range); gated repos answer
    403 with the Hub's X-Error-Code."""

    def __init__(self):
        self.repos: dict[str, Path] = {}
        self.gated: set[str] = set()
        self.extra_siblings: dict[str, list[dict]] = {}   # listed entries with no file behind them
        self.token: str | None = None
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _deny(self, repo) -> bool:
                auth = self.headers.get("Authorization", "")
                if repo in hub.gated and auth != f"Bearer {hub.token}":
                    self.send_response(403)
                    self.send_header("X-Error-Code", "GatedRepo")
                    self.send_header("X-Error-Message", f"Access to model {repo} is restricted.")
                    self.send_header("Content-Type", "application/json")
                    body = json.dumps({"error": f"Access to model {repo} is restricted."}).encode()
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return True
                return False

            def do_GET(self):
                hub.requests.append(self.path)
                m = re.match(r"^/api/models/([^/]+/[^/]+)/revision/([^/?]+)", self.path)
                if m:
                    return self._info(m.group(1), m.group(2))
                m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", self.path)
                if m:
                    return self._file(m.group(1), m.group(3))
                self.send_error(404)

            def _info(self, repo, revision):
                if repo not in hub.repos:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "RepoNotFound")
                    self.end_headers()
                    return
                if self._deny(repo):
                    return
                siblings = []
                for f in sorted(hub.repos[repo].iterdir()):
                    data = f.read_bytes()
                    entry = {"rfilename": f.name, "size": len(data),
                             "blobId": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
                    if f.suffix == ".safetensors":
                        entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                                        "pointerSize": 134}
                    siblings.append(entry)
                siblings += hub.extra_siblings.get(repo, [])
                body = json.dumps({"id": repo, "modelId": repo, "sha": "0" * 40, "private": False,
                                   "siblings": siblings}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _file(self, repo, name):
                if self._deny(repo):
                    return
                path = hub.repos.get(repo, Path("/nonexistent")) / name
                if not path.is_file():
                    self.send_error(404)
                    return
                size = path.stat().st_size
                rng = re.match(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
                start, end = (int(rng.group(1)), min(int(rng.group(2)), size - 1)) if rng else (0, size - 1)
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                self.send_header("Content-Length", str(end - start + 1))
                self.end_headers()
                # Only the asked-for bytes, as a CDN serves them (not the whole file per range).
                with open(path, "rb") as f:
                    f.seek(start)
                    left = end - start + 1
                    while left > 0:
                        block = f.read(min(left, 4 * 2**20))
                        if not block:
                            break
                        self.wfile.write(block)
                        left -= len(block)

        # A backlog above socketserver's 5: concurrent clients queue instead of waiting out SYN retries.
        server_class = type("HubServer", (ThreadingHTTPServer,), {"request_queue_size": 128})
        self.server = server_class(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture
def fake_hub():
    hub = FakeHub()
    yield hub
    hub.close()
