"""Weights stay in their directory: entry names from a store listing, a manifest or a hub listing that
could land outside the destination (`..`, absolute, empty or `.` segments, backslashes, NUL, symlinks
already in the destination) are refused with the entry and the source named, before anything is
written; the folders around the destination stay exactly as they were."""
import hashlib
import json
import stat

import pytest
from rich.console import Console

from provisioning.weights import fetch
from provisioning.weights.fetching import publish
from provisioning.weights.manifest import MANIFEST, unsafe_reason, verify
from runtime.errors import UserError
from tests.provisioning.conftest import make_model_dir, new_bucket, tree_state

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]   # each test: seconds to ~40 s here
QUIET = Console(quiet=True)
PAYLOAD = b"bytes that must never land outside the model directory\n"


@pytest.fixture
def area(tmp_path):
    """tmp/outer/dest is the destination; tmp/outer and tmp hold bait files an escape would hit."""
    outer = tmp_path / "outer"
    outer.mkdir()
    (tmp_path / "bait.bin").write_bytes(b"original")
    (outer / "bait.bin").write_bytes(b"original")
    return tmp_path, outer / "dest"


def assert_untouched(root, dest, before):
    after = tree_state(root)
    outside = {k: v for k, v in after.items() if not k.startswith("outer/dest")}
    assert outside == {k: v for k, v in before.items() if not k.startswith("outer/dest")}
    # No transfer file was started anywhere (a link planted by a test is not one).
    assert not any(k.endswith((".partial", ".partial.chunks")) and stat.S_ISREG(v[0]) for k, v in after.items())


def bad_names(kind, root):
    """(entry name, the reason given) for every shape of escape a store can hold. The GCS emulator
    refuses to store names with `..` segments or backslashes (its own files are named by them), so
    on GCS those reach the fetch through a tampered manifest instead (the next test)."""
    names = [
        (f"{root}/bait.bin", "an absolute path"),            # key m//tmp/.../bait.bin
        ("shards//x.bin", "an empty or '.' path segment"),
        ("./x.bin", "an empty or '.' path segment"),
    ]
    if kind == "s3":   # moto keeps keys with `..` as given, and lists them
        names += [("../bait.bin", "a '..' path segment"), ("../../bait.bin", "a '..' path segment"),
                  ("shards/../../bait.bin", "a '..' path segment"), ("..\\bait.bin", "a backslash")]
    return names


def test_names_that_leave_the_directory_are_recognised():
    for name in ("../x", "/etc/x", "a/../b", "a//b", "a/./b", ".", "", "a\\b", "a\0b", "x/", "x.partial",
                 "y.partial.chunks", f"{MANIFEST}.tmp"):
        assert unsafe_reason(name), name
    for name in ("config.json", "model-00001-of-00002.safetensors", "tokenizer/vocab.json", "..x", "x..",
                 "a.b..c"):
        assert unsafe_reason(name) is None, name


def put_s3(bucket, key, data):
    import boto3
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=data)


def put_gcs(bucket, key, data):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage
    storage.Client(credentials=AnonymousCredentials(), project="t").bucket(bucket).blob(key).upload_from_string(data)


@pytest.fixture(params=["s3", "gs"])
def store(request, env, moto_s3, gcs_emulator):
    env(moto_s3 if request.param == "s3" else gcs_emulator)
    return request.param, (put_s3 if request.param == "s3" else put_gcs)


def listed_names(kind, bucket):
    """What the store itself lists (the emulators keep such keys as given)."""
    if kind == "s3":
        import boto3
        return [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket).get("Contents", [])]
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage
    return [b.name for b in storage.Client(credentials=AnonymousCredentials(), project="t").list_blobs(bucket)]


def test_a_listing_with_escaping_names_is_refused_and_nothing_lands_outside(store, area):
    kind, put = store
    root, dest = area
    for name, why in bad_names(kind, root):
        bucket = new_bucket(kind, "listing")
        put(bucket, "m/config.json", b"{}")
        put(bucket, f"m/{name}", PAYLOAD)
        if f"m/{name}" not in listed_names(kind, bucket):
            pytest.fail(f"{kind}: the emulator did not keep the key m/{name!r} as given")
        before = tree_state(root)
        uri = f"{kind}://{bucket}/m"
        with pytest.raises(UserError) as refused:
            fetch(uri, dest, quiet=True)
        message = str(refused.value)
        assert f"entry {name!r} refused" in message and uri in message and why in message, message
        assert "\n" not in message
        assert_untouched(root, dest, before)
        assert (root / "bait.bin").read_bytes() == b"original"


def test_a_tampered_manifest_cannot_redirect_writes(store, area, tmp_path):
    kind, put = store
    root, dest = area
    model = make_model_dir(tmp_path / "model", shards=1, shard_bytes=4096)
    bucket = new_bucket(kind, "manifest")
    uri = f"{kind}://{bucket}/m"
    publish(model, uri, console=QUIET)
    # The manifest now names a file outside the directory.
    # On S3 the store also holds that key, so the manifest and the listing agree and only the name
    # check stands between the entry and ../bait.bin (the GCS emulator cannot hold such a key).
    for name, why in [("../bait.bin", "a '..' path segment"), (f"{root}/bait.bin", "an absolute path"),
                      ("..\\bait.bin", "a backslash")]:
        manifest = json.loads((model / MANIFEST).read_text())
        manifest["files"][name] = {"size": len(PAYLOAD), "sha256": hashlib.sha256(PAYLOAD).hexdigest()}
        if kind == "s3" or ".." not in name:
            put(bucket, f"m/{name}", PAYLOAD)
        put(bucket, f"m/{MANIFEST}", json.dumps(manifest).encode())
        before = tree_state(root)
        with pytest.raises(UserError) as refused:
            fetch(uri, dest, quiet=True)
        message = str(refused.value)
        assert f"entry {name!r} refused: {why}" in message and uri in message, message
        assert_untouched(root, dest, before)
        assert not dest.exists(), "nothing is fetched at all, not even the good files"


def test_a_tampered_local_manifest_does_not_vouch_for_files_elsewhere(tmp_path):
    from provisioning.weights.manifest import write_manifest
    model = make_model_dir(tmp_path / "model", shards=1, shard_bytes=4096)
    (tmp_path / "elsewhere.bin").write_bytes(PAYLOAD)
    manifest = write_manifest(model, "file://x")
    manifest["files"]["../elsewhere.bin"] = {"size": len(PAYLOAD), "sha256": hashlib.sha256(PAYLOAD).hexdigest()}
    (model / MANIFEST).write_text(json.dumps(manifest))
    assert verify(model) == ["'../elsewhere.bin': refused: a '..' path segment"]


def symlink_cases(outer):
    """(what to plant in the destination, the entry it hijacks)."""
    return [
        # the weights file itself is a link to a file outside
        (lambda d: (d / "model-00001-of-00001.safetensors").symlink_to(outer / "bait.bin"),
         "model-00001-of-00001.safetensors"),
        # its transfer file is (the part written first)
        (lambda d: (d / "config.json.partial").symlink_to(outer / "bait.bin"), "config.json"),
        # a dangling link: writing through it would create a file outside
        (lambda d: (d / "tokenizer.json.partial.chunks").symlink_to(outer / "new-file"), "tokenizer.json"),
    ]


def test_symlinks_in_the_destination_pointing_outside_are_not_followed(env, moto_s3, area, tmp_path):
    env(moto_s3)
    root, dest = area
    outer = dest.parent
    model = make_model_dir(tmp_path / "model", shards=1, shard_bytes=4096)
    bucket = new_bucket("s3", "symlink")
    uri = f"s3://{bucket}/m"
    publish(model, uri, console=QUIET)
    for plant, entry in symlink_cases(outer):
        if dest.exists():
            for p in dest.iterdir():
                p.unlink()
        dest.mkdir(exist_ok=True)
        plant(dest)
        before = tree_state(root)
        with pytest.raises(UserError) as refused:
            fetch(uri, dest, quiet=True)
        message = str(refused.value)
        assert f"entry {entry!r} refused" in message and "outside" in message and uri in message, message
        assert_untouched(root, dest, before)
        assert not (outer / "new-file").exists() and (outer / "bait.bin").read_bytes() == b"original"


def test_a_symlinked_subfolder_pointing_outside_is_refused(env, moto_s3, area):
    env(moto_s3)
    root, dest = area
    bucket = new_bucket("s3", "subdir")
    put_s3(bucket, "m/config.json", b"{}")
    put_s3(bucket, "m/tokenizer/vocab.json", PAYLOAD)
    dest.mkdir()
    (dest / "tokenizer").symlink_to(dest.parent)
    before = tree_state(root)
    with pytest.raises(UserError, match=r"entry 'tokenizer/vocab\.json' refused: .* outside"):
        fetch(f"s3://{bucket}/m", dest, quiet=True)
    assert_untouched(root, dest, before)
    assert not (dest.parent / "vocab.json").exists()
    # A subfolder that is a plain folder is fine: nested names are allowed.
    (dest / "tokenizer").unlink()
    fetched = fetch(f"s3://{bucket}/m", dest, quiet=True)
    assert (fetched / "tokenizer" / "vocab.json").read_bytes() == PAYLOAD and verify(fetched) == []


def test_a_link_where_the_manifest_is_written_is_replaced_not_followed(env, moto_s3, area, tmp_path):
    env(moto_s3)
    root, dest = area
    model = make_model_dir(tmp_path / "model", shards=1, shard_bytes=4096)
    bucket = new_bucket("s3", "mtmp")
    publish(model, f"s3://{bucket}/m", console=QUIET)
    dest.mkdir()
    (dest / f"{MANIFEST}.tmp").symlink_to(dest.parent / "bait.bin")
    (dest / MANIFEST).symlink_to(root / "bait.bin")
    fetch(f"s3://{bucket}/m", dest, quiet=True)
    assert (dest.parent / "bait.bin").read_bytes() == b"original" and (root / "bait.bin").read_bytes() == b"original"
    assert not (dest / MANIFEST).is_symlink() and verify(dest) == []


def test_a_hub_listing_with_escaping_names_is_refused(hub_env, fake_hub, area, tmp_path):
    root, dest = area
    fake_hub.repos["org/tiny"] = make_model_dir(tmp_path / "repo", shards=1, shard_bytes=4096)
    hub_env()
    for name, why in [("../bait.safetensors", "a '..' path segment"), ("/etc/x.safetensors", "an absolute path"),
                      ("..\\x.safetensors", "a backslash")]:
        fake_hub.extra_siblings["org/tiny"] = [{"rfilename": name, "size": 10,
                                                "lfs": {"sha256": "0" * 64, "size": 10, "pointerSize": 134}}]
        before = tree_state(root)
        with pytest.raises(UserError) as refused:
            fetch("hf://org/tiny", dest, quiet=True)
        assert f"entry {name!r} refused: {why}" in str(refused.value) and "hf://org/tiny" in str(refused.value)
        assert_untouched(root, dest, before)
    assert not any("/resolve/" in r["path"] for r in fake_hub.requests), "no file is asked for before the check"
    assert fake_hub.content_bytes() == 0


def test_the_cli_reports_a_refused_entry_in_one_line_with_exit_2(env, moto_s3, area, herd):
    env(moto_s3)
    root, dest = area
    bucket = new_bucket("s3", "cli")
    put_s3(bucket, "m/config.json", b"{}")
    put_s3(bucket, "m/../bait.bin", PAYLOAD)
    out = herd("weights", "fetch", "--source", f"s3://{bucket}/m", "--dest", str(dest))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "entry '../bait.bin' refused" in lines[0] and f"s3://{bucket}/m" in lines[0], out.stderr
    assert (root / "outer" / "bait.bin").read_bytes() == b"original"
