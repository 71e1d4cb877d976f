"""`herd generate` against herd's real server on a tiny model."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, run_herd

pytestmark = pytest.mark.slow


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


def test_unreachable_endpoint_is_a_clear_error_before_starting(tmp_path):
    from tests.runtime.conftest import free_port
    prompts = write_prompts(tmp_path / "in.jsonl", 2)
    done = run_herd("generate", "--endpoint", f"http://127.0.0.1:{free_port()}", "--input", str(prompts),
                    "--output", str(tmp_path / "out.jsonl"))
    assert done.returncode == 2 and "unreachable" in done.stderr
    assert not (tmp_path / "out.jsonl").exists()
