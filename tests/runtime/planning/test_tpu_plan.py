"""Planning on Cloud TPU slices: a slice comes whole (every host serves, one pipeline stage per host,
tensor parallel over the chips of a host), memory is per chip, FP8 does not exist there, and what
does not fit is answered with the TPU slices that do."""
import pytest

from runtime.planning import catalog
from runtime.planning.plan_spec import request_from_spec
from runtime.planning.planner import Hardware, PlanRequest, plan
from runtime.planning.spec import load_spec
from runtime.errors import UserError
from tests.conftest import ROOT

GIB = 2**30


def on(slice_id: str, model: str, quantization: str = "none", context: int = 8192, concurrency: int = 4,
       prefill: int = 2048, **kw):
    return plan(PlanRequest(architecture=catalog.model(model).architecture, hardware=Hardware.from_instance(slice_id),
                            model_id=model, quantization=quantization, max_model_len=context, concurrency=concurrency,
                            max_prefill_tokens=prefill, engine="vllm", **kw))


@pytest.mark.parametrize("slice_id, model, quantization, fits, tp, pp", [
    # 405B in BF16 is ~812 GB of weights: 16 chips x 32 GiB cannot hold it, 32 can.
    ("v6e-16", "llama-3.1-405b-instruct", "none", False, 4, 4),
    ("v6e-32", "llama-3.1-405b-instruct", "none", True, 4, 8),
    # In int8 (~406 GB) one v6e-16 holds it: Google's own 405B serving recipe is a v6e-16 with int8.
    ("v6e-16", "llama-3.1-405b-instruct", "int8", True, 4, 4),
    ("v6e-8", "llama-3.1-70b-instruct", "none", True, 8, 1),
    ("v5e-4", "llama-3.1-8b-instruct", "none", True, 4, 1),
    ("v6e-1", "llama-3.1-8b-instruct", "none", True, 1, 1),
    ("v5e-1", "llama-3.1-8b-instruct", "none", False, 1, 1),     # 16 GB of weights on a 16 GiB chip
])
def test_known_answers(slice_id, model, quantization, fits, tp, pp):
    result = on(slice_id, model, quantization)
    assert (result.fits, result.tensor_parallel, result.pipeline_parallel) == (fits, tp, pp), result.reasons
    inst = catalog.instance(slice_id)
    assert result.nodes == inst.hosts and result.gpus_per_node == inst.gpus
    assert result.per_gpu_bytes.capacity == int(catalog.accelerator(inst.accelerator).memory_bytes * 0.9)
    # The cost is the whole slice's: every host of it, at chips x the per-chip price.
    assert result.cost_usd_per_hour == pytest.approx(inst.price_usd_per_hour * inst.hosts)
    assert any("XLA" in note and "an estimate no TPU run has calibrated" in note for note in result.notes)


def test_a_refusal_says_it_in_numbers_and_suggests_tpu_slices_that_fit():
    result = on("v6e-16", "llama-3.1-405b-instruct")
    [reason] = result.reasons
    assert reason.startswith("per-TPU chip memory: weights 48.5 GiB") and "> 28.8 GiB (32.0 GiB x 0.90)" in reason
    assert result.suggestions and all(catalog.accelerator(catalog.instance(s.instance).accelerator).is_tpu
                                      for s in result.suggestions)
    assert all(s.quantization != "fp8" for s in result.suggestions)
    costs = [s.cost_usd_per_hour for s in result.suggestions]
    assert costs == sorted(costs)
    # The same slice in int8 is among them, and each suggestion really fits, planned on its own.
    assert ("v6e-16", "int8") in [(s.instance, s.quantization) for s in result.suggestions]
    for s in result.suggestions:
        assert on(s.instance, "llama-3.1-405b-instruct", s.quantization).fits, s


def test_spot_capacity_is_planned_at_the_spot_price_and_405b_says_it_is_untested_on_vllm_tpu(tmp_path):
    text = (ROOT / "environments" / "gcp-v6e-405b-int8.yaml").read_text()
    spot = tmp_path / "spot.yaml"
    spot.write_text(text.replace("  machine_type: v6e-16\n", "  machine_type: v6e-16\n  spot: true\n"))
    on_demand, cheap = (plan(request_from_spec(load_spec(p))) for p in (ROOT / "environments" / "gcp-v6e-405b-int8.yaml", spot))
    inst = catalog.instance("v6e-16")
    assert on_demand.cost_usd_per_hour == pytest.approx(inst.price_usd_per_hour * 4)
    assert cheap.cost_usd_per_hour == pytest.approx(inst.spot_price_usd_per_hour * 4)
    assert cheap.cost_usd_per_hour < on_demand.cost_usd_per_hour
    assert any("405B recipe" in n and "untested" in n for n in on_demand.notes)
    assert not any("untested" in n for n in on("v6e-8", "llama-3.1-70b-instruct").notes)


def test_a_slice_is_provisioned_whole():
    """A v6e-16 is 4 hosts: a group cannot use 2 of them, nor run FP8 (no FP8 units)."""
    partial = on("v6e-16", "llama-3.1-405b-instruct", "int8", nodes=2, pipeline=2)
    assert not partial.fits and any("a v6e-16 slice is 4 host(s) of 4 chips" in r for r in partial.reasons)
    fp8 = on("v6e-16", "llama-3.1-405b-instruct", "fp8")
    assert any("tpu-v6e has no FP8: quantize to int8" in r for r in fp8.reasons)


def test_the_shipped_tpu_environment_fits_and_the_spec_refuses_what_tpus_do_not_run(tmp_path):
    spec = load_spec(ROOT / "environments" / "gcp-v6e-405b-int8.yaml")
    result = plan(request_from_spec(spec))
    assert result.fits and (result.nodes, result.tensor_parallel, result.pipeline_parallel) == (4, 4, 4)
    text = (ROOT / "environments" / "gcp-v6e-405b-int8.yaml").read_text()
    for change, expected in [
        (("engine: vllm", "engine: transformers"), "serving.engine: 'transformers' on the TPU slice v6e-16: herd's "
                                                   "built-in engine runs on CUDA GPUs and CPUs (allowed on TPUs: vllm)"),
        (("nodes: auto", "nodes: 2"), "parallelism.nodes: 2, but a v6e-16 slice is 4 host(s) (allowed: auto, 4)"),
        (("quantization: int8", "quantization: fp8"), "model.quantization: 'fp8' on the TPU slice v6e-16: TPUs have "
                                                      "no FP8 (allowed: none, int8, int4)"),
    ]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text.replace(*change))
        with pytest.raises(UserError) as err:
            load_spec(bad)
        assert expected in str(err.value) and "\n" not in str(err.value)
