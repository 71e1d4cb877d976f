"""serving.api_key_file (issue 18 item 13): a server started from a spec that names a key file requires
that key; a missing, unreadable, empty or too-open key file is a one-line error before anything starts.

The key file is read by runtime/serving/serve.py (read_api_key, through _front_settings): the front is a real
`herd serve` in front of a small OpenAI-compatible stand-in engine (--engine-cmd), so no model loads.
This file sits with the weights tests only because of how the work was split; it belongs beside
tests/runtime/serving/test_server.py."""
import os
import shlex
import sys
import time

import httpx
import pytest
import yaml

from tests.conftest import ROOT, run_herd
from tests.runtime.conftest import ServeProcess, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]   # loopback servers and emulators: 5-85 s here
KEY = "sk-herd-key-from-a-file-0123456789"
STAND_IN = """
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Engine(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, payload):
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send({"object": "list", "data": [{"id": "stand-in", "object": "model"}]})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._send({"id": "c", "object": "text_completion", "model": "stand-in",
                    "choices": [{"index": 0, "text": " ok", "finish_reason": "length"}]})

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Engine).serve_forever()
"""


def spec_with_key_file(tmp_path, key_file) -> str:
    spec = yaml.safe_load((ROOT / "environments" / "local.yaml").read_text())
    spec["serving"]["api_key_file"] = str(key_file)
    path = tmp_path / "env.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def engine_args(tmp_path) -> list[str]:
    script = tmp_path / "engine.py"
    script.write_text(STAND_IN)
    port = free_port()
    return ["--engine-cmd", shlex.join([sys.executable, str(script), str(port)]),
            "--engine-url", f"http://127.0.0.1:{port}", "--canary-interval", "1"]


def write_key(path, text=KEY, mode=0o600):
    path.write_text(text + "\n")
    os.chmod(path, mode)
    return path


def test_a_server_started_with_the_spec_key_file_requires_that_key(tmp_path):
    key_file = write_key(tmp_path / "api-key")
    state = tmp_path / "state"
    state.mkdir()
    server = ServeProcess([spec_with_key_file(tmp_path, key_file), *engine_args(tmp_path)], state).start()
    try:
        server.wait_ready(timeout=60)
        assert httpx.get(f"{server.url}/health/ready").status_code == 200   # health stays public
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = httpx.get(f"{server.url}/v1/models", headers=headers, timeout=10)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", headers
        r = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "stand-in"
        body = {"model": "smollm2-135m-instruct", "prompt": "hi", "max_tokens": 1}
        assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=10).status_code == 401
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=10,
                       headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == " ok"
        assert KEY not in server.log_text(), "the key is never logged"
    finally:
        server.stop()


def start_fails(tmp_path, key_file) -> str:
    state = tmp_path / f"state-{time.monotonic_ns()}"
    state.mkdir()
    out = run_herd("serve", spec_with_key_file(tmp_path, key_file), *engine_args(tmp_path),
                   "--port", str(free_port()), "--state-dir", str(state), timeout=60)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert KEY not in out.stderr + out.stdout
    return lines[0]


def test_a_missing_unreadable_or_empty_key_file_is_one_line(tmp_path):
    missing = tmp_path / "no-such-key"
    assert f"serving.api_key_file: '{missing}': No such file or directory" in start_fails(tmp_path, missing)
    folder = tmp_path / "a-folder"
    folder.mkdir()
    assert f"serving.api_key_file: '{folder}': Is a directory" in start_fails(tmp_path, folder)
    if os.geteuid() != 0:   # root reads any file whatever its mode
        locked = write_key(tmp_path / "locked", mode=0o000)
        assert "Permission denied" in start_fails(tmp_path, locked)
    empty = write_key(tmp_path / "empty", text="")
    assert f"serving.api_key_file: '{empty}' is empty" in start_fails(tmp_path, empty)


def test_a_key_file_readable_by_others_is_refused(tmp_path):
    loose = write_key(tmp_path / "loose", mode=0o644)
    state = tmp_path / "state"
    state.mkdir()
    server = ServeProcess([spec_with_key_file(tmp_path, loose), *engine_args(tmp_path)], state).start()
    try:
        deadline = time.monotonic() + 60
        while server.proc.poll() is None and time.monotonic() < deadline:
            try:
                started = httpx.get(f"{server.url}/health/live", timeout=1).status_code < 500
            except httpx.TransportError:
                started = False
            assert not started, "herd serve started with a key file that others can read"
            time.sleep(0.2)
        lines = server.log_text().strip().splitlines()
        assert server.proc.returncode == 2 and "serving.api_key_file" in lines[-1] and "0600" in lines[-1]
    finally:
        server.stop()
