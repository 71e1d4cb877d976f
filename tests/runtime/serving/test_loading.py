"""Each tensor-parallel rank loads only its share: measured on real ranks, equal to the planner's
per-device weight prediction (the heaviest rank exactly; all ranks together hold the model once plus
the replicated norms). Disk reads per rank are measured with the file evicted first, and reported."""
import os

import httpx
import pytest
from safetensors import safe_open

from runtime.planning.architecture import Architecture
from runtime.planning.planner import Hardware, PlanRequest, weights_per_device
from runtime.planning import catalog

pytestmark = pytest.mark.slow


def checkpoint_bytes(directory, only=lambda name: True) -> int:
    """Tensor bytes as the checkpoint files themselves describe them (shape x dtype per tensor)."""
    size = {"F32": 4, "BF16": 2, "F16": 2}
    total = 0
    for f in directory.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for name in st.keys():
                if only(name):
                    part = st.get_slice(name)
                    numel = 1
                    for dim in part.get_shape():
                        numel *= dim
                    total += numel * size[part.get_dtype()]
    return total


def evict(directory):
    for f in directory.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@pytest.mark.timeout(240)   # a `herd serve` start: 40-60 s on 2 shared cores; wait_ready allows 120 s
@pytest.mark.parametrize("tp", [1, 2])
def test_each_rank_holds_exactly_the_planned_share(tiny_model, serve, tp):
    arch = Architecture.from_config_json(tiny_model / "config.json")
    req = PlanRequest(architecture=arch, hardware=Hardware(catalog.accelerator("cpu"), tp), dtype="float32")
    planned, _ = weights_per_device(arch, req, tp, 1)
    evict(tiny_model)
    srv = serve("--model-dir", str(tiny_model), "--tp", str(tp), "--served-model-name", "tiny",
                name=f"tp{tp}")
    srv.wait_ready()
    loads = httpx.get(f"{srv.url}/health/ready").json()["rank_loads"]
    assert sorted(l["rank"] for l in loads) == list(range(tp))
    assert {l["dtype"] for l in loads} == {"float32"}   # dtype auto on an fp32 checkpoint, as each rank resolved it
    file_bytes = sum(f.stat().st_size for f in tiny_model.glob("*.safetensors"))
    assert max(l["shard_bytes"] for l in loads) == planned
    # Together the ranks hold the checkpoint once, plus one copy of the replicated norms per extra rank
    # (both counted from the safetensors file, not from herd's architecture arithmetic).
    norms = checkpoint_bytes(tiny_model, only=lambda name: "norm" in name)
    assert norms == (2 * arch.num_hidden_layers + 1) * arch.hidden_size * 4   # 2 per layer + the final one
    assert sum(l["shard_bytes"] for l in loads) == checkpoint_bytes(tiny_model) + (tp - 1) * norms
    # Disk reads are reported, not bounded: ranks on one host share the page cache, and the count
    # includes modules imported while loading. The share itself is exact above.
    print(f"TP {tp}: planned {planned} B/rank; per rank read from disk:",
          [l["disk_read_bytes"] for l in loads], f"of a {file_bytes} B checkpoint")
