"""Run under torchrun: every rank loads its shard where `place` puts it (CPU + gloo, or its GPU + NCCL),
the driver (rank 0) decodes a fixed set of rows with the engine's lockstep loop, and writes the tokens
as JSON. Used by the tensor-parallel tests on CPU and on GPUs.

    torchrun --nproc-per-node N tests/runtime/tp_decode.py MODEL_DIR OUT.json [static]
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from runtime.engine.decode import Row, decode_batch, run_engine  # noqa: E402
from runtime.engine.worker import load_model, place, sharing  # noqa: E402

PROMPTS = {"a": [5, 17, 99, 3, 42, 7], "b": [11, 200, 8], "c": [300]}


def rows() -> list[Row]:
    return [Row(PROMPTS["a"], 12, id="a"), Row(PROMPTS["b"], 9, id="b"),
            Row(PROMPTS["c"], 16, id="c", temperature=0.8, top_p=0.9, seed=3)]


def main() -> int:
    model_dir, out = sys.argv[1], Path(sys.argv[2])
    static = len(sys.argv) > 3 and sys.argv[3] == "static"
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    placement, control = place(int(os.environ["LOCAL_RANK"]), world)
    model = load_model(model_dir, torch.float32, world, placement.device)
    share, share_object = sharing(world, 0, control)
    batch = None
    if static:
        from runtime.engine.static_batch import StaticBatch
        batch = StaticBatch(model, max_len=64)
    if rank == 0:
        produced = decode_batch(model, rows(), batch=batch, share=share, share_object=share_object)
        out.write_text(json.dumps({"device": placement.device, "backend": placement.backend,
                                   "fused": sorted({name.rsplit(".", 1)[-1] for name, _ in model.named_modules()
                                                    if name.endswith(("qkv_proj", "gate_up_proj"))}),
                                   "tokens": produced}))
    else:
        run_engine(model, is_driver=False, share=share, share_object=share_object, max_batch=len(rows()),
                   batch=batch)
    if world > 1:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
