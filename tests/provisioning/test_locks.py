"""The cloud nodes' dependency locks (provisioning/locks, written by `make lock`) stay true to what herd
asks for: every base requirement pinned at a version its specifier admits, every pin with hashes,
nothing named herd, vLLM at the version the runtime pins, and both locks in the node bundle."""
import re
import tarfile
import tomllib
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from rich.console import Console

from provisioning.bundle import LOCKS, node_bundle
from runtime.engine.vllm import VLLM_CPU_VERSION, VLLM_TPU_VERSION, VLLM_VERSION

ROOT = Path(__file__).resolve().parents[2]
# The GPU nodes herd provisions: Linux x86_64 with CPython 3.11 or 3.12.
NODES = [{"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
          "implementation_name": "cpython", "platform_python_implementation": "CPython",
          "python_version": v, "python_full_version": f"{v}.0"} for v in ("3.11", "3.12")]


def pins(lock: Path) -> list[tuple[str, Version, Marker | None, list[str]]]:
    """(name, version, marker, sha256 hashes) per requirement of a hash-pinned requirements file."""
    entries = []
    for block in re.split(r"\n(?=\S)", lock.read_text()):
        first = block.splitlines()[0]
        if first.startswith("#") or not first.strip():
            continue
        spec = first.rstrip(" \\")
        name, _, rest = spec.partition("==")
        version, _, marker = rest.partition(";")
        entries.append((canonicalize_name(name.strip()), Version(version.strip()),
                        Marker(marker.strip()) if marker.strip() else None,
                        re.findall(r"--hash=sha256:([0-9a-f]{64})", block)))
    return entries


def on_node(entries, node: dict) -> dict[str, Version]:
    return {name: version for name, version, marker, _ in entries if marker is None or marker.evaluate(node)}


def test_every_base_requirement_is_pinned_within_its_specifier_for_every_node_python():
    requirements = [Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
                    ["dependencies"]]
    entries = pins(LOCKS["node-lock.txt"])
    for node in NODES:
        locked = on_node(entries, node)
        for req in requirements:
            if req.marker and not req.marker.evaluate(node):
                continue
            name = canonicalize_name(req.name)
            assert name in locked, f"{req} is not in provisioning/locks/node.txt: run `make lock`"
            assert req.specifier.contains(locked[name], prereleases=True), \
                f"node.txt pins {name}=={locked[name]}, pyproject asks {req}: run `make lock`"


def test_every_pin_carries_hashes_and_nothing_is_named_herd():
    for lock in LOCKS.values():
        entries = pins(lock)
        assert len(entries) > 20, lock
        for name, version, _, hashes in entries:
            assert hashes, f"{lock.name}: {name}=={version} has no --hash"
            assert name != "herd", "the public index's `herd` is another project; herd comes by wheel path"
        assert len({(n, str(m)) for n, _, m, _ in entries}) == len(entries), f"{lock.name}: a name pinned twice"


def test_the_vllm_lock_pins_the_runtime_s_vllm_and_its_own_torch():
    locked = on_node(pins(LOCKS["vllm-lock.txt"]), NODES[0])
    assert locked["vllm"] == Version(VLLM_VERSION)
    assert "torch" in locked      # vLLM's torch (not herd's pin): why vLLM has a venv of its own


def test_the_vllm_cpu_lock_pins_the_cpu_build_its_cpu_torch_and_no_cuda_linked_extras():
    """The CPU build's torch is the +cpu wheel; PyPI's torchvision/torchaudio/torchcodec are linked against
    CUDA's libraries and break transformers' import beside a CPU torch, so the lock leaves them out."""
    locked = on_node(pins(LOCKS["vllm-cpu-lock.txt"]), NODES[0])
    assert locked["vllm-cpu"] == Version(VLLM_CPU_VERSION)
    assert locked["torch"] == Version("2.13.0+cpu")
    assert not {"torchvision", "torchaudio", "torchcodec", "vllm"} & set(locked)


def test_the_vllm_tpu_lock_pins_the_tpu_build_with_tpu_inference_for_python_3_12():
    """vLLM's TPU build runs its model code through tpu-inference (JAX, libtpu); jax 0.11 needs Python 3.12."""
    node = {**NODES[1], "python_version": "3.12"}
    locked = on_node(pins(LOCKS["vllm-tpu-lock.txt"]), node)
    assert locked["vllm-tpu"] == Version(VLLM_TPU_VERSION) and locked["tpu-inference"] == Version(VLLM_TPU_VERSION)
    assert {"jax", "jaxlib", "libtpu", "ray"} <= set(locked) and "vllm" not in locked


def test_the_node_bundle_carries_every_lock_byte_for_byte():
    bundle = node_bundle(ROOT / "environments" / "aws-p5-405b-fp8.yaml", Console(quiet=True))
    with tarfile.open(bundle) as tar:
        for name, lock in LOCKS.items():
            assert tar.extractfile(f"wheels/{name}").read() == lock.read_bytes()
