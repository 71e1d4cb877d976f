"""The engine's decode loop reproduces `generate` exactly (fp32): alone, in a padded batch, and when
rows join and leave a running batch (continuous batching)."""
import pytest
import torch

from runtime.engine.decode import CANCELLED, ERROR, LENGTH, STOP, Row, decode_batch
from runtime.engine.sampling import choose, make_generator


@pytest.fixture(scope="module")
def model(tiny_model):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def reference(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


P1, P2, P3 = [5, 17, 99, 3, 42, 7], [11, 200, 8], [300]


def test_greedy_equals_generate_alone_and_batched(model):
    refs = {"a": reference(model, P1, 12), "b": reference(model, P2, 9), "c": reference(model, P3, 20)}
    batched = decode_batch(model, [Row(P1, 12, id="a"), Row(P2, 9, id="b"), Row(P3, 20, id="c")])
    assert batched == refs
    assert decode_batch(model, [Row(P1, 12, id="a")]) == {"a": refs["a"]}


def test_rows_joining_a_running_batch_get_the_tokens_they_would_get_alone(model):
    refs = {"a": reference(model, P1, 30), "b": reference(model, P2, 10), "c": reference(model, P3, 25),
            "d": reference(model, P1 + P2, 5)}
    out = decode_batch(model, [Row(P1, 30, id="a")],
                       arrivals={3: [Row(P2, 10, id="b")], 7: [Row(P3, 25, id="c"), Row(P1 + P2, 5, id="d")]})
    assert out == refs


def test_rows_stop_at_their_own_stop_token_or_length(model):
    ref = reference(model, P2, 10)
    stop_at = ref[3]
    events = []
    out = decode_batch(model, [Row(P2, 10, stop_token_ids=[stop_at], id="a"), Row(P2, 4, id="b")],
                       on_step=lambda ev: events.extend(ev) or set())
    assert out["a"] == ref[:ref.index(stop_at) + 1]
    assert out["b"] == ref[:4]
    finals = {(row_id, s) for row_id, _, s, _ in events if s != 0}
    assert ("a", STOP) in finals and ("b", LENGTH) in finals


def test_cancelled_row_stops_and_the_others_continue(model):
    ref = reference(model, P2, 8)
    steps = []

    def on_step(events):
        steps.append(events)
        return {"a"} if len(steps) == 2 else set()
    out = decode_batch(model, [Row(P2, 8, id="a"), Row(P2, 8, id="b")], on_step=on_step)
    assert out["a"] == ref[:2] and out["b"] == ref
    assert any(row_id == "a" and s == CANCELLED for ev in steps for row_id, _, s, _ in ev)


def test_sampling_is_reproducible_with_a_seed_and_top_p_narrows():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0])
    a = [choose(logits, 1.0, 1.0, g) for g in [make_generator(7)] for _ in range(20)]
    b = [choose(logits, 1.0, 1.0, g) for g in [make_generator(7)] for _ in range(20)]
    assert a == b and len(set(a)) > 1
    narrow = {choose(logits, 1.0, 0.5, make_generator(s)) for s in range(50)}
    assert narrow == {0}  # token 0 alone holds more than half the mass
    assert choose(logits, 0.0, 1.0, make_generator(1)) == 0


def test_static_cache_decode_equals_generate_and_batches_run_to_their_end(model):
    from runtime.engine.static_batch import StaticBatch
    refs = {"a": reference(model, P1, 12), "b": reference(model, P2, 9), "c": reference(model, P3, 6)}
    static = StaticBatch(model, max_len=64, compile_decode=False)
    out = decode_batch(model, [Row(P1, 12, id="a"), Row(P2, 9, id="b")], arrivals={2: [Row(P3, 6, id="c")]},
                       batch=static)
    assert out == refs  # "c" waited for the first static batch to end, then ran alone


def test_a_static_batch_stepping_ahead_of_the_host_decodes_what_the_plain_loop_decodes(model):
    """overlap: the next step is queued with the device's chosen ids before the host reads them (how
    a compiled static batch runs on GPUs). Same tokens, stops, cancellations, logprobs and seeded
    samples as the loop that waits; a row filling the cache to its last position still fits."""
    from runtime.engine.static_batch import StaticBatch

    def run(overlap, rows, arrivals=None, max_len=64, cancel_at=None):
        events = []

        def on_step(ev):
            events.append(ev)
            return {"b"} if cancel_at is not None and len(events) == cancel_at else set()
        static = StaticBatch(model, max_len=max_len, compile_decode=False)
        out = decode_batch(model, rows(), arrivals=arrivals() if arrivals else None, batch=static,
                           on_step=on_step, overlap=overlap)
        return out, [e for ev in events for e in ev]

    ref = reference(model, P2, 10)
    rows = lambda: [Row(P1, 12, id="a", logprobs=2), Row(P2, 10, stop_token_ids=[ref[3]], id="b"),  # noqa: E731
                    Row(P3, 9, temperature=0.9, top_p=0.8, seed=11, id="s")]
    later = lambda: {2: [Row(P2, 5, id="c")]}  # noqa: E731
    plain, plain_events = run(False, rows, later)
    ahead, ahead_events = run(True, rows, later)
    assert ahead == plain and ahead_events == plain_events
    assert ahead["b"] == ref[:4] and ahead["c"] == ref[:5]
    assert run(True, rows, cancel_at=2) == run(False, rows, cancel_at=2)
    full = lambda: [Row(list(range(5, 45)), 8, id="f")]  # noqa: E731   40 + 8 = the whole cache
    assert run(True, full, max_len=48)[0] == {"f": reference(model, list(range(5, 45)), 8)}


def test_static_cache_refuses_a_request_longer_than_the_cache(model):
    from runtime.engine.static_batch import StaticBatch
    with pytest.raises(ValueError, match="static cache"):
        StaticBatch(model, max_len=8, compile_decode=False).join([Row(P1, 10, id="a")])


def test_static_batch_admission_never_raises_on_rows_that_each_fit(model):
    """A long prompt and a long max_tokens each fit the cache but not together: the second row waits
    for the next static batch instead of failing the batch (or the group)."""
    from runtime.engine.static_batch import StaticBatch
    long_prompt = list(range(5, 45))                      # 40 tokens
    refs = {"p": reference(model, long_prompt, 4), "m": reference(model, P2, 40)}
    static = StaticBatch(model, max_len=48, compile_decode=False)
    out = decode_batch(model, [Row(long_prompt, 4, id="p"), Row(P2, 40, id="m")], batch=static)
    assert out == refs


def test_rows_the_engine_cannot_run_fail_alone(model):
    """An empty prompt or an out-of-vocabulary id is that row's error; the other rows decode as usual."""
    events = []
    vocab = model.config.vocab_size
    out = decode_batch(model, [Row([], 5, id="empty"), Row(P1, 6, id="ok"), Row([vocab + 7], 5, id="oov"),
                               Row(P2, 4, logit_bias=[(vocab, 5.0)], id="bias")],
                       on_step=lambda ev: events.extend(ev) or set())
    assert out["ok"] == reference(model, P1, 6)
    errors = {row_id: why for row_id, _, state, why in events if state == ERROR}
    assert set(errors) == {"empty", "oov", "bias"}
    assert "empty prompt" in errors["empty"] and "outside" in errors["oov"]


def test_logit_bias_and_penalties_steer_sampling(model):
    greedy = reference(model, P1, 8)
    banned = decode_batch(model, [Row(P1, 8, logit_bias=[(greedy[0], -100.0)], id="a")])["a"]
    assert banned[0] != greedy[0]                        # -100 removes the greedy choice
    forced = decode_batch(model, [Row(P1, 8, logit_bias=[(42, 100.0)], id="a")])["a"]
    assert forced == [42] * 8                             # +100 makes it the only choice
    spread = float(model(input_ids=torch.tensor([P1])).logits[0, -1].detach().abs().max())
    bias = spread * 2 + 1                                 # wins alone; loses after a few uses at 2 per use
    repeated = decode_batch(model, [Row(P1, 8, logit_bias=[(42, bias)], frequency_penalty=2.0, id="a")])["a"]
    assert repeated[0] == 42 and 1 <= repeated.count(42) < 8   # each use of 42 costs 2: others win in turn
    once = decode_batch(model, [Row(P1, 8, logit_bias=[(42, bias + 2)], presence_penalty=2.0, id="a")])["a"]
    assert once == [42] * 8                               # presence costs 2 once, whatever the count
