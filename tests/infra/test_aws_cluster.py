"""The AWS cluster, as the Pulumi program declares it for each shipped AWS environment (mocks)."""
from __future__ import annotations

import json
import stat

import pulumi
import pytest
import yaml
from cryptography import x509

from infra.efa import efa_device_count, interface_layout
from provisioning.boot import USER_DATA_LIMIT
from runtime.planning.spec import load_spec
from runtime.serving.tls import fingerprint
from tests.conftest import ROOT
from tests.infra.conftest import CloudMocks, is_secret, plain_text, write_env

ENVS = ROOT / "environments"
API_KEY = "sk-herd-test-3f9a1c"
GIB = 2**30
# Checkpoint sizes from published figures, not from the planner: Meta's 405.85 B parameters x 2 bytes
# (BF16), and vLLM's measured 57.75 GiB of weights per GPU at TP 8 for Meta's FP8 405B (vllm issue 6746).
CHECKPOINT_BYTES = {"aws-p4de-405b-bf16-2node": 405.85e9 * 2, "aws-p5-405b-fp8": 8 * 57.75 * GIB}
GP3_MAX_GIB = 16 * 1024     # EBS gp3 volumes: 1 GiB to 16 TiB


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("HERD_API_KEY", API_KEY)


@pytest.mark.parametrize("instance_type,efa", [("p4d.24xlarge", 4), ("p4de.24xlarge", 4), ("p5.48xlarge", 32),
                                               ("p5en.48xlarge", 16)])
def test_each_type_gets_every_efa_card_behind_one_ena_primary(instance_type, efa):
    slots = interface_layout(instance_type)
    assert efa_device_count(slots) == efa
    assert slots[0].network_card_index == 0 and slots[0].device_index == 0 and slots[0].interface_type == "interface"
    assert [s.network_card_index for s in slots[1:]] == [0, *range(1, efa)]
    assert {(s.network_card_index, s.device_index) for s in slots[1:]} == {(0, 1), *((c, 0) for c in range(1, efa))}
    assert all(s.interface_type == "efa-only" for s in slots[1:])


@pytest.mark.parametrize("env", ["aws-p5-405b-fp8", "aws-p4de-405b-bf16-2node"])
def test_the_launch_template_is_efa_imdsv2_encrypted_and_placed(run_stack, env):
    mocks, _ = run_stack(ENVS / f"{env}.yaml")
    spec = load_spec(ENVS / f"{env}.yaml")
    template = mocks.one("aws:ec2/launchTemplate:LaunchTemplate").inputs
    nics = template["networkInterfaces"]
    expected = interface_layout(spec.aws.instance_type)
    assert [(n["networkCardIndex"], n["deviceIndex"], n["interfaceType"]) for n in nics] == \
        [(s.network_card_index, s.device_index, s.interface_type) for s in expected]
    assert all(n["subnetId"] == f"{env}-subnet-id" for n in nics)
    assert template["metadataOptions"]["httpTokens"] == "required"
    (root,) = template["blockDeviceMappings"]
    assert root["ebs"]["encrypted"] == "true" and root["ebs"]["volumeType"] == "gp3"
    # The root volume (GiB) holds the checkpoint and a partial second copy while fetching, within gp3's limit.
    assert 2 * CHECKPOINT_BYTES[env] <= root["ebs"]["volumeSize"] * GIB
    assert root["ebs"]["volumeSize"] <= GP3_MAX_GIB
    group = mocks.one("aws:ec2/placementGroup:PlacementGroup")
    assert group.inputs["strategy"] == "cluster"
    assert template["placement"]["groupName"].startswith(group.name)
    assert template["instanceType"] == spec.aws.instance_type
    assert template["imageId"] == "ami-0dla0123456789abc"
    ami_query = next(args for token, args in mocks.calls if token == "aws:ec2/getAmi:getAmi")
    assert {"name": "name", "values": [spec.aws.ami_name_pattern]} in ami_query["filters"]


def test_nodes_launch_from_the_templates_latest_version_as_a_string(run_stack):
    """The template's latest_version is a number (the mocks answer 1, as AWS does); an instance's
    launch_template.version is a string in the provider's schema ("1", "$Latest"), so it is converted."""
    mocks, _ = run_stack(ENVS / "aws-p4de-405b-bf16-2node.yaml")
    template = mocks.one("aws:ec2/launchTemplate:LaunchTemplate")
    nodes = mocks.of_type("aws:ec2/instance:Instance")
    assert len(nodes) == 2
    assert all(n.inputs["launchTemplate"] == {"id": f"{template.name}-id", "version": "1"} for n in nodes)


def test_ingress_is_the_named_cidrs_on_the_api_and_ssh_ports_and_the_nodes_themselves(run_stack, tmp_path):
    base = yaml.safe_load((ENVS / "aws-p5-405b-fp8.yaml").read_text())
    env = write_env(tmp_path, "two-cidrs", base, aws={"allowed_cidrs": ["203.0.113.0/24", "198.51.100.7/32"]},
                    serving={"port": 9000})
    mocks, _ = run_stack(env)
    rules = mocks.of_type("aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule")
    from_cidrs = sorted((r.inputs["cidrIpv4"], r.inputs["fromPort"], r.inputs["toPort"])
                        for r in rules if "cidrIpv4" in r.inputs)
    assert from_cidrs == sorted((c, p, p) for c in ("203.0.113.0/24", "198.51.100.7/32") for p in (22, 9000))
    self_rules = [r for r in rules if "referencedSecurityGroupId" in r.inputs]
    assert len(self_rules) == 1 and self_rules[0].inputs["ipProtocol"] == "-1"
    assert not any(r.inputs.get("cidrIpv4") == "0.0.0.0/0" for r in rules)


def test_each_node_boots_with_its_rank_and_the_heads_address(run_stack):
    mocks, outputs = run_stack(ENVS / "aws-p4de-405b-bf16-2node.yaml")
    head, worker = mocks.of_type("aws:ec2/instance:Instance")
    head_ip = "10.42.0.10"       # the mocks' first private address: the head is created first
    assert "HERD_NODE_RANK=0" in head.inputs["userData"] and "--role head" in head.inputs["userData"]
    assert "--rdzv-endpoint @NODE_ADDR@:29400" in head.inputs["userData"]
    assert "HERD_NODE_RANK=1" in worker.inputs["userData"] and "--role worker" in worker.inputs["userData"]
    assert f"--rdzv-endpoint {head_ip}:29400" in worker.inputs["userData"]
    assert "--node-rank 1 " in worker.inputs["userData"] and "--node-rank 0 " in head.inputs["userData"]
    for node in (head, worker):
        assert len(node.inputs["userData"].encode()) < USER_DATA_LIMIT
        assert node.inputs["userDataReplaceOnChange"] is True
    # Each Elastic IP is allocated before its node (the head's certificate names it), then attached.
    eips = mocks.of_type("aws:ec2/eip:Eip")
    assert all("networkInterface" not in e.inputs for e in eips)
    attached = [(a.inputs["allocationId"], a.inputs["networkInterfaceId"])
                for a in mocks.of_type("aws:ec2/eipAssociation:EipAssociation")]
    assert attached == [("eipalloc-10", "eni-10"), ("eipalloc-11", "eni-11")]
    assert outputs["endpoint"] == f"https://{outputs['node_addresses'][0]}:8000"
    assert outputs["head_address"] == outputs["node_addresses"][0] and len(outputs["node_addresses"]) == 2
    assert outputs["ssh"] == [f"ssh ubuntu@{ip}" for ip in outputs["node_addresses"]]
    assert outputs["smoke"] == (f"herd smoke --endpoint {outputs['endpoint']} --ca-file {outputs['ca_file']} "
                                "--api-key-env HERD_API_KEY")
    # Only the head serves HTTPS: only it reads the certificate and key, and its serve has them.
    assert "fetch_secret tls-key" in head.inputs["userData"] and "tls-key" not in worker.inputs["userData"]
    assert "--tls-certfile /opt/herd/secrets/tls-cert --tls-keyfile /opt/herd/secrets/tls-key" \
        in head.inputs["userData"]
    assert outputs["plan"]["nodes"] == 2 and outputs["plan"]["cost_usd_per_hour"] == pytest.approx(2 * 27.45)


def test_the_api_key_is_a_secret_securestring_and_nowhere_in_the_clear(run_stack):
    mocks, _ = run_stack(ENVS / "aws-p5-405b-fp8.yaml")
    (param,) = [p for p in mocks.of_type("aws:ssm/parameter:Parameter") if p.name.endswith("-api-key")]
    assert param.inputs["type"] == "SecureString" and is_secret(param.inputs["value"])
    assert param.inputs["value"]["value"] == API_KEY
    for resource in mocks.resources:
        assert API_KEY not in plain_text(resource.inputs), resource.name
    (node,) = mocks.of_type("aws:ec2/instance:Instance")
    assert f"--name {param.inputs['name']} --with-decryption" in node.inputs["userData"]
    key = mocks.one("aws:kms/key:Key")
    assert param.inputs["keyId"] == f"arn:aws:kms:us-east-1:123456789012:key/{key.name}-0c5e"
    assert param.inputs["name"].startswith("/herd/aws-p5-405b-fp8/")


def parameters(mocks) -> dict[str, dict]:
    """The SSM parameters the program creates, by their name's last part (api-key, tls-cert, ...)."""
    return {p.inputs["name"].rsplit("/", 1)[1]: p.inputs for p in mocks.of_type("aws:ssm/parameter:Parameter")}


def test_the_endpoint_is_https_with_a_certificate_for_the_heads_address_from_the_deployment_ca(
        run_stack, deployment_state):
    mocks, outputs = run_stack(ENVS / "aws-p5-405b-fp8.yaml")
    ip = outputs["head_address"]
    assert outputs["endpoint"] == f"https://{ip}:8000"
    params = parameters(mocks)
    for file in ("tls-cert", "tls-key"):
        assert params[file]["type"] == "SecureString" and is_secret(params[file]["value"])
        assert params[file]["name"] == f"/herd/aws-p5-405b-fp8/{file}"    # under the path the nodes may read
    cert = x509.load_pem_x509_certificate(params["tls-cert"]["value"]["value"].encode())
    sans = {str(n.value) for n in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value}
    assert {ip, f"ec2-{ip.replace('.', '-')}.compute-1.amazonaws.com", "127.0.0.1", "localhost"} <= sans
    # Signed by the deployment CA, which stays on this machine (its key 0600) and is what clients pin.
    tls_dir = deployment_state / "aws-p5-405b-fp8" / "tls"
    assert outputs["ca_file"] == str(tls_dir / "ca.pem")
    ca = x509.load_pem_x509_certificate((tls_dir / "ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert stat.S_IMODE((tls_dir / "ca.key").stat().st_mode) == 0o600
    assert outputs["ca_fingerprint"] == fingerprint(tls_dir / "ca.pem")
    assert outputs["ca_certificate"] == (tls_dir / "ca.pem").read_text()
    key = params["tls-key"]["value"]["value"]
    ca_key = (tls_dir / "ca.key").read_text()
    for resource in mocks.resources:
        assert key not in plain_text(resource.inputs) and "PRIVATE KEY" not in plain_text(resource.inputs)
    assert ca_key not in json.dumps(outputs)
    # A second run (pulumi up again) keeps the CA and the certificate: nothing churns on the node.
    mocks_again, outputs_again = run_stack(ENVS / "aws-p5-405b-fp8.yaml")
    assert outputs_again["ca_fingerprint"] == outputs["ca_fingerprint"]
    assert parameters(mocks_again)["tls-cert"]["value"] == params["tls-cert"]["value"]


def test_certificate_parameters_the_spec_names_are_read_by_the_head_and_granted_by_arn(run_stack, tmp_path):
    base = yaml.safe_load((ENVS / "aws-p5-405b-fp8.yaml").read_text())
    env = write_env(tmp_path, "own-cert", base, serving={"tls": {"cert": "ssm:/team/tls/cert",
                                                                 "key": "ssm:/team/tls/key"}})
    mocks, outputs = run_stack(env)
    assert set(parameters(mocks)) == {"api-key"}          # herd makes no certificate of its own
    (node,) = mocks.of_type("aws:ec2/instance:Instance")
    assert "--name /team/tls/cert --with-decryption" in node.inputs["userData"]
    assert "--name /team/tls/key --with-decryption" in node.inputs["userData"]
    assert node_policy(mocks)["Secrets"]["Resource"] == [
        "arn:aws:ssm:us-east-1:123456789012:parameter/herd/own-cert/*",
        "arn:aws:ssm:us-east-1:123456789012:parameter/team/tls/cert",
        "arn:aws:ssm:us-east-1:123456789012:parameter/team/tls/key"]
    assert outputs["endpoint"].startswith("https://") and "ca_file" not in outputs   # the system's trust store


def test_a_named_certificate_file_that_is_missing_stops_the_program_naming_it(run_stack, tmp_path):
    base = yaml.safe_load((ENVS / "aws-p5-405b-fp8.yaml").read_text())
    env = write_env(tmp_path, "lost-cert", base, serving={"tls": {"cert": str(tmp_path / "gone.pem"),
                                                                  "key": str(tmp_path / "gone.key")}})
    with pytest.raises(pulumi.RunError, match=rf"serving.tls.cert: '{tmp_path}/gone.pem': no such file"):
        run_stack(env)


def node_policy(mocks) -> dict[str, dict]:
    """The node role's one inline policy, as the JSON the program passes, by statement id."""
    document = json.loads(mocks.one("aws:iam/rolePolicy:RolePolicy").inputs["policy"])
    assert document["Version"] == "2012-10-17"
    return {st["Sid"]: st for st in document["Statement"]}


def test_the_node_role_reads_only_this_deployments_parameters_buckets_and_key(run_stack):
    mocks, _ = run_stack(ENVS / "aws-p5-405b-fp8.yaml")
    statements = node_policy(mocks)
    artifacts = mocks.one("aws:s3/bucket:Bucket").name
    key_arn = f"arn:aws:kms:us-east-1:123456789012:key/{mocks.one('aws:kms/key:Key').name}-0c5e"
    assert statements == {
        "Bundle": {"Sid": "Bundle", "Effect": "Allow", "Action": ["s3:GetObject"],
                   "Resource": [f"arn:aws:s3:::{artifacts}-4f2a/herd/*"]},
        "DeploymentKey": {"Sid": "DeploymentKey", "Effect": "Allow", "Action": ["kms:Decrypt"],
                          "Resource": [key_arn],
                          "Condition": {"StringEquals": {"kms:ViaService": ["ssm.us-east-1.amazonaws.com",
                                                                            "s3.us-east-1.amazonaws.com"]}}},
        "WeightsList": {"Sid": "WeightsList", "Effect": "Allow", "Action": ["s3:ListBucket"],
                        "Resource": ["arn:aws:s3:::my-weights-bucket"]},
        "WeightsRead": {"Sid": "WeightsRead", "Effect": "Allow", "Action": ["s3:GetObject"],
                        "Resource": ["arn:aws:s3:::my-weights-bucket/*"]},
        "Secrets": {"Sid": "Secrets", "Effect": "Allow", "Action": ["ssm:GetParameter"],
                    "Resource": ["arn:aws:ssm:us-east-1:123456789012:parameter/herd/aws-p5-405b-fp8/*"]},
    }
    # No managed policy at all (AmazonSSMManagedInstanceCore read every parameter of the account).
    assert mocks.of_type("aws:iam/rolePolicyAttachment:RolePolicyAttachment") == []
    assert "managedPolicyArns" not in mocks.one("aws:iam/role:Role").inputs
    # What the key protects: the secrets (above) and the bundle bucket's objects.
    sse = mocks.one("aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration")
    assert sse.inputs["rules"][0]["applyServerSideEncryptionByDefault"] == {"sseAlgorithm": "aws:kms",
                                                                           "kmsMasterKeyId": key_arn}
    assert mocks.one("aws:s3/bucketObjectv2:BucketObjectv2").inputs["kmsKeyId"] == key_arn
    assert mocks.one("aws:kms/key:Key").inputs["enableKeyRotation"] is True


def test_session_manager_is_off_by_default_and_minimal_when_the_stack_asks(run_stack):
    mocks, _ = run_stack(ENVS / "aws-p5-405b-fp8.yaml")
    assert "SessionManager" not in node_policy(mocks)
    assert not any(a.startswith(("ssmmessages:", "ec2messages:")) for st in node_policy(mocks).values()
                   for a in st["Action"])
    mocks, _ = run_stack(ENVS / "aws-p5-405b-fp8.yaml", config={"herd:sessionManager": "true"})
    statements = node_policy(mocks)
    assert statements["SessionManager"] == {
        "Sid": "SessionManager", "Effect": "Allow", "Resource": "*",
        "Action": ["ssm:UpdateInstanceInformation", "ssmmessages:CreateControlChannel",
                   "ssmmessages:CreateDataChannel", "ssmmessages:OpenControlChannel",
                   "ssmmessages:OpenDataChannel"]}
    # Sessions do not bring back the account-wide parameter reads.
    assert statements["Secrets"]["Resource"] == ["arn:aws:ssm:us-east-1:123456789012:parameter/herd/aws-p5-405b-fp8/*"]
    assert mocks.of_type("aws:iam/rolePolicyAttachment:RolePolicyAttachment") == []


def test_weights_in_another_bucket_than_weights_bucket_are_readable_too(run_stack, tmp_path):
    base = yaml.safe_load((ENVS / "aws-p5-405b-fp8.yaml").read_text())
    env = write_env(tmp_path, "two-buckets", base, model={"source": "s3://team-models/llama-405b-fp8"})
    statements = node_policy(run_stack(env)[0])
    assert statements["WeightsList"]["Resource"] == ["arn:aws:s3:::my-weights-bucket", "arn:aws:s3:::team-models"]
    assert statements["WeightsRead"]["Resource"] == ["arn:aws:s3:::my-weights-bucket/*", "arn:aws:s3:::team-models/*"]
    del base["aws"]["weights_bucket"]
    statements = node_policy(run_stack(write_env(tmp_path, "source-only", base))[0])
    assert statements["WeightsRead"]["Resource"] == ["arn:aws:s3:::my-weights-bucket/*"]


def test_the_zone_is_one_that_offers_the_type(run_stack, tmp_path):
    base = yaml.safe_load((ENVS / "aws-p5-405b-fp8.yaml").read_text())
    mocks, _ = run_stack(ENVS / "aws-p5-405b-fp8.yaml", mocks=CloudMocks(offered_zones=["us-east-1f", "us-east-1c"]))
    assert mocks.one("aws:ec2/subnet:Subnet").inputs["availabilityZone"] == "us-east-1c"
    env = write_env(tmp_path, "wrong-zone", base, aws={"availability_zones": ["us-east-1a"]})
    with pytest.raises(pulumi.RunError, match=r"aws.availability_zones: \['us-east-1a'\]: p5.48xlarge is offered "
                                              r"only in \['us-east-1c', 'us-east-1f'\]"):
        run_stack(env, mocks=CloudMocks(offered_zones=["us-east-1f", "us-east-1c"]))


def test_an_existing_subnet_is_used_when_its_zone_offers_the_type(run_stack, tmp_path):
    base = yaml.safe_load((ENVS / "aws-p5-405b-fp8.yaml").read_text())
    mocks, _ = run_stack(write_env(tmp_path, "mine", base, aws={"subnet_id": "subnet-0east1b"}))
    assert mocks.of_type("aws:ec2/vpc:Vpc") == [] and mocks.of_type("aws:ec2/subnet:Subnet") == []
    assert mocks.one("aws:ec2/securityGroup:SecurityGroup").inputs["vpcId"] == "vpc-0existing"
    nics = mocks.one("aws:ec2/launchTemplate:LaunchTemplate").inputs["networkInterfaces"]
    assert {n["subnetId"] for n in nics} == {"subnet-0east1b"}
    with pytest.raises(pulumi.RunError, match=r"aws.subnet_id: 'subnet-0east1z' \(its zone\): \['us-east-1z'\]: "
                                              r"p5.48xlarge is offered only in \['us-east-1a'"):
        run_stack(write_env(tmp_path, "elsewhere", base, aws={"subnet_id": "subnet-0east1z"}))


def test_spot_and_capacity_blocks_set_the_market(run_stack, tmp_path):
    base = yaml.safe_load((ENVS / "aws-p5-405b-fp8.yaml").read_text())
    mocks, _ = run_stack(write_env(tmp_path, "spot", base, aws={"spot": True}))
    template = mocks.one("aws:ec2/launchTemplate:LaunchTemplate").inputs
    assert template["instanceMarketOptions"]["marketType"] == "spot"
    assert "capacityReservationSpecification" not in template
    mocks, _ = run_stack(write_env(tmp_path, "block", base, aws={"capacity_reservation_id": "cr-0abc",
                                                                 "capacity_block": True}))
    template = mocks.one("aws:ec2/launchTemplate:LaunchTemplate").inputs
    assert template["instanceMarketOptions"] == {"marketType": "capacity-block"}
    assert template["capacityReservationSpecification"] == {
        "capacityReservationTarget": {"capacityReservationId": "cr-0abc"}}


def test_a_missing_api_key_stops_the_program_with_the_command_to_set_it(run_stack, monkeypatch):
    monkeypatch.delenv("HERD_API_KEY")
    with pytest.raises(pulumi.RunError, match=r"herd:apiKey: not set: run `pulumi config set --secret herd:apiKey` "
                                              r"or export HERD_API_KEY"):
        run_stack(ENVS / "aws-p5-405b-fp8.yaml")


def test_an_environment_that_does_not_fit_creates_nothing(run_stack, tmp_path):
    base = yaml.safe_load((ENVS / "aws-p5-405b-fp8.yaml").read_text())
    env = write_env(tmp_path, "bf16-one-p5", base, model={"quantization": "none"}, parallelism={"nodes": 1})
    mocks = CloudMocks()
    with pytest.raises(pulumi.RunError, match="the plan does not fit, nothing is created"):
        run_stack(env, mocks=mocks)
    assert mocks.resources == []
