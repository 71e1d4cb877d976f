"""LoRA adapters (model.adapters) are fetched and checked like the weights before anything serves them:
a directory that is no adapter, a copy that does not match its manifest and a rank above the one the
spec reserves are each refused in one line naming the field."""
import json

import pytest

from provisioning.weights import fetch_adapters
from provisioning.weights.manifest import write_manifest
from runtime.errors import UserError
from runtime.planning.spec import parse_spec


def spec_with(adapters, engine="vllm"):
    return parse_spec({"name": "t", "target": "local", "model": {"id": "smollm2-135m-instruct", "adapters": adapters},
                       "serving": {"engine": engine}}, "t.yaml")


def adapter(tmp_path, name="a", r=8):
    path = tmp_path / name
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"r": r, "peft_type": "LORA"}))
    (path / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    write_manifest(path, source="test")
    return path


def test_a_verified_adapter_within_its_rank_is_served_in_place(tmp_path):
    path = adapter(tmp_path)
    spec = spec_with([{"name": "legal", "source": f"file://{path}", "rank": 8}])
    assert fetch_adapters(spec, tmp_path / "model", quiet=True) == [path]


def test_what_is_not_a_good_adapter_is_refused_naming_the_field(tmp_path):
    path = adapter(tmp_path, r=32)
    with pytest.raises(UserError, match=r"model.adapters\[0\].rank: 16, but legal's adapter_config.json has r=32"):
        fetch_adapters(spec_with([{"name": "legal", "source": f"file://{path}"}]), tmp_path, quiet=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"model.adapters\[0\].source: .* has no adapter_config.json"):
        fetch_adapters(spec_with([{"name": "x", "source": f"file://{empty}"}]), tmp_path, quiet=True)
    tampered = adapter(tmp_path, "tampered")
    (tampered / "adapter_model.safetensors").write_bytes(b"\1" * 64)
    with pytest.raises(UserError, match=r"model.adapters\[0\].source: .* does not match its herd-manifest.json"):
        fetch_adapters(spec_with([{"name": "x", "source": f"file://{tampered}", "rank": 8}]), tmp_path, quiet=True)


@pytest.mark.parametrize("adapters, engine, message", [
    ([{"name": "a", "source": "s3://b/a"}], "transformers", "LoRA adapters are served by engine 'vllm'"),
    ([{"name": "a", "source": "s3://b/a"}, {"name": "a", "source": "s3://b/c"}], "vllm", "a given more than once"),
    ([{"name": "smollm2-135m-instruct", "source": "s3://b/a"}], "vllm", "the base model's own name"),
    ([{"name": "a", "source": "pypi://pkg"}], "vllm", "pypi:// is for the embedded model"),
    ([{"name": "a b", "source": "s3://b/a"}], "vllm", "model.adapters.0.name"),
])
def test_a_bad_adapters_list_is_one_line_naming_the_field(adapters, engine, message):
    with pytest.raises(UserError) as err:
        spec_with(adapters, engine)
    assert message in str(err.value) and "\n" not in str(err.value)
