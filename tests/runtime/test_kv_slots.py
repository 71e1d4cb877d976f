"""Continuous batching without copying the KV cache: a decode step writes its column in place, joining
rows go into free slots (shorter or longer prompts alike), and the tokens stay `generate`'s."""
import pytest
import torch

from runtime.engine.decode import RunningBatch, Row
from runtime.engine.kv_slots import SlotLayer


@pytest.fixture(scope="module")
def model(tiny_model):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def pointers(batch):
    return [(layer._k.data_ptr(), layer._v.data_ptr()) for layer in batch.cache.layers]


@torch.inference_mode()
def test_steps_and_joins_write_in_place(model):
    batch = RunningBatch(model)
    batch.join([Row([5, 17, 99, 3, 42, 7], 20, id="a"), Row([1, 2, 3], 20, id="x"), Row([4], 20, id="y")])
    assert all(isinstance(layer, SlotLayer) for layer in batch.cache.layers)
    batch.keep([0])                                       # two rows leave: two free slots
    first = pointers(batch)
    before = batch.cache.layers[0].keys.clone()
    for token in (11, 12, 13):
        batch.step([token])
    assert pointers(batch) == first                       # three decode steps, no reallocation
    batch.join([Row([8, 9], 5, id="b")])                  # shorter than the batch's context
    batch.join([Row(list(range(20, 40)), 5, id="c")])     # longer: columns open on the left
    assert pointers(batch) == first                       # both joins wrote into the same buffers
    layer = batch.cache.layers[0]
    assert layer.keys.shape[0] == 3 and layer.keys.shape[-2] == 20 == batch.mask.shape[1]
    # The first row's cached keys are where they were, now right-aligned under the longer context.
    assert torch.equal(layer.keys[0, :, -(before.shape[-2] + 3):-3], before[0])
    assert torch.all(layer.keys[1, :, :-2] == 0)           # padding is zeroed, so it stays finite


@torch.inference_mode()
def test_rows_leaving_keep_the_others_and_drop_shared_padding(model):
    batch = RunningBatch(model)
    batch.join([Row([5, 17, 99, 3, 42, 7], 20, id="a"), Row([8, 9], 20, id="b")])
    batch.step([1, 2])
    kept = batch.cache.layers[0].keys[1].clone()
    batch.keep([1])                                        # "a" leaves: only "b" (2 + 1 tokens) remains
    layer = batch.cache.layers[0]
    assert layer.keys.shape[0] == 1 and layer.keys.shape[-2] == 3 == batch.mask.shape[1]
    assert torch.equal(layer.keys[0], kept[:, -3:])
