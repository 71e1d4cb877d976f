"""The GCP cluster, as the Pulumi program declares it (mocks): A3 node, firewall, placement, secrets."""
from __future__ import annotations

import pytest
import yaml
from cryptography import x509

from tests.conftest import ROOT
from tests.infra.conftest import is_secret, plain_text, write_env

ENVS = ROOT / "environments"
API_KEY = "sk-herd-test-77e0b2"
GIB = 2**30
# Published sizes, not the planner's: vLLM measured 57.75 GiB of weights per GPU at TP 8 for Meta's
# FP8 405B (vllm issue 6746); BF16 is Meta's 405.85 B parameters x 2 bytes.
FP8_405B_BYTES = 8 * 57.75 * GIB
BF16_405B_BYTES = 405.85e9 * 2
PD_SSD_MAX_GB = 64 * 1024   # a persistent disk (pd-ssd) holds at most 64 TB


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("HERD_API_KEY", API_KEY)


@pytest.fixture
def two_a2_nodes(tmp_path):
    """405B BF16 on two a2-ultragpu-8g (16 x A100 80 GB), like the two-p4de AWS environment."""
    base = yaml.safe_load((ENVS / "gcp-a3-405b-fp8.yaml").read_text())
    return write_env(tmp_path, "gcp-a2-405b-bf16", base, model={"quantization": "none",
                                                                 "source": "gs://my-weights-bucket/405b"},
                     parallelism={"tensor": 8, "pipeline": "auto", "nodes": "auto"},
                     gcp={"machine_type": "a2-ultragpu-8g"})


def test_the_a3_node_has_its_gpus_terminates_on_maintenance_and_boots_the_steps(run_stack):
    mocks, outputs = run_stack(ENVS / "gcp-a3-405b-fp8.yaml")
    node = mocks.one("gcp:compute/instance:Instance").inputs
    assert node["machineType"] == "a3-highgpu-8g" and node["zone"] == "us-central1-a"
    assert node["guestAccelerators"] == [{"type": "nvidia-h100-80gb", "count": 8}]
    assert node["scheduling"]["onHostMaintenance"] == "TERMINATE"
    assert node["bootDisk"]["initializeParams"]["image"] == \
        "projects/deeplearning-platform-release/global/images/family/common-cu128-ubuntu-2204-nvidia-570"
    # The boot disk (GB, GCP's binary gigabytes) holds the checkpoint and a partial second copy.
    disk = node["bootDisk"]["initializeParams"]
    assert disk["type"] == "pd-ssd" and 2 * FP8_405B_BYTES <= disk["size"] * GIB and disk["size"] <= PD_SSD_MAX_GB
    startup = node["metadata"]["startup-script"]
    assert "HERD_NODE_RANK=0" in startup and "HERD_CLOUD=gcp" in startup
    assert "run_step 30-efa" not in startup          # EFA is AWS's
    assert node["metadata"]["block-project-ssh-keys"] == "TRUE"
    assert "resourcePolicies" not in node            # one node: nothing to place together
    # The head's reserved external address (the mocks' first), which its certificate names.
    assert outputs["endpoint"] == "https://203.0.113.110:8000"
    address = mocks.one("gcp:compute/address:Address").inputs
    assert address["addressType"] == "EXTERNAL" and address["region"] == "us-central1"
    assert node["networkInterfaces"][0]["accessConfigs"] == [{"natIp": "203.0.113.110"}]


def test_firewall_opens_the_api_and_ssh_to_the_named_cidrs_and_everything_among_nodes(run_stack):
    mocks, _ = run_stack(ENVS / "gcp-a3-405b-fp8.yaml")
    rules = {r.name: r.inputs for r in mocks.of_type("gcp:compute/firewall:Firewall")}
    external = rules["gcp-a3-405b-fp8-api-ssh"]
    assert external["sourceRanges"] == ["203.0.113.0/24"]
    assert external["allows"] == [{"protocol": "tcp", "ports": ["8000", "22"]}]
    internal = rules["gcp-a3-405b-fp8-internal"]
    assert internal["sourceTags"] == internal["targetTags"] == ["herd-gcp-a3-405b-fp8"]
    assert "sourceRanges" not in internal
    node = mocks.one("gcp:compute/instance:Instance").inputs
    assert node["tags"] == ["herd-gcp-a3-405b-fp8"]


def test_nodes_read_the_weights_and_the_key_through_their_service_account_only(run_stack):
    mocks, _ = run_stack(ENVS / "gcp-a3-405b-fp8.yaml")
    account = "serviceAccount:herd-gcp-a3-405b-fp8@my-project.iam.gserviceaccount.com"
    readers = {r.inputs["bucket"]: r.inputs for r in mocks.of_type("gcp:storage/bucketIAMMember:BucketIAMMember")}
    assert readers["my-weights-bucket"] == {"bucket": "my-weights-bucket", "member": account,
                                            "role": "roles/storage.objectViewer"}
    versions = {r.name: r.inputs for r in mocks.of_type("gcp:secretmanager/secretVersion:SecretVersion")}
    assert set(versions) == {f"gcp-a3-405b-fp8-{f}-v" for f in ("api-key", "tls-cert", "tls-key")}
    version = versions["gcp-a3-405b-fp8-api-key-v"]
    assert is_secret(version["secretData"]) and version["secretData"]["value"] == API_KEY
    for access in mocks.of_type("gcp:secretmanager/secretIamMember:SecretIamMember"):
        assert access.inputs["member"] == account and access.inputs["role"] == "roles/secretmanager.secretAccessor"
    for resource in mocks.resources:
        assert API_KEY not in plain_text(resource.inputs), resource.name
    node = mocks.one("gcp:compute/instance:Instance").inputs
    assert "gcloud secrets versions access latest --project my-project --secret herd-gcp-a3-405b-fp8-api-key" \
        in node["metadata"]["startup-script"]
    bucket = mocks.one("gcp:storage/bucket:Bucket").inputs
    assert bucket["publicAccessPrevention"] == "enforced" and bucket["uniformBucketLevelAccess"] is True


def test_two_nodes_are_placed_compactly_and_the_worker_knows_the_head(run_stack, two_a2_nodes):
    mocks, outputs = run_stack(two_a2_nodes)
    policy = mocks.one("gcp:compute/resourcePolicy:ResourcePolicy").inputs
    assert policy["groupPlacementPolicy"] == {"collocation": "COLLOCATED", "vmCount": 2}
    head, worker = mocks.of_type("gcp:compute/instance:Instance")
    for node in (head, worker):
        assert node.inputs["resourcePolicies"] == "gcp-a2-405b-bf16-compact-id"
        assert node.inputs["guestAccelerators"] == [{"type": "nvidia-a100-80gb", "count": 8}]
        # Each node fetches the whole BF16 checkpoint (811.7 GB), though it loads one pipeline stage.
        assert 2 * BF16_405B_BYTES <= node.inputs["bootDisk"]["initializeParams"]["size"] * GIB
    assert "--rdzv-endpoint 10.42.0.10:29400" in worker.inputs["metadata"]["startup-script"]
    assert "--role worker" in worker.inputs["metadata"]["startup-script"]
    assert len(outputs["node_addresses"]) == 2


def test_spot_nodes_use_the_spot_model_and_stop_on_preemption(run_stack, tmp_path):
    base = yaml.safe_load((ENVS / "gcp-a3-405b-fp8.yaml").read_text())
    mocks, _ = run_stack(write_env(tmp_path, "spot", base, gcp={"spot": True}))
    scheduling = mocks.one("gcp:compute/instance:Instance").inputs["scheduling"]
    assert scheduling["provisioningModel"] == "SPOT" and scheduling["onHostMaintenance"] == "TERMINATE"
    assert scheduling["instanceTerminationAction"] == "STOP" and scheduling["automaticRestart"] is False


def test_the_node_account_holds_no_project_role_only_grants_on_its_own_bucket_and_secret(run_stack, tmp_path):
    base = yaml.safe_load((ENVS / "gcp-a3-405b-fp8.yaml").read_text())
    env = write_env(tmp_path, "gcp-two-buckets", base, model={"source": "gs://team-models/405b-fp8"})
    mocks, _ = run_stack(env)
    account = "serviceAccount:herd-gcp-two-buckets@my-project.iam.gserviceaccount.com"
    hierarchy = ("gcp:projects/", "gcp:folder/", "gcp:organizations/")
    assert [r for r in mocks.resources if r.type.startswith(hierarchy)] == []
    grants = sorted((r.type.split(":")[-1], r.inputs.get("bucket") or r.inputs.get("secretId"), r.inputs["role"])
                    for r in mocks.resources if "role" in r.inputs and r.inputs.get("member") == account)
    artifacts = mocks.one("gcp:storage/bucket:Bucket").name
    secrets = [r.name for r in mocks.of_type("gcp:secretmanager/secret:Secret")]
    assert secrets == [f"gcp-two-buckets-{f}" for f in ("api-key", "tls-cert", "tls-key")]
    assert grants == sorted([
        ("BucketIAMMember", f"{artifacts}-9e1b", "roles/storage.objectViewer"),
        ("BucketIAMMember", "my-weights-bucket", "roles/storage.objectViewer"),
        ("BucketIAMMember", "team-models", "roles/storage.objectViewer"),
        *(("SecretIamMember", f"{secret}-id", "roles/secretmanager.secretAccessor") for secret in secrets),
    ])
    # Every IAM resource in the stack is one of those: nothing else is granted to anyone.
    iam = [r for r in mocks.resources if "iam" in r.type.lower() and r.type != "gcp:serviceaccount/account:Account"]
    assert len(iam) == len(grants)


def test_the_head_reads_its_certificate_from_secret_manager_signed_for_its_address(run_stack, deployment_state,
                                                                                  two_a2_nodes):
    mocks, outputs = run_stack(two_a2_nodes)
    versions = {r.name.rsplit("-", 1)[0].removeprefix("gcp-a2-405b-bf16-"): r.inputs["secretData"]
                for r in mocks.of_type("gcp:secretmanager/secretVersion:SecretVersion")}
    assert is_secret(versions["tls-key"]) and is_secret(versions["tls-cert"])
    cert = x509.load_pem_x509_certificate(versions["tls-cert"]["value"].encode())
    head_ip = outputs["head_address"]
    assert outputs["endpoint"] == f"https://{head_ip}:8000"
    sans = {str(n.value) for n in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value}
    assert head_ip in sans and outputs["node_addresses"][1] not in sans
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(
        (deployment_state / "gcp-a2-405b-bf16" / "tls" / "ca.pem").read_bytes()))
    head, worker = mocks.of_type("gcp:compute/instance:Instance")
    assert "--secret herd-gcp-a2-405b-bf16-tls-key" in head.inputs["metadata"]["startup-script"]
    assert "tls-key" not in worker.inputs["metadata"]["startup-script"]
    for resource in mocks.resources:
        assert "PRIVATE KEY" not in plain_text(resource.inputs), resource.name


def test_certificate_secrets_the_spec_names_are_granted_to_the_nodes_alone(run_stack, tmp_path):
    base = yaml.safe_load((ENVS / "gcp-a3-405b-fp8.yaml").read_text())
    env = write_env(tmp_path, "own-cert", base, serving={"tls": {"cert": "secretmanager:team-cert",
                                                                 "key": "secretmanager:team-key"}})
    mocks, outputs = run_stack(env)
    assert [r.inputs["secretId"] for r in mocks.of_type("gcp:secretmanager/secret:Secret")] == ["herd-own-cert-api-key"]
    granted = {r.inputs["secretId"]: r.inputs for r in mocks.of_type("gcp:secretmanager/secretIamMember:SecretIamMember")}
    for name in ("team-cert", "team-key"):
        assert granted[name]["project"] == "my-project"
        assert granted[name]["role"] == "roles/secretmanager.secretAccessor"
        assert granted[name]["member"] == "serviceAccount:herd-own-cert@my-project.iam.gserviceaccount.com"
    startup = mocks.one("gcp:compute/instance:Instance").inputs["metadata"]["startup-script"]
    assert "--secret team-cert" in startup and "--secret team-key" in startup
    assert outputs["endpoint"].startswith("https://")
