"""Fused projections (runtime/engine/fused.py): the fused model is the same function as the checkpoint
it was built from (fp32: identical tokens), alone, in a static batch and sharded over two ranks."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from runtime.engine import fused
from runtime.engine.decode import Row, decode_batch
from runtime.engine.static_batch import StaticBatch

from tests.conftest import ROOT
from tests.runtime.tp_decode import rows


@pytest.fixture(scope="module")
def models(tiny_model):
    from transformers import AutoModelForCausalLM
    plain = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    fused_model = copy.deepcopy(plain)
    count = fused.fuse_projections(fused_model)
    return plain, fused_model, count


def test_every_layer_gets_one_qkv_and_one_gate_up_matrix_holding_the_same_weights(models):
    plain, fused_model, count = models
    layers = plain.config.num_hidden_layers
    assert count == 2 * layers
    names = {name.rsplit(".", 1)[-1] for name, _ in fused_model.named_modules()}
    assert {"qkv_proj", "gate_up_proj"} <= names and not names & {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    attn, mlp = plain.model.layers[0].self_attn, plain.model.layers[0].mlp
    fused_attn, fused_mlp = fused_model.model.layers[0].self_attn, fused_model.model.layers[0].mlp
    assert torch.equal(fused_attn.qkv_proj.weight, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
    assert torch.equal(fused_mlp.gate_up_proj.weight, torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
    # Nothing kept twice: the separate matrices are gone.
    assert sum(p.numel() for p in fused_model.parameters()) == sum(p.numel() for p in plain.parameters())
    assert fused.fuse_projections(fused_model) == 0          # a fused model is left alone


def test_the_fused_model_computes_the_same_logits_and_decodes_the_same_tokens(models):
    plain, fused_model, _ = models
    ids = torch.tensor([[5, 17, 99, 3, 42, 7], [0, 0, 11, 200, 8, 9]])
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    with torch.inference_mode():
        torch.testing.assert_close(fused_model(ids, attention_mask=mask).logits,
                                   plain(ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)
    expected = decode_batch(plain, rows())
    assert decode_batch(fused_model, rows()) == expected
    assert decode_batch(fused_model, rows(), batch=StaticBatch(fused_model, max_len=64)) == expected
    joined = decode_batch(fused_model, [Row([5, 17, 99], 8, id="a")], arrivals={2: [Row([300, 4], 6, id="b")]})
    assert joined == decode_batch(plain, [Row([5, 17, 99], 8, id="a")], arrivals={2: [Row([300, 4], 6, id="b")]})


def test_fused_where_decode_is_bandwidth_bound_unless_told(monkeypatch):
    monkeypatch.delenv("HERD_FUSE_PROJECTIONS", raising=False)
    assert fused.wanted("cuda:0") and not fused.wanted("cpu")
    monkeypatch.setenv("HERD_FUSE_PROJECTIONS", "1")
    assert fused.wanted("cpu")
    monkeypatch.setenv("HERD_FUSE_PROJECTIONS", "0")
    assert not fused.wanted("cuda:1")


@pytest.mark.slow
@pytest.mark.timeout(300)   # two torchrun ranks: ~20 s here
def test_two_ranks_fuse_their_own_shards_and_decode_what_one_unfused_process_decodes(models, tiny_model, tmp_path):
    plain, _, _ = models
    out = tmp_path / "tp2-fused.json"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--standalone", "tests/runtime/tp_decode.py", str(tiny_model), str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "HERD_DEVICE": "cpu", "OMP_NUM_THREADS": "1",
                               "HERD_FUSE_PROJECTIONS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["fused"] == ["gate_up_proj", "qkv_proj"]
    assert result["tokens"] == decode_batch(plain, rows())   # greedy and seeded sampling alike (fp32)
