"""`herd generate` against herd's real server on a tiny model, and against a loopback stand-in server
that answers scripted statuses and bodies (failures herd's own server does not produce on demand)."""
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from rich.console import Console

from runtime.serving.batch import Settings, generate
from tests.conftest import ROOT, run_herd


def write_prompts(path, n, start=0):
    with open(path, "w") as f:
        for i in range(start, start + n):
            row = {"id": f"row-{i}"}
            if i % 2:
                row["messages"] = [{"role": "user", "content": f"Tell me about number {i}"}]
            else:
                row["prompt"] = f"Number {i} is"
            f.write(json.dumps(row) + "\n")
    return path


def read_output(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    ids = [r["id"] for r in rows]
    return rows, ids


@pytest.fixture
def tp2(tiny_model, serve):
    def start(*extra):
        srv = serve("--model-dir", str(tiny_model), "--tp", "2", "--served-model-name", "tiny",
                    "--max-model-len", "512", "--concurrency", "8", *extra)
        srv.wait_ready()
        return srv
    return start


@pytest.mark.slow
@pytest.mark.timeout(480)   # real servers and kills: 75-190 s under load
def test_fifty_rows_at_concurrency_eight_complete_with_logprobs(tp2, tmp_path):
    srv = tp2()
    prompts = write_prompts(tmp_path / "in.jsonl", 50)
    out = tmp_path / "out.jsonl"
    done = run_herd("generate", "--endpoint", srv.url, "--input", str(prompts), "--output", str(out),
                    "--concurrency", "8", "--max-tokens", "12", "--logprobs", "2", "--json", timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert summary["succeeded"] == 50 and summary["failed"] == 0 and summary["tokens_per_s"] > 0
    rows, ids = read_output(out)
    assert sorted(ids) == sorted(f"row-{i}" for i in range(50))
    assert all(r["usage"]["completion_tokens"] >= 1 and r["finish_reason"] in ("stop", "length") for r in rows)
    chat_row = next(r for r in rows if r["id"] == "row-1")
    assert len(chat_row["logprobs"]["content"][0]["top_logprobs"]) == 2
    assert "token_logprobs" in next(r for r in rows if r["id"] == "row-0")["logprobs"]

    again = run_herd("generate", "--endpoint", srv.url, "--input", str(prompts), "--output", str(out),
                     "--json")
    assert json.loads(again.stdout)["skipped"] == 50 and len(read_output(out)[1]) == 50


@pytest.mark.slow
@pytest.mark.timeout(480)   # real servers and kills: 75-190 s under load
def test_killed_job_resumes_without_duplicates_or_gaps(tp2, tmp_path):
    srv = tp2()
    prompts = write_prompts(tmp_path / "in.jsonl", 40)
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "infra.cli", "generate", "--endpoint", srv.url, "--input", str(prompts),
           "--output", str(out), "--concurrency", "4", "--max-tokens", "40"]
    job = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while (not out.exists() or len(out.read_text().splitlines()) < 8) and time.monotonic() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait()
    first, first_ids = read_output(out)
    assert 8 <= len(first_ids) < 40, "the job should have been killed midway"
    with open(out, "a") as f:
        f.write('{"id": "row-torn", "text": "half a li')  # as if the disk filled mid-write
    rerun = run_herd("generate", "--endpoint", srv.url, "--input", str(prompts), "--output", str(out),
                     "--concurrency", "4", "--max-tokens", "40", "--json", timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert json.loads(rerun.stdout)["skipped"] == len(first_ids)
    _, ids = read_output(out)
    assert len(ids) == len(set(ids)) == 40
    assert set(ids) == {f"row-{i}" for i in range(40)}


@pytest.mark.slow
@pytest.mark.timeout(480)   # real servers and kills: 75-190 s under load
def test_a_full_queue_429_phase_is_ridden_out(tp2, tmp_path):
    srv = tp2("--max-queue", "2")
    prompts = write_prompts(tmp_path / "in.jsonl", 16)
    out = tmp_path / "out.jsonl"
    done = run_herd("generate", "--endpoint", srv.url, "--input", str(prompts), "--output", str(out),
                    "--concurrency", "8", "--max-tokens", "30", "--json", timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows, ids = read_output(out)
    assert len(set(ids)) == 16 and not [r for r in rows if "error" in r]
    assert max(r["attempts"] for r in rows) > 1, "the server should have answered 429 at least once"


@pytest.mark.slow
@pytest.mark.timeout(480)   # real servers and kills: 75-190 s under load
def test_a_503_phase_while_a_rank_restarts_is_ridden_out(tp2, tmp_path):
    srv = tp2()
    prompts = write_prompts(tmp_path / "in.jsonl", 30)
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "infra.cli", "generate", "--endpoint", srv.url, "--input", str(prompts),
           "--output", str(out), "--concurrency", "4", "--max-tokens", "60", "--json"]
    job = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    while not out.exists() or len(out.read_text().splitlines()) < 4:
        time.sleep(0.05)
    os.kill(srv.rank_pid(1), signal.SIGKILL)
    stdout, _ = job.communicate(timeout=300)
    assert job.returncode == 0, stdout
    rows, ids = read_output(out)
    assert len(set(ids)) == 30 and not [r for r in rows if "error" in r]
    assert max(r["attempts"] for r in rows) > 1, "some rows should have met the 503 phase"


@pytest.mark.slow
@pytest.mark.timeout(480)   # real servers and kills: 75-190 s under load
def test_bad_rows_are_reported_by_line_and_the_rest_runs(tp2, tmp_path):
    srv = tp2()
    lines = ['{"id": "a", "prompt": "Hello"}', "{not json", '{"prompt": "no id"}', '{"id": "a", "prompt": "dup"}',
             '{"id": "b"}', '{"id": "c", "prompt": "x", "messages": []}', '{"id": "d", "prompt": "Bye"}']
    prompts = tmp_path / "in.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    done = run_herd("generate", "--endpoint", srv.url, "--input", str(prompts), "--output", str(out),
                    "--max-tokens", "4", "--json")
    assert done.returncode == 1
    bad = {b["line"]: b["reason"] for b in json.loads(done.stdout)["bad_rows"]}
    assert set(bad) == {2, 3, 4, 5, 6}
    assert "duplicate id 'a'" in bad[4] and "missing id" in bad[3] and "JSON" in bad[2]
    assert sorted(read_output(out)[1]) == ["a", "d"]


@pytest.mark.slow
@pytest.mark.timeout(480)   # real servers and kills: 75-190 s under load
def test_unreachable_endpoint_is_a_clear_error_before_starting(tmp_path):
    from tests.runtime.conftest import free_port
    prompts = write_prompts(tmp_path / "in.jsonl", 2)
    done = run_herd("generate", "--endpoint", f"http://127.0.0.1:{free_port()}", "--input", str(prompts),
                    "--output", str(tmp_path / "out.jsonl"))
    assert done.returncode == 2 and "unreachable" in done.stderr
    assert not (tmp_path / "out.jsonl").exists()


# ------------------------------------------------------------------ a scripted stand-in endpoint
OK = (200, {"choices": [{"text": " fine", "finish_reason": "stop"}], "usage": {"completion_tokens": 1}})
HANG_UP = (None, None)  # close the connection without an answer


class StandIn(ThreadingHTTPServer):
    """An OpenAI-like endpoint on 127.0.0.1: answers each request by its prompt (the row's id here)
    from `script` (default OK), and counts the requests per prompt."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), StandInHandler)
        self.script: dict[str, tuple] = {}
        self.requests: Counter = Counter()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class StandInHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest's output clean
        pass

    def do_GET(self):
        self.answer(200, {"object": "list", "data": [{"id": "stand-in", "object": "model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        key = body.get("prompt") or body["messages"][-1]["content"]
        self.server.requests[key] += 1
        status, payload = self.server.script.get(key, OK)
        if status is None:
            self.close_connection = True
            return
        self.answer(status, payload)

    def answer(self, status, payload):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status in (429, 503):
            self.send_header("Retry-After", "0")  # ride the phase out at once: the test measures counts
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def stand_in():
    server = StandIn()
    yield server
    server.shutdown()
    server.server_close()


def write_rows(path, ids):
    path.write_text("".join(json.dumps({"id": i, "prompt": i}) + "\n" for i in ids))
    return path


def by_id(path):
    rows, ids = read_output(path)
    assert len(ids) == len(set(ids)), f"an id has several rows: {ids}"
    return {r["id"]: r for r in rows}


def error(status, message):
    return status, {"error": {"message": message, "type": "invalid_request_error"}}


@pytest.mark.slow
@pytest.mark.timeout(480)   # real servers and kills: 75-190 s under load
def test_resume_retries_transient_failures_and_retry_failed_the_rest(stand_in, tmp_path):
    prompts = write_rows(tmp_path / "in.jsonl", ["ok-1", "busy", "bad", "garbled", "ok-2"])
    out = tmp_path / "out.jsonl"
    stand_in.script = {"busy": (503, {"error": {"message": "restarting"}}),  # outlasts every retry
                       "bad": error(400, "max_tokens: 99999 exceeds the context"),
                       "garbled": (200, b"<html>proxy error</html>")}
    args = ["generate", "--endpoint", stand_in.url, "--input", str(prompts), "--output", str(out), "--json"]

    first = run_herd(*args)
    assert first.returncode == 1, first.stderr[-2000:]
    summary = json.loads(first.stdout)
    assert (summary["succeeded"], summary["failed_transient"], summary["failed_permanent"]) == (2, 1, 2)
    rows = by_id(out)
    assert rows["busy"]["error"] == {"status": 503, "kind": "transient", "message": "restarting"}
    assert rows["bad"]["error"]["kind"] == "permanent" and rows["bad"]["error"]["status"] == 400
    assert "99999" in rows["bad"]["error"]["message"]
    assert rows["garbled"]["error"]["kind"] == "permanent" and rows["garbled"]["error"]["status"] == 200
    assert "not JSON" in rows["garbled"]["error"]["message"]
    assert stand_in.requests == {"ok-1": 1, "ok-2": 1, "busy": 8, "bad": 1, "garbled": 1}

    stand_in.script, stand_in.requests = {}, Counter()  # the restart is over; everything answers now
    resumed = run_herd(*args)
    assert resumed.returncode == 1, "permanent failures are kept, so the job is not complete"
    summary = json.loads(resumed.stdout)
    assert (summary["retried"], summary["kept_failed"], summary["succeeded"]) == (1, 2, 1)
    assert stand_in.requests == {"busy": 1}
    rows = by_id(out)
    assert rows["busy"]["text"] == " fine" and "error" in rows["bad"] and "error" in rows["garbled"]

    stand_in.requests = Counter()
    healed = run_herd(*args, "--retry-failed")
    assert healed.returncode == 0, healed.stderr[-2000:]
    assert json.loads(healed.stdout)["retried"] == 2 and stand_in.requests == {"bad": 1, "garbled": 1}
    rows = by_id(out)
    assert set(rows) == {"ok-1", "busy", "bad", "garbled", "ok-2"} and not [r for r in rows.values() if "error" in r]


MALFORMED = {
    "not-json": (b"upstream timed out", "not JSON"),
    "a-list": ([{"text": "x"}], "not an object"),
    "no-choices": ({"id": "cmpl-1", "object": "text_completion"}, "no choices"),
    "empty-choices": ({"choices": []}, "no choices"),
    "text-number": ({"choices": [{"text": 42, "finish_reason": "stop"}]}, "choices[0].text is a int"),
    "message-string": ({"choices": [{"message": "hi"}]}, "neither text nor a message"),
    "usage-string": ({"choices": [{"text": "x"}], "usage": {"completion_tokens": "many"}}, "usage"),
    "finish-number": ({"choices": [{"text": "x", "finish_reason": 1}]}, "finish_reason"),
}


def run_in_process(server, tmp_path, ids, **settings):
    """The job itself (not the CLI), with retries quick enough for a test."""
    out = tmp_path / "out.jsonl"
    s = Settings(endpoint=server.url, concurrency=4, backoff_s=0.001, backoff_max_s=0.01, **settings)
    summary = generate(write_rows(tmp_path / "in.jsonl", ids), out, s, Console(file=io.StringIO()))
    return summary, by_id(out)


def test_a_malformed_200_fails_its_row_with_the_reason_never_the_job(stand_in, tmp_path):
    stand_in.script = {name: (200, body) for name, (body, _) in MALFORMED.items()}
    stand_in.script["null-content"] = (200, {"choices": [  # a tool call: no text, yet a well-formed answer
        {"message": {"role": "assistant", "content": None}, "finish_reason": "tool_calls"}]})
    summary, rows = run_in_process(stand_in, tmp_path, [*MALFORMED, "ok", "null-content"])
    assert summary.succeeded == 2 and summary.failed == summary.failed_permanent == len(MALFORMED)
    for name, (_, reason) in MALFORMED.items():
        err = rows[name]["error"]
        assert (err["status"], err["kind"]) == (200, "permanent") and reason in err["message"], (name, err)
    assert rows["null-content"]["text"] is None and rows["null-content"]["finish_reason"] == "tool_calls"
    assert stand_in.requests["not-json"] == 1, "a malformed answer is not sent again within the run"


def test_failures_are_classified_transient_or_permanent(stand_in, tmp_path):
    stand_in.script = {"hang-up": HANG_UP, "e500": error(500, "boom"), "e408": error(408, "slow"),
                       "e409": error(409, "conflict"), "e429": error(429, "busy"),
                       "e404": error(404, "no such model"), "e422": error(422, "bad field")}
    summary, rows = run_in_process(stand_in, tmp_path, list(stand_in.script),
                                   max_attempts=3, max_transient_attempts=2)
    kinds = {i: (r["error"]["status"], r["error"]["kind"]) for i, r in rows.items()}
    assert kinds == {"hang-up": (None, "transient"), "e500": (500, "transient"), "e408": (408, "transient"),
                     "e409": (409, "transient"), "e429": (429, "transient"),
                     "e404": (404, "permanent"), "e422": (422, "permanent")}
    assert stand_in.requests == {"hang-up": 2, "e500": 2, "e408": 2, "e409": 2, "e429": 3, "e404": 1, "e422": 1}
    assert (summary.failed_transient, summary.failed_permanent) == (5, 2)
    assert "RemoteProtocolError" in rows["hang-up"]["error"]["message"]


def test_failure_rows_from_an_older_herd_are_classified_by_status(stand_in, tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "old-503", "error": {"status": 503, "message": "x"}, "attempts": 8},
        {"id": "old-conn", "error": {"status": None, "message": "ConnectError"}, "attempts": 4},
        {"id": "old-400", "error": {"status": 400, "message": "x"}, "attempts": 1},
        {"id": "done", "text": "kept", "finish_reason": "stop", "usage": None}]) + '{"id": "torn", "te')
    summary, rows = run_in_process(stand_in, tmp_path, ["old-503", "old-conn", "old-400", "done", "torn"])
    assert stand_in.requests == {"old-503": 1, "old-conn": 1, "torn": 1}
    assert (summary.retried, summary.kept_failed, summary.skipped) == (2, 1, 2)
    assert rows["done"]["text"] == "kept" and rows["old-400"]["error"]["status"] == 400
