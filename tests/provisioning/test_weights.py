"""Weight fetching against real servers: moto's S3 server and the GCS emulator (the Hub: test_weights_hub.py).

Every fetch is verified against a manifest; interrupted fetches resume; a corrupt file is fetched
again; a verified copy is never replaced by a bad one; a second fetch moves nothing.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from rich.console import Console

from provisioning.weights import fetch
from provisioning.weights.fetching import FetchReport, publish
from provisioning.weights.manifest import MANIFEST, verify
from runtime.errors import UserError
from tests.conftest import ROOT, run_herd
from tests.provisioning.conftest import make_model_dir

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]   # loopback servers and emulators: 5-85 s here
QUIET = Console(quiet=True)


def same_files(a, b):
    names = sorted(p.name for p in a.iterdir() if p.name != MANIFEST)
    assert names == sorted(p.name for p in b.iterdir() if p.name != MANIFEST)
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def make_bucket(kind, name):
    if kind == "s3":
        import boto3
        boto3.client("s3").create_bucket(Bucket=name)
    else:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage
        storage.Client(credentials=AnonymousCredentials(), project="test").create_bucket(name)


@pytest.fixture(params=["s3", "gs"])
def store(request, env, moto_s3, gcs_emulator):
    """A fresh bucket on the real emulator for each scheme."""
    env(moto_s3 if request.param == "s3" else gcs_emulator)
    bucket = f"herd-{request.node.name.split('[')[0][-20:].replace('_', '-')}-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    make_bucket(request.param, bucket)
    return request.param, f"{request.param}://{bucket}/models/tiny"


def test_publish_then_fetch_verifies_and_a_second_fetch_moves_nothing(store, tmp_path):
    _, uri = store
    model = make_model_dir(tmp_path / "model")
    publish(model, uri, console=QUIET)
    first = FetchReport(uri, "")
    dest = fetch(uri, tmp_path / "dest", quiet=True, report=first)
    assert same_files(model, dest) and verify(dest) == []
    assert first.bytes_moved == sum(p.stat().st_size for p in model.iterdir() if p.name != MANIFEST)
    again = FetchReport(uri, "")
    fetch(uri, dest, quiet=True, report=again)
    assert again.bytes_moved == 0 and again.reused_files == again.files


def test_corrupt_file_is_fetched_again_alone(store, tmp_path):
    _, uri = store
    model = make_model_dir(tmp_path / "model")
    publish(model, uri, console=QUIET)
    dest = fetch(uri, tmp_path / "dest", quiet=True)
    shard = next(dest.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0xFF
    shard.write_bytes(bytes(data))
    report = FetchReport(uri, "")
    fetch(uri, dest, quiet=True, report=report)
    assert report.bytes_moved == shard.stat().st_size
    assert same_files(model, dest)


def test_a_bad_download_never_replaces_a_verified_copy(env, moto_s3, tmp_path):
    import boto3
    env(moto_s3)
    make_bucket("s3", "herd-bad-download")
    uri = "s3://herd-bad-download/m"
    model = make_model_dir(tmp_path / "model")
    publish(model, uri, console=QUIET)
    dest = fetch(uri, tmp_path / "dest", quiet=True)
    shard = sorted(dest.glob("*.safetensors"))[0]
    good = shard.read_bytes()
    # The store now announces a new version of the shard, but serves corrupt bytes for it.
    manifest = json.loads((model / MANIFEST).read_text())
    manifest["files"][shard.name]["sha256"] = "0" * 64
    s3 = boto3.client("s3")
    s3.put_object(Bucket="herd-bad-download", Key=f"m/{MANIFEST}", Body=json.dumps(manifest).encode())
    with pytest.raises(UserError, match="does not match the manifest"):
        fetch(uri, dest, quiet=True)
    assert shard.read_bytes() == good
    assert not list(dest.glob("*.partial"))


def test_killed_fetch_resumes_and_finishes_verified(env, moto_s3, tmp_path):
    env(moto_s3)
    make_bucket("s3", "herd-resume")
    uri = "s3://herd-resume/m"
    model = make_model_dir(tmp_path / "model", shards=2, shard_bytes=24 * 2**20)
    publish(model, uri, console=QUIET)
    dest = tmp_path / "dest"
    cmd = [sys.executable, "-m", "infra.cli", "weights", "fetch", "--source", uri, "--dest", str(dest),
           "--concurrency", "1", "--quiet"]
    job = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "HERD_FETCH_CHUNK_BYTES": str(2**20)})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        logs = list(dest.glob("*.partial.chunks")) if dest.exists() else []
        if logs and len(logs[0].read_text().splitlines()) >= 3:
            break
        time.sleep(0.01)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert list(dest.glob("*.partial")), "the fetch should have been killed midway"
    total = sum(p.stat().st_size for p in model.iterdir() if p.name != MANIFEST)
    out = run_herd("weights", "fetch", "--source", uri, "--dest", str(dest), "--json", timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert 0 < report["bytes_moved"] < total
    assert same_files(model, dest) and verify(dest) == []
    print(f"resumed: {report['bytes_moved']} of {total} bytes moved after the kill")


def test_missing_bucket_and_missing_credentials_are_clear(env, moto_s3, tmp_path, monkeypatch):
    env(moto_s3)
    with pytest.raises(UserError, match="does not exist"):
        fetch("s3://no-such-bucket-herd/x", tmp_path / "d", quiet=True)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    # Nothing may probe the instance metadata address from a test.
    env({"AWS_EC2_METADATA_DISABLED": "true", "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
         "AWS_CONFIG_FILE": str(tmp_path / "none")})
    with pytest.raises(UserError, match="AWS_ACCESS_KEY_ID"):
        fetch("s3://herd-any/x", tmp_path / "d", quiet=True)


def test_manifest_naming_a_missing_file_is_refused(env, gcs_emulator, tmp_path):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage
    env(gcs_emulator)
    make_bucket("gs", "herd-missing-file")
    model = make_model_dir(tmp_path / "model")
    publish(model, "gs://herd-missing-file/m", console=QUIET)
    bucket = storage.Client(credentials=AnonymousCredentials(), project="t").bucket("herd-missing-file")
    bucket.blob("m/config.json").delete()
    with pytest.raises(UserError, match="lists config.json but the store has no such file"):
        fetch("gs://herd-missing-file/m", tmp_path / "dest", quiet=True)


def test_disk_too_small_names_the_shortfall_before_moving_bytes(env, moto_s3, tmp_path, monkeypatch):
    env(moto_s3)
    make_bucket("s3", "herd-small-disk")
    model = make_model_dir(tmp_path / "model")
    publish(model, "s3://herd-small-disk/m", console=QUIET)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1_000_000))
    with pytest.raises(UserError, match="not enough disk: .* GB more needed"):
        fetch("s3://herd-small-disk/m", tmp_path / "dest", quiet=True)
    assert not list((tmp_path / "dest").glob("*.safetensors*"))


def test_unknown_scheme_is_a_one_line_error(herd, tmp_path):
    out = herd("weights", "fetch", "--source", "ftp://x/y", "--dest", str(tmp_path / "d"))
    assert out.returncode == 2 and "unknown scheme 'ftp'" in out.stderr
