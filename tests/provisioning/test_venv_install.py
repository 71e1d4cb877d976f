"""Only our package: the real 50-venv step installs herd from the bundled wheel, by path, into a fresh
venv, and on cloud nodes exactly the dependencies the bundle's lock pins, each file hash-checked. The bundle here is small (a wheel named herd with a console script, and one dependency) so the
test is fast; the step and its install function are the ones every host runs.

Decoys everywhere pip could look: a wheel named like ours (a higher version, and the same version with
other contents) in an extra find-links folder from PIP_FIND_LINKS, and in a package index on loopback
(PIP_EXTRA_INDEX_URL, or PIP_INDEX_URL); the default index is unreachable (127.0.0.1:9)."""
import base64
import hashlib
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from provisioning.steps import STEPS_DIR

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]   # fresh venvs and wheel installs
VERSION = "0.1.0"


def make_wheel(folder: Path, name: str, version: str, origin: str, requires=(), script=False) -> Path:
    """A minimal pure-Python wheel: module `{name}_probe` saying where it came from."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}_probe/__init__.py": f"ORIGIN = {origin!r}\n\ndef main():\n    print('herd probe', ORIGIN)\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                            + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: herd-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    if script:
        files[f"{dist}/entry_points.txt"] = f"[console_scripts]\nherd = {name}_probe:main\n"
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{dist}/RECORD"] = "\n".join(record + [f"{dist}/RECORD,,"]) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(out, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return out


class DecoyIndex:
    """A PEP 503 index on loopback (directory listings are simple-index pages) that records requests."""

    def __init__(self, root: Path):
        self.requests: list[str] = []
        index = self

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, *args):
                index.requests.append(self.path)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/simple/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture
def decoys(tmp_path):
    links = tmp_path / "decoy-links"
    make_wheel(links, "herd", "99.0", "decoy find-links", requires=["tinydep>=1.0"], script=True)
    make_wheel(links / "same", "herd", VERSION, "decoy same version", requires=["tinydep>=1.0"], script=True)
    make_wheel(links, "tinydep", "9.9", "decoy find-links")
    simple = tmp_path / "index" / "simple"
    make_wheel(simple / "herd", "herd", "99.0", "decoy index", requires=["tinydep>=1.0"], script=True)
    make_wheel(simple / "tinydep", "tinydep", "9.9", "index")
    index = DecoyIndex(tmp_path / "index")
    yield {"links": [links, links / "same"], "index": index}
    index.close()


def run_venv_step(home: Path, offline: bool, pip_env: dict) -> subprocess.CompletedProcess:
    # A host's environment: no pip settings of this machine, and no PYTHONPATH (the test runner's
    # points at the checkout, whose herd.egg-info would look like an installed herd to pip).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    env.update(pip_env, HERD_HOME=str(home), HERD_VERSION=VERSION, HERD_GPU="0", HERD_PYTHON=sys.executable,
               HERD_PIP_OFFLINE="1" if offline else "0", PIP_DISABLE_PIP_VERSION_CHECK="1",
               PIP_DEFAULT_TIMEOUT="5", PIP_RETRIES="0",
               PIP_NO_CACHE_DIR="1")   # each file as the index serves it now
    return subprocess.run(["bash", str(STEPS_DIR / "50-venv.sh")], env=env, capture_output=True, text=True,
                          timeout=300)


def installed(home: Path, name: str) -> tuple[str, str]:
    """(version, ORIGIN) of a package in the step's venv."""
    code = (f"import importlib.metadata as m, {name}_probe as p; print(m.version({name!r})); print(p.ORIGIN)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    out = subprocess.run([str(home / "venv" / "bin" / "python"), "-c", code], capture_output=True, text=True,
                         env=env, check=True).stdout.splitlines()
    return out[0], out[1]


def test_offline_bundle_installs_with_no_index_and_ignores_every_other_source(tmp_path, decoys):
    home = tmp_path / "home"
    make_wheel(home / "wheels", "herd", VERSION, "bundle", requires=["tinydep>=1.0"], script=True)
    make_wheel(home / "wheels", "tinydep", "1.0", "bundle")
    done = run_venv_step(home, offline=True, pip_env={
        "PIP_INDEX_URL": "http://127.0.0.1:9/",                  # unreachable
        "PIP_EXTRA_INDEX_URL": decoys["index"].url,
        "PIP_FIND_LINKS": " ".join(str(p) for p in decoys["links"]),
    })
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"ok: herd {VERSION} in" in done.stdout
    assert installed(home, "herd") == (VERSION, "bundle")
    assert installed(home, "tinydep") == ("1.0", "bundle")     # not 9.9 from the extra find-links or index
    assert decoys["index"].requests == [], "an offline install asked a package index"
    probe = subprocess.run([str(home / "venv" / "bin" / "herd"), "--help"], capture_output=True, text=True)
    assert probe.stdout.strip() == "herd probe bundle"
    # A second run finds it installed and does nothing.
    again = run_venv_step(home, offline=True, pip_env={"PIP_INDEX_URL": "http://127.0.0.1:9/"})
    assert again.returncode == 0 and f"ok: herd {VERSION} installed" in again.stdout


def lock_for(*wheels: Path) -> str:
    """A lock as `make lock` writes it: name==version and the sha256 of the file the index serves."""
    return "".join(f"{w.name.split('-')[0]}=={w.name.split('-')[1]} \\\n"
                   f"    --hash=sha256:{hashlib.sha256(w.read_bytes()).hexdigest()}\n" for w in wheels)


def cloud_home(tmp_path: Path, index_root: Path, dep_version: str, requires=("tinydep>=1.0",)) -> Path:
    """A cloud node's bundle: herd's wheel and a lock pinning the index's genuine tinydep."""
    home = tmp_path / "home"
    make_wheel(home / "wheels", "herd", VERSION, "bundle", requires=list(requires), script=True)
    genuine = make_wheel(index_root / "simple" / "tinydep", "tinydep", dep_version, f"index {dep_version}")
    (home / "wheels" / "node-lock.txt").write_text(lock_for(genuine))
    return home


def test_cloud_node_installs_exactly_the_locked_dependencies_and_herd_only_from_the_bundle(tmp_path, decoys):
    home = cloud_home(tmp_path, tmp_path / "index", "1.0")
    done = run_venv_step(home, offline=False, pip_env={
        "PIP_INDEX_URL": decoys["index"].url,
        "PIP_FIND_LINKS": " ".join(str(p) for p in decoys["links"]),
    })
    assert done.returncode == 0, done.stdout + done.stderr
    assert installed(home, "herd") == (VERSION, "bundle")
    assert installed(home, "tinydep") == ("1.0", "index 1.0")   # the lock's pin, not the index's 9.9
    assert not any(r.startswith("/simple/herd") for r in decoys["index"].requests), decoys["index"].requests
    assert (home / "venv").is_symlink()


def test_a_tampered_or_incomplete_dependency_set_fails_and_leaves_the_working_venv(tmp_path, decoys):
    """The index serves a file whose hash the lock does not list: refused. A herd wheel needing a package
    the lock lacks: refused by pip check. Either way the link still names the venv that worked."""
    index_root = tmp_path / "index"
    home = cloud_home(tmp_path, index_root, "1.0")
    env = {"PIP_INDEX_URL": decoys["index"].url}
    assert run_venv_step(home, offline=False, pip_env=env).returncode == 0
    working = (home / "venv").resolve()

    # A new lock pins tinydep 1.1; the index then serves other bytes under that name.
    genuine = make_wheel(tmp_path / "genuine", "tinydep", "1.1", "genuine 1.1")
    (home / "wheels" / "node-lock.txt").write_text(lock_for(genuine))
    make_wheel(index_root / "simple" / "tinydep", "tinydep", "1.1", "tampered 1.1")
    done = run_venv_step(home, offline=False, pip_env=env)
    assert done.returncode != 0 and "THESE PACKAGES DO NOT MATCH THE HASHES" in done.stderr, done.stderr
    assert (home / "venv").resolve() == working and installed(home, "tinydep") == ("1.0", "index 1.0")

    # The genuine file: a new venv, switched to; the one before stays for the running service.
    shutil.copy(genuine, index_root / "simple" / "tinydep" / genuine.name)
    done = run_venv_step(home, offline=False, pip_env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert installed(home, "tinydep") == ("1.1", "genuine 1.1") and (home / "venv").resolve() != working
    assert working.is_dir()

    # herd needs a package the lock does not pin: --no-deps installs nothing unlocked, pip check refuses.
    before = (home / "venv").resolve()
    make_wheel(home / "wheels", "herd", VERSION, "bundle", requires=["tinydep>=1.0", "unlocked>=1"], script=True)
    (home / "wheels" / "node-lock.txt").write_text(lock_for(genuine) + "# rebuilt\n")
    done = run_venv_step(home, offline=False, pip_env=env)
    assert done.returncode == 1 and "herd's dependencies in" in done.stderr and "unlocked" in done.stderr
    assert (home / "venv").resolve() == before


def test_a_missing_or_ambiguous_wheel_fails_the_step_clearly(tmp_path):
    home = tmp_path / "home"
    (home / "wheels").mkdir(parents=True)
    done = run_venv_step(home, offline=True, pip_env={})
    assert done.returncode == 1
    assert f"FAILED: expected one herd-{VERSION}-*.whl in {home}/wheels, found 0" in done.stderr
    first = make_wheel(home / "wheels", "herd", VERSION, "bundle")
    first.rename(home / "wheels" / f"herd-{VERSION}-0-py3-none-any.whl")   # a build tag: another file
    make_wheel(home / "wheels", "herd", VERSION, "bundle")
    done = run_venv_step(home, offline=True, pip_env={})
    assert done.returncode == 1 and "found 2" in done.stderr
