"""Where each rank computes and which collectives it uses is decided by one function; these cases are
the GPU wiring, guarded on CPU. The lockstep loop then runs across two real ranks (torchrun, gloo)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from runtime.engine.decode import Row, decode_batch
from runtime.engine.placement import PlacementError, place_rank

from tests.conftest import ROOT


@pytest.mark.parametrize("devices,local_rank,world,want,device,backend", [
    (0, 0, 1, "auto", "cpu", "gloo"),
    (0, 2, 3, "auto", "cpu", "gloo"),
    (8, 0, 1, "auto", "cuda:0", "nccl"),
    (8, 5, 16, "auto", "cuda:5", "nccl"),      # second node of a 16-GPU group: its own local device
    (2, 1, 2, "cuda", "cuda:1", "nccl"),
    (8, 3, 8, "cpu", "cpu", "gloo"),            # asked for CPU on a GPU host
])
def test_each_rank_gets_its_local_device_and_backend(devices, local_rank, world, want, device, backend):
    placement = place_rank(cuda_devices=devices, local_rank=local_rank, world=world, want=want)
    assert (placement.device, placement.backend) == (device, backend)
    assert placement.control_backend == "gloo"   # host payloads never go through NCCL
    assert placement.on_cuda == device.startswith("cuda")


@pytest.mark.parametrize("devices,local_rank,want,says", [
    (0, 0, "cuda", "no CUDA device"),
    (4, 4, "auto", "LOCAL_RANK=4: this host has 4 CUDA device"),
    (8, 0, "tpu", "HERD_DEVICE='tpu': allowed values are auto, cuda, cpu"),
])
def test_a_rank_that_cannot_be_placed_is_refused_with_the_reason(devices, local_rank, want, says):
    with pytest.raises(PlacementError, match=says):
        place_rank(cuda_devices=devices, local_rank=local_rank, world=8, want=want)


@pytest.mark.slow
@pytest.mark.timeout(300)   # two torchrun ranks: ~10 s here
def test_two_cpu_ranks_decode_what_one_process_decodes(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.runtime.tp_decode import rows
    out = tmp_path / "tp2.json"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--standalone", "tests/runtime/tp_decode.py", str(tiny_model), str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "HERD_DEVICE": "cpu", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert (result["device"], result["backend"]) == ("cpu", "gloo")
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    alone = decode_batch(model, rows())
    assert result["tokens"] == alone   # greedy rows and the seeded sampled row alike (fp32)
