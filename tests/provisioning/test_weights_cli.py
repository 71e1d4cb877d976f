"""The weights commands as a user runs them (`python -m infra.cli weights ...`): file:// sources,
`publish` and `verify`, and a killed gs:// fetch resuming with only the missing bytes, counted at a
proxy in front of the GCS emulator."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from provisioning.weights.manifest import MANIFEST, sha256_of, verify
from provisioning.weights.transfer import RemoteFile, Transfer
from tests.conftest import ROOT, run_herd
from tests.provisioning.conftest import CountingProxy, make_model_dir, new_bucket

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]   # loopback servers and emulators: 5-85 s here


def one_line_error(out) -> str:
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    return lines[0]


# ------------------------------------------------------------------ file://
def test_a_file_source_is_used_in_place_and_verified_against_its_manifest(tmp_path, herd):
    model = make_model_dir(tmp_path / "model", shards=2, shard_bytes=2**20)
    before = {p.name: p.stat().st_mtime_ns for p in model.iterdir()}
    # Without a manifest: used as it is, and said so.
    out = herd("weights", "fetch", "--source", f"file://{model}", "--dest", str(tmp_path / "unused"), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["bytes_moved"] == 0 and report["files"] == 4 and len(report["unverified"]) == 4
    out = herd("weights", "fetch", "--source", f"file://{model}", "--dest", str(tmp_path / "unused"))
    assert out.returncode == 0 and "used in place, unverified" in " ".join(out.stderr.split()), out.stderr
    assert not (tmp_path / "unused").exists(), "no copy is made"

    out = herd("weights", "publish", str(model), "file:///nowhere")
    assert "s3://" in one_line_error(out)   # publishing needs a store; locally, verify is the command
    from provisioning.weights.manifest import write_manifest
    write_manifest(model, f"file://{model}")
    for source in (f"file://{model}", str(model)):     # the URI and a plain path are the same thing
        out = herd("weights", "fetch", "--source", source, "--dest", str(tmp_path / "unused"), "--json")
        assert out.returncode == 0 and json.loads(out.stdout)["unverified"] == [], out.stderr
        out = herd("weights", "fetch", "--source", source, "--dest", str(tmp_path / "unused"))
        assert out.returncode == 0 and "used in place, verified against" in " ".join(out.stderr.split())
    assert {p.name: p.stat().st_mtime_ns for p in model.iterdir() if p.name != MANIFEST} == before

    # A damaged file is refused, naming it.
    shard = sorted(model.glob("*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[77] ^= 0xFF
    shard.write_bytes(bytes(data))
    line = one_line_error(herd("weights", "fetch", "--source", f"file://{model}", "--dest", str(tmp_path / "x")))
    assert f"{shard.name}: sha256 mismatch" in line and "does not match its herd-manifest.json" in line

    # Not a model directory.
    line = one_line_error(herd("weights", "fetch", "--source", f"file://{tmp_path}/none", "--dest", str(tmp_path / "x")))
    assert "has no config.json" in line


# ------------------------------------------------------------------ publish and verify
def test_publish_and_verify_through_the_cli(env, moto_s3, tmp_path, herd):
    env(moto_s3)
    model = make_model_dir(tmp_path / "model", shards=2, shard_bytes=2**20)
    bucket = new_bucket("s3", "cli-publish")
    uri = f"s3://{bucket}/m"
    out = herd("weights", "publish", str(model), uri, env=moto_s3)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"published 4 files and {MANIFEST} to {uri}"
    import boto3
    keys = sorted(o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == sorted(f"m/{p.name}" for p in model.iterdir())
    manifest = json.loads(boto3.client("s3").get_object(Bucket=bucket, Key=f"m/{MANIFEST}")["Body"].read())
    assert {n: e["sha256"] for n, e in manifest["files"].items()} == \
        {p.name: sha256_of(p) for p in model.iterdir() if p.name != MANIFEST}

    dest = tmp_path / "dest"
    assert run_herd("weights", "fetch", "--source", uri, "--dest", str(dest), "--quiet", env=moto_s3).returncode == 0
    out = herd("weights", "verify", str(dest))
    assert out.returncode == 0 and out.stdout.strip() == f"{dest}: verified"

    shard = sorted(dest.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[5] ^= 1
    shard.write_bytes(bytes(data))
    (dest / "tokenizer.json").unlink()
    out = herd("weights", "verify", str(dest))
    assert out.returncode == 1
    assert sorted(out.stdout.strip().splitlines()) == sorted([f"{dest}: {shard.name}: sha256 mismatch",
                                                              f"{dest}: tokenizer.json: missing"])
    (dest / MANIFEST).unlink()
    out = herd("weights", "verify", str(dest))
    assert out.returncode == 1 and f"no {MANIFEST}" in out.stdout

    # User errors, one line each.
    assert "no config.json" in one_line_error(herd("weights", "publish", str(tmp_path), uri, env=moto_s3))
    line = one_line_error(herd("weights", "publish", str(model), "s3://no-such-bucket-herd-cli/m", env=moto_s3))
    assert "bucket 'no-such-bucket-herd-cli' does not exist" in line


# ------------------------------------------------------------------ gs:// resume
@pytest.fixture
def gcs_proxy(gcs_emulator):
    proxy = CountingProxy(gcs_emulator["STORAGE_EMULATOR_HOST"])
    yield proxy
    proxy.close()


def test_a_killed_gs_fetch_resumes_with_only_the_missing_bytes(env, gcs_emulator, gcs_proxy, tmp_path):
    from provisioning.weights.fetching import publish
    from rich.console import Console
    env(gcs_emulator)
    model = make_model_dir(tmp_path / "model", shards=2, shard_bytes=12 * 2**20)
    bucket = new_bucket("gs", "resume")
    uri = f"gs://{bucket}/m"
    publish(model, uri, Console(quiet=True))
    dest = tmp_path / "dest"
    via_proxy = {**os.environ, "STORAGE_EMULATOR_HOST": gcs_proxy.url, "HERD_FETCH_CHUNK_BYTES": str(2**20)}
    gcs_proxy.block_delay = 0.01    # 1-MiB chunks in 4 blocks: about 25 MB/s, time to kill it midway
    cmd = [sys.executable, "-m", "infra.cli", "weights", "fetch", "--source", uri, "--dest", str(dest),
           "--concurrency", "1", "--quiet"]
    job = subprocess.Popen(cmd, cwd=ROOT, env=via_proxy)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and job.poll() is None:
        logs = list(dest.glob("*.partial.chunks")) if dest.exists() else []
        if logs and len(logs[0].read_text().splitlines()) >= 4:
            break
        time.sleep(0.01)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert list(dest.glob("*.partial")), "the fetch should have been killed midway"
    # What a resume must fetch: every chunk not logged as written, of every file not yet in place.
    manifest = json.loads((model / MANIFEST).read_text())
    transfer = Transfer(None, dest, chunk_bytes=2**20)
    missing = sum(transfer.remaining_bytes(RemoteFile(n, e["size"], e["sha256"]))
                  for n, e in manifest["files"].items() if not (dest / n).exists())
    total = sum(e["size"] for e in manifest["files"].values())
    unfinished = len([n for n in manifest["files"] if not (dest / n).exists()])
    assert 0 < missing < total
    gcs_proxy.media.clear()
    gcs_proxy.block_delay = 0
    out = run_herd("weights", "fetch", "--source", uri, "--dest", str(dest), "--json",
                   env={"STORAGE_EMULATOR_HOST": gcs_proxy.url, "HERD_FETCH_CHUNK_BYTES": str(2**20)})
    assert out.returncode == 0, out.stderr
    files = [m for m in gcs_proxy.media if MANIFEST not in m["path"]]   # the listing reads the manifest too
    moved, reported = sum(m["bytes"] for m in files), json.loads(out.stdout)["bytes_moved"]
    assert missing <= reported <= moved
    # The chunks not logged as written, plus at most the one chunk per file that the kill caught between
    # its write and its log line (it is fetched again: a chunk is trusted only once logged).
    assert missing <= moved <= missing + unfinished * 2**20, (moved, missing)
    assert all(m["status"] == 206 and m["range"] for m in files)
    assert verify(dest) == [] and not list(dest.glob("*.partial*"))
