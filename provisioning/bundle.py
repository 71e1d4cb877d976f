"""What a host installs herd from, built here once per source version and cached.

Two shapes: the full wheel bundle (herd and every runtime dependency, for on-prem hosts that cannot
reach a package index) and the node bundle (the steps, herd's own wheel, the dependency locks and the
environment file, one tar.gz a cloud node downloads at boot; the node installs exactly what the locks
pin, each file checked against its sha256, from its package index).

Either way the 50-venv step installs herd from the file `herd-VERSION-*.whl` by its path (install_herd
in steps/common.sh), never as the requirement `herd==VERSION`: that name on the public index belongs
to an unrelated project. `herd_wheel_in` is the same contract on this side: exactly one such file.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from rich.console import Console

from provisioning.steps import STEPS_DIR, herd_version
from runtime.errors import UserError
from runtime.paths import cache_root

ROOT = Path(__file__).resolve().parent.parent
# `make lock` writes them; the 50-venv and 55-vllm steps read them under these names in wheels/.
LOCKS = {"node-lock.txt": Path(__file__).resolve().parent / "locks" / "node.txt",
         "vllm-lock.txt": Path(__file__).resolve().parent / "locks" / "vllm.txt",
         "vllm-cpu-lock.txt": Path(__file__).resolve().parent / "locks" / "vllm-cpu.txt",
         "vllm-tpu-lock.txt": Path(__file__).resolve().parent / "locks" / "vllm-tpu.txt"}


def source_digest() -> str:
    """Changes whenever herd's code, steps or catalog change: a new bundle is built then."""
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes())
    for package in ("runtime", "provisioning", "infra"):
        for path in sorted((ROOT / package).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                digest.update(path.relative_to(ROOT).as_posix().encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _pip_wheel(dest: Path, console: Console, what: str, *extra: str) -> Path:
    """`pip wheel` into a cached directory, atomically (a half-built bundle is never reused). Bundles of
    older sources (hundreds of MB each) are removed once the new one is complete."""
    if (dest / ".complete").exists():
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    subprocess.run(["rm", "-rf", str(tmp)], check=True)
    with console.status(f"bundle: building {what} (once per herd version)"):
        done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
                               *extra, "--wheel-dir", str(tmp), str(ROOT)], capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"bundle: pip wheel failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    (tmp / ".complete").write_text("ok")
    subprocess.run(["rm", "-rf", str(dest)], check=True)
    tmp.rename(dest)
    kind = dest.name.rsplit("-", 1)[0] + "-"
    stale = [p for p in dest.parent.glob(kind + "*") if p != dest and p.is_dir() and not p.name.endswith(".tmp")]
    subprocess.run(["rm", "-rf", *map(str, stale)], check=True)
    return dest


def herd_wheel_in(wheels: Path) -> Path:
    """The one wheel of this herd version in a bundle folder (the file the 50-venv step installs)."""
    found = sorted(wheels.glob(f"herd-{herd_version()}-*.whl"))
    if len(found) != 1:
        raise UserError(f"bundle: {wheels}: expected one herd-{herd_version()}-*.whl, found {len(found)} "
                        f"({', '.join(p.name for p in found) or 'none'})")
    return found[0]


def wheel_bundle(console: Console) -> Path:
    """herd's wheel and every runtime dependency as wheels, so hosts install with --no-index."""
    name = f"herd-{herd_version()}-{source_digest()}"
    bundle = _pip_wheel(cache_root() / "bundles" / name, console, "herd's wheel and its dependencies")
    herd_wheel_in(bundle)
    for lock_name, lock in LOCKS.items():   # vLLM on an on-prem GPU host installs from its lock
        if not (bundle / lock_name).exists():
            (bundle / lock_name).write_bytes(lock.read_bytes())
    return bundle


def vllm_bundle(build: str, console: Console) -> Path:
    """vLLM's wheels for hosts that reach no package index (on-prem): every file its lock pins for the
    `build` the hosts run ("gpu" or "cpu"), downloaded here once per lock in pip's hash-checking mode.
    The 55-vllm step installs from them with --no-index and checks every hash again, so a copy altered on
    the way is refused there. Like the wheel bundle, for hosts of this machine's platform and Python."""
    lock = LOCKS["vllm-lock.txt" if build == "gpu" else "vllm-cpu-lock.txt"]
    dest = cache_root() / "bundles" / f"vllm-{build}-{hashlib.sha256(lock.read_bytes()).hexdigest()[:12]}"
    if (dest / ".complete").exists():
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    subprocess.run(["rm", "-rf", str(tmp)], check=True)
    with console.status(f"bundle: downloading vLLM's {build} build, every file {lock.name} pins (about 1 GB "
                        "for the CPU build; once per lock)"):
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                               "--no-deps", "--require-hashes", "--prefer-binary", "-r", str(lock), "-d", str(tmp)],
                              capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"bundle: downloading vLLM's wheels ({lock.name}) failed: "
                        f"{(done.stderr.strip().splitlines() or ['?'])[-1]}")
    (tmp / ".complete").write_text("ok")
    subprocess.run(["rm", "-rf", str(dest)], check=True)
    tmp.rename(dest)
    stale = [p for p in dest.parent.glob(f"vllm-{build}-*") if p != dest and p.is_dir() and not p.name.endswith(".tmp")]
    subprocess.run(["rm", "-rf", *map(str, stale)], check=True)
    return dest


def herd_wheel(console: Console) -> Path:
    """herd's own wheel (no dependencies): what a cloud node cannot get from a package index."""
    wheels = _pip_wheel(cache_root() / "bundles" / f"herd-only-{herd_version()}-{source_digest()}", console,
                        "herd's wheel", "--no-deps")
    return herd_wheel_in(wheels)


def node_bundle(env_path: Path, console: Console) -> Path:
    """steps/*.sh + wheels/herd-*.whl + wheels/*-lock.txt + environment.yaml as one tar.gz, named by its
    content."""
    wheel = herd_wheel(console)
    members = [(f"steps/{p.name}", p.read_bytes()) for p in sorted(STEPS_DIR.glob("*.sh"))]
    members += [(f"wheels/{wheel.name}", wheel.read_bytes())]
    members += [(f"wheels/{name}", lock.read_bytes()) for name, lock in LOCKS.items()]
    members += [("environment.yaml", env_path.read_bytes())]
    digest = hashlib.sha256()
    for name, data in members:
        digest.update(name.encode() + b"\0" + data)
    out = cache_root() / "bundles" / f"node-{digest.hexdigest()[:16]}.tar.gz"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    # Fixed mtimes and modes: the same content gives the same bytes, so Pulumi sees no change.
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            info.mode = 0o755 if name.endswith(".sh") else 0o644
            tar.addfile(info, io.BytesIO(data))
    tmp = out.with_suffix(".partial")
    tmp.write_bytes(buffer.getvalue())
    tmp.rename(out)
    week_ago = time.time() - 7 * 86400   # small files, one per environment and source version
    for old in out.parent.glob("node-*.tar.gz"):
        if old.stat().st_mtime < week_ago:
            old.unlink(missing_ok=True)
    return out
