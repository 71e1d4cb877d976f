"""Bad environment files get one line naming file, field, value and what is allowed."""
import textwrap

import pytest

from runtime.errors import UserError
from runtime.planning.spec import load_spec
from tests.conftest import ENVIRONMENTS, ROOT


@pytest.mark.parametrize("path", ENVIRONMENTS, ids=lambda p: p.name)
def test_every_shipped_environment_is_valid(path):
    spec = load_spec(path)
    assert spec.name == path.stem
    # The section that applies is the target's own, as written in the file.
    section = spec.target_section
    assert type(section).__name__ == {"local": "LocalSection", "onprem": "OnpremSection", "aws": "AwsSection",
                                      "gcp": "GcpSection"}[spec.target]
    assert section is getattr(spec, spec.target)


def test_there_is_an_environment_for_every_target():
    assert {load_spec(p).target for p in ENVIRONMENTS} == {"local", "onprem", "aws", "gcp"}


LOCAL = (ROOT / "environments" / "local.yaml").read_text()


def write(tmp_path, text):
    path = tmp_path / "env.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def error_of(path) -> str:
    with pytest.raises(UserError) as info:
        load_spec(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    return message


@pytest.mark.parametrize("change, field, expected", [
    (("quantization: none", "quantisation: none"), "model.quantisation", "did you mean quantization"),
    (("tensor: auto", "tensor: three"), "parallelism.tensor", "'auto'"),
    (("tensor: auto", "tensor: 2"), "parallelism.tensor", "allowed: auto, 1, 3, 9"),
    (("nodes: 1", "nodes: 0"), "parallelism.nodes", "greater than or equal to 1"),
    (("max_model_len: 2048", "max_model_len: 100000"), "context.max_model_len", "16..8192"),
    (("id: smollm2-135m-instruct", "id: smollm2-135m-instrukt"), "model.id", "smollm2-135m-instruct"),
    (("target: local", "target: azure"), "target", "'local', 'onprem', 'aws' or 'gcp'"),
    (("port: 8000", "port: 80000"), "serving.port", "65535"),
    (("host: 127.0.0.1", "host: 0.0.0.0"), "serving.host", "API key is required"),
    (("concurrency: 8", "concurrency: [8]"), "context.concurrency", "valid integer"),
])
def test_bad_field_names_field_value_and_allowed(tmp_path, change, field, expected):
    old, new = change
    assert old in LOCAL
    message = error_of(write(tmp_path, LOCAL.replace(old, new)))
    assert field in message and expected in message, message


def test_unreadable_yaml_names_the_line(tmp_path):
    message = error_of(write(tmp_path, "name: x\ntarget: local\nmodel: [unclosed\n"))
    assert "line 4" in message or "line 3" in message


def test_missing_file_is_named(tmp_path):
    message = error_of(tmp_path / "nope.yaml")
    assert "no such file" in message


def test_only_the_targets_own_section_is_allowed(tmp_path):
    text = LOCAL + "aws:\n  region: us-east-1\n  instance_type: p5.48xlarge\n  allowed_cidrs: [10.0.0.0/8]\n"
    assert "section 'aws' given but target is 'local'" in error_of(write(tmp_path, text))


def test_cloud_target_needs_its_section_and_valid_cidrs(tmp_path):
    aws = (ROOT / "environments" / "aws-p5-405b-fp8.yaml").read_text()
    assert "add 'aws:'" in error_of(write(tmp_path, aws.split("aws:\n")[0]))
    bad = aws.replace("[203.0.113.0/24]", "[everyone]")
    assert "aws.allowed_cidrs" in error_of(write(tmp_path, bad))
    wrong_cloud = aws.replace("p5.48xlarge", "a3-highgpu-8g")
    assert "is a gcp machine type" in error_of(write(tmp_path, wrong_cloud))


# ------------------------------------------------------------------ replicas
ONPREM = (ROOT / "environments" / "onprem-example.yaml").read_text()
BALANCER = "  load_balancer: {address: 10.0.0.5}\n"


def test_replicas_default_to_one_group():
    assert all(load_spec(p).replicas == 1 for p in ENVIRONMENTS)


def test_local_replicas_share_this_machine_s_ram(tmp_path):
    from runtime.planning.plan_spec import HostFacts, hardware_for
    host = HostFacts(cpus=8, ram_bytes=24 * 2**30, free_disk_bytes=100 * 2**30)
    one = hardware_for(load_spec(write(tmp_path, LOCAL)), host)
    three = hardware_for(load_spec(write(tmp_path, LOCAL + "replicas: 3\n")), host)
    assert (one.host_ram_bytes, three.host_ram_bytes) == (24 * 2**30, 8 * 2**30)
    assert three.disk_bytes == one.disk_bytes              # one copy of the weights serves every replica


@pytest.mark.parametrize("text, expected", [
    (LOCAL + "replicas: 0\n", "replicas: 0: Input should be greater than or equal to 1"),
    (ONPREM + "replicas: 2\n", "replicas: 2 needs onprem.load_balancer (address:"),
    (ONPREM + BALANCER + "replicas: 3\n", "replicas: 3 groups need at least 3 hosts, onprem.hosts lists 2"),
    (ONPREM.replace("nodes: auto}", "nodes: 2}") + BALANCER + "replicas: 2\n",
     "parallelism.nodes: 2 per replica x replicas 2 = 4 hosts, onprem.hosts lists 2"),
    (ONPREM + "  load_balancer: {address: 10.0.0.5, listen_address: everywhere}\nreplicas: 2\n",
     "onprem.load_balancer.listen_address: 'everywhere': must be an IP address"),
    (ONPREM + "  load_balancer: {address: 10.0.0.5, balance: roundrobin}\n",
     "onprem.load_balancer.balance: unknown key (allowed: address, user, port, listen_address"),
])
def test_replicas_need_a_balancer_and_enough_hosts(tmp_path, text, expected):
    assert expected in error_of(write(tmp_path, text))


def test_onprem_replicas_with_a_balancer_load():
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as tmp:
        spec = load_spec(write(Path(tmp), ONPREM + "  load_balancer: {address: 10.0.0.5, pem_file: /etc/herd/lb.pem}\n"
                                              "replicas: 2\n"))
    assert spec.replicas == 2
    lb = spec.onprem.load_balancer
    assert (lb.address, lb.user, lb.port, lb.listen_address, lb.listen_port, lb.pem_file) == \
        ("10.0.0.5", "root", 22, "0.0.0.0", 443, "/etc/herd/lb.pem")


# ------------------------------------------------------------------ serving.guard
def with_guard(guard_yaml: str) -> str:
    assert "  port: 8000\n" in LOCAL
    return LOCAL.replace("  port: 8000\n", f"  port: 8000\n  guard: {guard_yaml}\n")


def test_a_guard_loads_with_its_defaults(tmp_path):
    guard = load_spec(write(tmp_path, with_guard("{url: 'http://127.0.0.1:8200'}"))).serving.guard
    assert guard is not None
    assert (guard.url, guard.screen, guard.on_error, guard.timeout_s) == ("http://127.0.0.1:8200", ["prompt"],
                                                                           "closed", 5.0)
    assert load_spec(write(tmp_path, LOCAL)).serving.guard is None


@pytest.mark.parametrize("guard, expected", [
    ("{url: 'http://g:8200', on_error: half}", "serving.guard.on_error: 'half': Input should be 'closed' or 'open'"),
    ("{url: 'http://g:8200', screen: [prompt, answr]}", "serving.guard.screen.1: 'answr': Input should be 'prompt' or "
                                                         "'answer'"),
    ("{url: 'http://g:8200', screen: [prompt, prompt]}", "serving.guard.screen: ['prompt', 'prompt']: names prompt"),
    ("{url: 'http://g:8200', timeout_s: 0}", "serving.guard.timeout_s: 0: Input should be greater than 0"),
    ("{url: 'g:8200'}", "serving.guard.url: 'g:8200': must be an http:// or https:// URL"),
    ("{url: 'http://g:8200', sceen: [prompt]}", "serving.guard.sceen: unknown key; did you mean screen?"),
    ("{screen: [prompt]}", "serving.guard: needs url (a guard served apart, such as http://127.0.0.1:8200) or model"),
    ("{url: 'http://g:8200', model: llama-guard-3-8b}", "serving.guard: gives both url and model"),
    ("{url: 'http://g:8200', source: 'hf://meta-llama/Llama-Guard-3-8B'}",
     "serving.guard.source: is for a guard herd serves; give serving.guard.model too"),
    ("{url: 'http://g:8200', chat_template: '{{ x }}'}", "serving.guard.chat_template: is for a guard herd serves"),
    ("{model: meta-llama/Llama-Guard-3-8B}", "serving.guard.model: unknown value 'meta-llama/Llama-Guard-3-8B'"),
    ("{model: llama-guard-3-8b, max_model_len: 200000}", "serving.guard.max_model_len: 200000 is above the guard "
                                                         "model's maximum (allowed: 16..131072)"),
])
def test_a_bad_guard_names_the_field_the_value_and_what_is_allowed(tmp_path, guard, expected):
    message = error_of(write(tmp_path, with_guard(guard)))
    assert expected in message, message


def test_a_guard_herd_serves_is_a_model_with_its_weights_and_context(tmp_path):
    guard = load_spec(write(tmp_path, with_guard("{model: llama-guard-3-8b, source: 'hf://meta-llama/Llama-Guard-3-8B'}"))
                      ).serving.guard
    assert guard is not None and guard.served_here and guard.url is None
    assert (guard.model_section.id, guard.model_section.source, guard.max_model_len) == \
        ("llama-guard-3-8b", "hf://meta-llama/Llama-Guard-3-8B", 4096)


# ------------------------------------------------------------------ ranks fit the machine
def local_plan(tmp_path, text, cpus):
    from runtime.planning.plan_spec import HostFacts, request_from_spec
    from runtime.planning.planner import plan
    host = HostFacts(cpus=cpus, ram_bytes=24 * 2**30, free_disk_bytes=100 * 2**30)
    return plan(request_from_spec(load_spec(write(tmp_path, text)), host))


@pytest.mark.parametrize("cpus, replicas, ranks", [(1, 1, 1), (2, 1, 1), (3, 1, 3), (16, 1, 3), (4, 2, 1), (6, 2, 3)])
def test_the_embedded_default_is_tensor_parallel_where_every_rank_has_a_core(tmp_path, cpus, replicas, ranks):
    """SmolLM2 divides over 1, 3 or 9 ranks: auto takes the most that give each rank a core of its
    replica's share, and no more than its 3 KV heads (9 ranks would replicate them)."""
    result = local_plan(tmp_path, LOCAL + f"replicas: {replicas}\n", cpus)
    assert result.fits and result.tensor_parallel == ranks
    cores = cpus // replicas
    assert f"tensor auto = {ranks}: the largest degree dividing the model's 9 attention and 3 KV heads" in result.notes[0]
    assert f"a core per rank on {cores} cores" in result.notes[0]
    assert not any("ranks on" in note for note in result.notes)


def test_more_ranks_than_cores_is_explained_in_numbers(tmp_path):
    result = local_plan(tmp_path, LOCAL.replace("tensor: auto", "tensor: 3"), 2)
    assert result.fits and result.tensor_parallel == 3         # asked for: served, with the cost said
    (note,) = [n for n in result.notes if "ranks on" in n]
    assert "3 ranks on 2 cores" in note and "tokens/s at TP 3 against" in note
    assert not any(n.startswith("tensor auto") for n in result.notes)


def test_auto_dtype_follows_the_degree_auto_picks(tmp_path):
    """dtype auto on CPU: bf16 only in one process (tensor-parallel CPU ranks run fp32, see dtypes)."""
    from runtime.planning import dtypes
    one, three = local_plan(tmp_path, LOCAL, 2), local_plan(tmp_path, LOCAL, 4)
    assert (one.tensor_parallel, three.tensor_parallel) == (1, 3)
    assert three.dtype == "float32"
    assert one.dtype == dtypes.resolve("auto", checkpoint="bfloat16", on_gpu=False, tensor_parallel=1)


def test_the_canary_defaults_and_its_bounds(tmp_path):
    spec = load_spec(write(tmp_path, LOCAL))
    assert (spec.serving.canary.interval_s, spec.serving.canary.timeout_s, spec.serving.canary.retries) == (10, 5, 2)
    slow = load_spec(write(tmp_path, LOCAL.replace("  engine: transformers\n",
                                                   "  engine: transformers\n  canary: {timeout_s: 30}\n")))
    assert slow.serving.canary.timeout_s == 30 and slow.serving.canary.retries == 2
    message = error_of(write(tmp_path, LOCAL.replace("  engine: transformers\n",
                                                     "  engine: transformers\n  canary: {timeout_s: 0}\n")))
    assert "serving.canary.timeout_s" in message and "greater than 0" in message
