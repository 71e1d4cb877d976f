"""A TPU slice as the Pulumi program declares it (mocks): one Cloud TPU VM resource for every host of the
slice, the generation's software version, spot or reserved capacity, the nodes' least-privilege account,
a weights disk read-only on every host, and one startup script in which each host runs its own node's
steps: no NVIDIA step anywhere, vLLM's TPU build, the head's certificate for the slice's address."""
from __future__ import annotations

import pytest

from runtime.planning import catalog
from tests.conftest import ROOT
from tests.infra.conftest import plain_text, write_env

ENV = ROOT / "environments" / "gcp-v6e-405b-int8.yaml"
API_KEY = "sk-herd-tpu-test-51c0"


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("HERD_API_KEY", API_KEY)


def test_one_v6e_16_slice_with_its_software_version_account_and_weights_disk(run_stack):
    mocks, outputs = run_stack(ENV)
    vm = mocks.one("gcp:tpu/v2Vm:V2Vm").inputs
    assert vm["acceleratorType"] == "v6e-16" and vm["zone"] == "us-east5-b"
    assert vm["runtimeVersion"] == catalog.instance("v6e-16").runtime_version == "v2-alpha-tpuv6e"
    assert vm["networkConfig"]["enableExternalIps"] is True and vm["tags"] == ["herd-gcp-v6e-405b-int8"]
    assert vm["shieldedInstanceConfig"] == {"enableSecureBoot": True}
    assert vm["dataDisks"] == [{"sourceDisk": "projects/my-project/zones/us-east5-b/disks/llama-405b-w8a8",
                                "mode": "READ_ONLY"}]
    assert vm["serviceAccount"]["email"].startswith("herd-gcp-v6e-405b-int8@")
    assert not mocks.of_type("gcp:compute/instance:Instance")                  # no GPU VM besides the slice
    # The endpoint is the head's (worker 0's) address, over TLS, and its certificate names that address.
    assert outputs["endpoint"] == f"https://{outputs['head_address']}:8000"
    assert len(outputs["node_addresses"]) == 4 and outputs["head_address"] == outputs["node_addresses"][0]
    assert [s for s in outputs["ssh"] if "--worker 3" in s]
    assert API_KEY not in plain_text(vm)                                 # the key is a secret, fetched at boot


def test_each_host_runs_its_own_node_s_steps_without_nvidia(run_stack):
    mocks, _ = run_stack(ENV)
    vm = mocks.one("gcp:tpu/v2Vm:V2Vm").inputs
    startup = vm["metadata"]["startup-script"]
    assert "agent-worker-number" in startup and "worker-network-endpoints" in startup
    for rank in range(4):
        assert f"HERD_NODE_RANK={rank}" in startup and f"herd node {rank} of 4" in startup
    assert startup.count("HERD_TPU=1") == 4 and "HERD_GPU=0" in startup and "HERD_GPU=1" not in startup
    assert "run_step 10-nvidia-driver" not in startup and "run_step 80-gpu-health" not in startup
    assert startup.count("run_step 55-vllm") == 4                       # vLLM's TPU build on every host
    assert "TPU host, no NVIDIA GPU" in startup
    # Workers rendezvous at the head's address, learnt at boot; only the head fetches the certificate.
    assert "--rdzv-endpoint @HEAD_ADDR@:" in startup and 'sed -i "s/@HEAD_ADDR@/$head/g"' in startup
    assert startup.count("fetch_secret tls-key") == 1


def test_spot_and_reserved_capacity(run_stack, tmp_path):
    import yaml
    base = yaml.safe_load(ENV.read_text())
    for key in ("spot", "reserved"):
        mocks, _ = run_stack(write_env(tmp_path, f"tpu-{key}", base, gcp={key: True}))
        vm = mocks.one("gcp:tpu/v2Vm:V2Vm").inputs
        assert vm["schedulingConfig"] == {key: True}
