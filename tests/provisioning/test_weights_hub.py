"""hf:// through huggingface_hub, against the loopback hub (HF_ENDPOINT) and its CDN host.

What is checked at the server: the requests come from huggingface_hub (its user agent), LFS bytes come
from the CDN host after the hub's 302 (without the token), a file already in the user's Hugging Face
cache costs 0 bytes, a corrupted cached file costs exactly its own size and the cache stays as it was,
an interrupted transfer resumes with a Range for exactly the missing bytes. Offline mode and the
gated-repo errors are checked through the CLI, as a user meets them: one line, exit 2.
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest

from provisioning.weights import fetch
from provisioning.weights.fetching import FetchReport
from provisioning.weights.manifest import MANIFEST, sha256_of, verify
from runtime.errors import UserError
from tests.conftest import ROOT, run_herd
from tests.provisioning.conftest import CountingProxy, make_model_dir, tree_state

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]   # loopback servers and emulators: 5-85 s here
REPO = "org/tiny"
URI = f"hf://{REPO}"
SECRET = "hf_loopbackSecretToken0123456789"


def make_repo(path, shards=3, shard_bytes=2 * 2**20):
    """A sharded model repo as the Hub holds one: config, tokenizer, shards, their index, and a
    pytorch_model.bin duplicate that serving does not need."""
    repo = make_model_dir(path, shards=shards, shard_bytes=shard_bytes)
    names = sorted(p.name for p in repo.glob("*.safetensors"))
    (repo / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {f"layer.{i}": name for i, name in enumerate(names)}}))
    (repo / "pytorch_model.bin").write_bytes(b"duplicate weights nobody needs" * 1000)
    return repo


def serving_files(repo):
    return sorted(p.name for p in repo.iterdir() if p.name != "pytorch_model.bin")


def shards(repo):
    return sorted(p.name for p in repo.glob("*.safetensors"))


def seed_cache(repo_id, names):
    """Fill the user's Hugging Face cache the way users do: the Hub's client downloads the files."""
    from huggingface_hub import hf_hub_download
    return {name: hf_hub_download(repo_id, name) for name in names}


@pytest.fixture
def repo(tmp_path, fake_hub, hub_env):
    path = make_repo(tmp_path / "repo")
    fake_hub.repos[REPO] = path
    hub_env()
    return path


def test_a_fetch_goes_through_huggingface_hub_and_lfs_bytes_come_from_the_cdn(repo, fake_hub, hub_env, tmp_path):
    fake_hub.token = SECRET
    hub_env(HF_TOKEN=SECRET)
    report = FetchReport(URI, "")
    dest = fetch(URI, tmp_path / "dest", quiet=True, report=report)
    assert sorted(p.name for p in dest.iterdir() if p.name != MANIFEST) == serving_files(repo)
    assert all((dest / n).read_bytes() == (repo / n).read_bytes() for n in serving_files(repo))
    assert verify(dest) == []
    # Every request came from huggingface_hub (which also asks, with its bare session, for its
    # registry of agent harnesses: a request of the library's own, not herd's).
    seen = [r for r in fake_hub.requests if r["path"] != "/api/agent-harnesses"]
    assert seen and all("hf_hub/" in r["user_agent"] for r in seen), {r["user_agent"] for r in seen}
    hub_paths = [(r["method"], r["path"].split("?")[0]) for r in seen if r["server"] == "hub"]
    assert ("GET", f"/api/models/{REPO}") in hub_paths   # the listing (no revision given: the default branch)
    assert {p.rsplit("/", 1)[1] for m, p in hub_paths if m == "HEAD"} == set(serving_files(repo))
    # LFS bytes from the CDN host only, once each; the small files from the hub; the token stays with the hub.
    assert fake_hub.cdn_served == {n: (repo / n).stat().st_size for n in shards(repo)}
    assert fake_hub.served == {n: (repo / n).stat().st_size for n in serving_files(repo) if n not in shards(repo)}
    assert all(r["authorized"] for r in seen if r["server"] == "hub")
    assert not any(r["authorized"] for r in fake_hub.requests if r["server"] == "cdn")
    assert report.bytes_moved == fake_hub.content_bytes()
    manifest = json.loads((dest / MANIFEST).read_text())
    assert manifest["revision"] == httpx.get(f"{fake_hub.url}/api/models/{REPO}").json()["sha"]
    for name in shards(repo):
        assert manifest["files"][name]["sha256"] == hashlib.sha256((repo / name).read_bytes()).hexdigest()
    # A second fetch moves nothing.
    fake_hub.reset_counts()
    again = FetchReport(URI, "")
    fetch(URI, dest, quiet=True, report=again)
    assert again.bytes_moved == 0 and again.reused_files == again.files and fake_hub.content_bytes() == 0


def test_files_in_the_hugging_face_cache_are_reused_with_zero_bytes_downloaded(repo, fake_hub, tmp_path):
    cached = seed_cache(REPO, serving_files(repo))
    cache_root = os.environ["HF_HUB_CACHE"]
    before = tree_state(cache_root, digests=True)
    fake_hub.reset_counts()
    report = FetchReport(URI, "")
    dest = fetch(URI, tmp_path / "dest", quiet=True, report=report)
    assert fake_hub.content_bytes() == 0 and report.bytes_moved == 0
    assert report.cached_files == len(serving_files(repo)) and verify(dest) == []
    for name in serving_files(repo):
        assert (dest / name).read_bytes() == (repo / name).read_bytes()
    # LFS weights are linked (no second copy on disk); small files, the ones people edit, are copied.
    for name in shards(repo):
        assert os.path.samefile(dest / name, cached[name])
    assert not os.path.samefile(dest / "config.json", cached["config.json"])
    assert tree_state(cache_root, digests=True) == before, "the user's cache is only read"


def test_a_partly_cached_repo_downloads_only_what_the_cache_lacks(repo, fake_hub, tmp_path):
    have = shards(repo)[:2] + ["config.json"]
    seed_cache(REPO, have)
    fake_hub.reset_counts()
    dest = fetch(URI, tmp_path / "dest", quiet=True)
    served = {**fake_hub.served, **fake_hub.cdn_served}
    assert served == {n: (repo / n).stat().st_size for n in serving_files(repo) if n not in have}
    assert verify(dest) == []


def test_a_corrupted_cached_file_is_refetched_and_the_cache_left_untouched(repo, fake_hub, tmp_path, capfd):
    cached = seed_cache(REPO, serving_files(repo))
    bad = shards(repo)[1]
    blob = os.path.realpath(cached[bad])
    data = bytearray(open(blob, "rb").read())
    data[12345] ^= 0xFF
    os.chmod(blob, 0o644)
    with open(blob, "r+b") as f:   # same size, one byte flipped: bit rot
        f.write(data)
    cache_root = os.environ["HF_HUB_CACHE"]
    before, blob_hash = tree_state(cache_root, digests=True), sha256_of(blob)
    fake_hub.reset_counts()
    report = FetchReport(URI, "")
    dest = fetch(URI, tmp_path / "dest", quiet=False, report=report)
    assert fake_hub.cdn_served == {bad: len(data)} and fake_hub.served == {}
    assert report.cache_mismatches == [bad] and report.cached_files == len(serving_files(repo)) - 1
    assert (dest / bad).read_bytes() == (repo / bad).read_bytes() and verify(dest) == []
    assert not os.path.samefile(dest / bad, blob)
    assert sha256_of(blob) == blob_hash and tree_state(cache_root, digests=True) == before
    assert f"{bad} in the Hugging Face cache does not match" in " ".join(capfd.readouterr().err.split())


def herd_fetch(dest, env, *extra):
    return run_herd("weights", "fetch", "--source", URI, "--dest", str(dest), *extra, env=env, timeout=120)


def test_offline_with_a_complete_cache_works_and_without_one_fails_in_one_line(repo, fake_hub, hub_env, tmp_path):
    seed_cache(REPO, serving_files(repo))
    env = hub_env(offline=True)
    fake_hub.reset_counts()
    out = herd_fetch(tmp_path / "dest", env, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["cached_files"] == len(serving_files(repo))
    assert verify(tmp_path / "dest") == [] and fake_hub.requests == [], "offline means no request at all"

    # The cache lacks a shard: the index says which.
    missing = shards(repo)[2]
    for link in (tmp_path / "hf-home" / "hub").glob(f"models--org--tiny/snapshots/*/{missing}"):
        link.unlink()
    out = herd_fetch(tmp_path / "dest2", env)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and f"lacks {missing}" in lines[0], out.stderr

    # No cache at all.
    env = {**env, "HF_HOME": str(tmp_path / "empty"), "HF_HUB_CACHE": str(tmp_path / "empty" / "hub")}
    out = herd_fetch(tmp_path / "dest3", env)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and "Traceback" not in out.stderr and len(lines) == 1, out.stderr
    assert "HF_HUB_OFFLINE is set" in lines[0] and "holds no snapshot of org/tiny@main" in lines[0]
    assert fake_hub.requests == [] and not (tmp_path / "dest3").exists()


def test_proxies_are_honoured_and_an_unreachable_hub_falls_back_to_the_cache(repo, fake_hub, hub_env, tmp_path):
    proxy = CountingProxy()
    try:
        env = hub_env()
        out = herd_fetch(tmp_path / "dest", {**env, "HTTP_PROXY": proxy.url, "NO_PROXY": ""})
        assert out.returncode == 0, out.stderr
        assert any(u.startswith(f"{fake_hub.url}/api/models/{REPO}") for u in proxy.forwarded)
        assert sum(u.startswith(f"{fake_hub.cdn_url}/lfs/") for u in proxy.forwarded) == len(shards(repo))
        assert verify(tmp_path / "dest") == []
    finally:
        proxy.close()
    # The Hub unreachable (nothing listens on its port): the cache's snapshot, with the reason given.
    from tests.runtime.conftest import free_port
    down = {**env, "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    line = one_line(herd_fetch(tmp_path / "dest2", down))
    assert "cannot be reached (ConnectError)" in line and "holds no snapshot of org/tiny@main" in line
    seed_cache(REPO, serving_files(repo))
    fake_hub.reset_counts()
    out = herd_fetch(tmp_path / "dest2", down)
    assert out.returncode == 0 and "cannot be reached" in out.stderr and verify(tmp_path / "dest2") == []


def one_line(out) -> str:
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    return lines[0]


def test_gated_repo_errors_are_one_line_and_the_saved_login_token_works(repo, fake_hub, hub_env, tmp_path):
    fake_hub.gated.add(REPO)
    fake_hub.token = SECRET
    env = hub_env()
    out = herd_fetch(tmp_path / "dest", env)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert "is gated and no token was found" in lines[0] and f"accept its licence at {fake_hub.url}/{REPO}" in lines[0]
    assert any(r["path"].startswith(f"/{REPO}/resolve/") and not r["authorized"] for r in fake_hub.requests)

    out = herd_fetch(tmp_path / "dest", {**env, "HF_TOKEN": "hf_someoneElsesToken"})
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "the token in use has no access" in lines[0], out.stderr
    assert "hf_someoneElsesToken" not in out.stderr + out.stdout

    out = herd_fetch(tmp_path / "dest", {**env, "HF_TOKEN": SECRET})
    assert out.returncode == 0, out.stderr
    assert SECRET not in out.stderr + out.stdout and verify(tmp_path / "dest") == []
    shutil.rmtree(tmp_path / "dest")

    # The token `hf auth login` saves (HF_HOME/token) is found by the Hub's client; herd never prints it.
    (tmp_path / "hf-home").mkdir(exist_ok=True)
    (tmp_path / "hf-home" / "token").write_text(SECRET)
    out = herd_fetch(tmp_path / "dest", env, "--json")
    assert out.returncode == 0, out.stderr
    assert SECRET not in out.stderr + out.stdout and verify(tmp_path / "dest") == []


def test_unknown_repo_and_revision_are_one_line(repo, fake_hub, tmp_path):
    with pytest.raises(UserError, match=r"repository 'org/nothing' not found on .*hf auth login"):
        fetch("hf://org/nothing", tmp_path / "d", quiet=True)
    with pytest.raises(UserError, match="revision 'v9' does not exist in org/tiny"):
        fetch(f"{URI}@v9", tmp_path / "d", quiet=True)
    with pytest.raises(UserError, match="expected hf://ORG/REPO"):
        fetch("hf://just-a-name", tmp_path / "d", quiet=True)


def big_repo(tmp_path, fake_hub):
    """Shards larger than huggingface_hub's 10-MiB read size (it writes what it reads in such chunks)."""
    path = make_repo(tmp_path / "big", shards=2, shard_bytes=24 * 2**20)
    fake_hub.repos[REPO] = path
    return path


def test_a_truncated_transfer_resumes_with_only_the_missing_bytes(repo, fake_hub, tmp_path):
    repo = big_repo(tmp_path, fake_hub)
    name = shards(repo)[0]
    size = (repo / name).stat().st_size
    cut = 15_000_000
    # The CDN sends the headers of the whole file, then closes after `cut` bytes; huggingface_hub
    # retries with a Range, which answers 503: the fetch fails, keeping what was written.
    fake_hub.faults[name] = [f"truncate:{cut}", "503"]
    dest = tmp_path / "dest"
    with pytest.raises(UserError) as failed:
        fetch(URI, dest, quiet=True, concurrency=1)
    kept = (dest / f"{name}.partial").stat().st_size
    assert 0 < kept <= cut and not (dest / name).exists()
    assert f"{name}: HTTP 503 after {kept} of {size} bytes" in str(failed.value) and "run again" in str(failed.value)
    assert fake_hub.cdn_served[name] == cut
    fake_hub.reset_counts()
    report = FetchReport(URI, "")
    fetch(URI, dest, quiet=True, report=report)
    ranges = [r["range"] for r in fake_hub.requests if r["server"] == "cdn" and name in r["path"]]
    assert ranges == [f"bytes={kept}-"]
    assert fake_hub.cdn_served[name] == size - kept
    assert (dest / name).read_bytes() == (repo / name).read_bytes() and verify(dest) == []
    assert not list(dest.glob("*.partial*"))


def test_a_killed_fetch_resumes_where_it_stopped(repo, fake_hub, hub_env, tmp_path):
    repo = big_repo(tmp_path, fake_hub)
    fake_hub.block_delay = 0.02     # 1-MiB blocks at 50 MB/s: time to kill it midway
    env = hub_env()
    dest = tmp_path / "dest"
    cmd = [sys.executable, "-m", "infra.cli", "weights", "fetch", "--source", URI, "--dest", str(dest),
           "--concurrency", "1", "--quiet"]
    job = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env})
    deadline = time.monotonic() + 60
    partials = []
    while time.monotonic() < deadline and job.poll() is None:
        partials = [p for p in dest.glob("*.safetensors.partial") if p.stat().st_size > 0] if dest.exists() else []
        if partials:
            break
        time.sleep(0.01)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert partials, "the fetch should have been killed midway through a shard"
    kept = {p.name.removesuffix(".partial"): p.stat().st_size for p in dest.glob("*.safetensors.partial")}
    done = {n for n in shards(repo) if (dest / n).exists()}
    fake_hub.reset_counts()
    fake_hub.block_delay = 0
    out = herd_fetch(dest, env, "--json")
    assert out.returncode == 0, out.stderr
    for name, have in kept.items():
        size = (repo / name).stat().st_size
        assert 0 < have < size
        assert fake_hub.cdn_served.get(name) == size - have, (name, have, fake_hub.cdn_served)
        assert [r["range"] for r in fake_hub.requests if r["server"] == "cdn" and name in r["path"]] == [f"bytes={have}-"]
    assert not any(n in fake_hub.cdn_served for n in done)
    assert json.loads(out.stdout)["bytes_moved"] == fake_hub.content_bytes()
    assert verify(dest) == []


def test_a_bad_download_never_replaces_a_verified_copy(repo, fake_hub, tmp_path, monkeypatch):
    dest = fetch(URI, tmp_path / "dest", quiet=True)
    name = shards(repo)[0]
    good = (dest / name).read_bytes()
    # A new revision of the shard, and a CDN that serves it damaged.
    (repo / name).write_bytes(os.urandom(len(good)))
    real_hashes = fake_hub.hashes
    listed = real_hashes(repo / name)
    (repo / name).write_bytes(os.urandom(len(good)))      # the bytes served no longer match the listing
    monkeypatch.setattr(fake_hub, "hashes", lambda p: listed if p == repo / name else real_hashes(p))
    with pytest.raises(UserError, match=f"{name}: sha256 .* does not match the Hub's sha256"):
        fetch(URI, dest, quiet=True)
    assert (dest / name).read_bytes() == good and not list(dest.glob("*.partial*"))


def test_xet_stored_files_go_through_hf_xet_and_are_still_verified(repo, fake_hub, tmp_path, monkeypatch):
    """The loopback hub announces Xet storage (X-Xet-Hash) as the Hub does; hf_xet's own protocol (CAS)
    cannot be served here, so its download call is replaced by a stand-in that writes the bytes
    (right, then wrong) where it is told: herd must take the Xet path and still check sha256."""
    import huggingface_hub.file_download as file_download
    fake_hub.xet = True
    calls = []

    def stand_in(*, incomplete_path, xet_file_data, headers, expected_size, **kwargs):
        calls.append((xet_file_data.file_hash, expected_size))
        source = next(p for p in repo.glob("*.safetensors") if fake_hub.hashes(p)[0] == xet_file_data.file_hash)
        data = bytearray(source.read_bytes())
        if wrong:
            data[0] ^= 1
        incomplete_path.write_bytes(data)
    monkeypatch.setattr(file_download, "xet_get", stand_in)
    wrong = False
    dest = fetch(URI, tmp_path / "dest", quiet=True)
    assert sorted(calls) == sorted((fake_hub.hashes(repo / n)[0], (repo / n).stat().st_size) for n in shards(repo))
    assert fake_hub.cdn_served == {} and verify(dest) == []
    wrong = True
    with pytest.raises(UserError, match="does not match the Hub's sha256"):
        fetch(URI, tmp_path / "dest2", quiet=True)
    assert not list((tmp_path / "dest2").glob("*.safetensors"))
