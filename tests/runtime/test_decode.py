"""The lockstep decode loop reproduces `generate` exactly (fp32), alone and in a padded batch."""
import pytest
import torch

from runtime.engine.decode import CANCELLED, LENGTH, STOP, Row, decode_batch
from runtime.engine.sampling import choose, make_generator


@pytest.fixture(scope="module")
def model(tiny_model):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def reference(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def alone(rows, model, **kw):
    return decode_batch(model, rows, is_driver=True, share=lambda t: None, **kw)


def test_greedy_equals_generate_alone_and_batched(model):
    p1, p2, p3 = [5, 17, 99, 3, 42, 7], [11, 200, 8], [300]
    refs = [reference(model, p, n) for p, n in ((p1, 12), (p2, 9), (p3, 20))]
    batched = alone([Row("a", p1, 12), Row("b", p2, 9), Row("c", p3, 20)], model)
    assert batched == refs
    assert alone([Row("a", p1, 12)], model) == [refs[0]]


def test_rows_stop_at_their_own_stop_token_or_length(model):
    p = [5, 17, 99]
    ref = reference(model, p, 10)
    stop_at = ref[3]
    events = []
    out = alone([Row("a", p, 10, stop_token_ids=[stop_at]), Row("b", p, 4)], model,
                on_step=lambda ev: events.extend(ev) or set())
    assert out[0] == ref[:ref.index(stop_at) + 1]
    assert out[1] == ref[:4]
    finals = {(i, s) for i, _, s in events if s != 0}
    assert (0, STOP) in finals and (1, LENGTH) in finals


def test_cancelled_row_stops_and_the_others_continue(model):
    p = [5, 17, 99]
    ref = reference(model, p, 8)
    steps = []

    def on_step(events):
        steps.append(events)
        return {"a"} if len(steps) == 2 else set()
    out = alone([Row("a", p, 8), Row("b", p, 8)], model, on_step=on_step)
    assert out[0] == ref[:2] and out[1] == ref
    assert any(i == 0 and s == CANCELLED for ev in steps for i, _, s in ev)


def test_sampling_is_reproducible_with_a_seed_and_top_p_narrows():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0])
    a = [choose(logits, 1.0, 1.0, g) for g in [make_generator(7)] for _ in range(20)]
    b = [choose(logits, 1.0, 1.0, g) for g in [make_generator(7)] for _ in range(20)]
    assert a == b and len(set(a)) > 1
    narrow = {choose(logits, 1.0, 0.5, make_generator(s)) for s in range(50)}
    assert narrow == {0}  # token 0 alone holds more than half the mass
    assert choose(logits, 0.0, 1.0, make_generator(1)) == 0
