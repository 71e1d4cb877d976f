"""The cluster rules (infra/policy.py): every shipped cloud environment passes them, each rule catches
what it is for, and the CrossGuard pack enforces the same rules."""
from __future__ import annotations

import pytest
import yaml

from infra.policy import RULES, crossguard_policies, violations
from runtime.spec import load_spec
from tests.conftest import ROOT
from tests.infra.conftest import write_env

CLOUD_ENVS = sorted(p for p in (ROOT / "environments").glob("*.yaml") if load_spec(p).target in ("aws", "gcp"))


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("HERD_API_KEY", "sk-policy-test")


def triples(mocks):
    return [(r.type, r.name, r.inputs) for r in mocks.resources]


def test_the_shipped_cloud_environments_are_all_checked():
    assert {p.stem for p in CLOUD_ENVS} >= {"aws-p5-405b-fp8", "aws-p4de-405b-bf16-2node", "gcp-a3-405b-fp8"}


@pytest.mark.parametrize("env", CLOUD_ENVS, ids=lambda p: p.stem)
def test_every_shipped_cloud_environment_passes_every_rule(run_stack, env):
    mocks, _ = run_stack(env)
    assert len(mocks.resources) > 10
    assert violations(triples(mocks)) == []


def test_an_environment_that_names_the_world_may_open_to_it_and_no_other(run_stack, tmp_path):
    base = yaml.safe_load((ROOT / "environments" / "aws-p5-405b-fp8.yaml").read_text())
    mocks, _ = run_stack(write_env(tmp_path, "open", base, aws={"allowed_cidrs": ["0.0.0.0/0"]}))
    found = violations(triples(mocks))
    assert len(found) == 2 and all(v.startswith("no-world-ingress:") for v in found)
    assert violations(triples(mocks), open_cidrs=frozenset({"0.0.0.0/0"})) == []


BAD = [
    ("no-world-ingress", "gcp:compute/firewall:Firewall", {"direction": "INGRESS", "sourceRanges": ["0.0.0.0/0"]}),
    ("no-world-ingress", "aws:ec2/securityGroup:SecurityGroup", {"ingress": [{"cidrBlocks": ["0.0.0.0/0"]}]}),
    ("imdsv2-required", "aws:ec2/launchTemplate:LaunchTemplate", {"metadataOptions": {"httpTokens": "optional"}}),
    ("imdsv2-required", "aws:ec2/instance:Instance", {}),
    ("encrypted-volumes", "aws:ec2/launchTemplate:LaunchTemplate",
     {"metadataOptions": {"httpTokens": "required"},
      "blockDeviceMappings": [{"deviceName": "/dev/sda1", "ebs": {"volumeSize": 500}}]}),
    ("efa-layout", "aws:ec2/launchTemplate:LaunchTemplate",
     {"instanceType": "p5.48xlarge", "metadataOptions": {"httpTokens": "required"},
      "placement": {"groupName": "pg"},
      "networkInterfaces": [{"networkCardIndex": 0, "deviceIndex": 0, "interfaceType": "interface"}] +
                           [{"networkCardIndex": i, "deviceIndex": 0 if i else 1, "interfaceType": "efa-only"}
                            for i in range(4)]}),
    ("efa-layout", "aws:ec2/launchTemplate:LaunchTemplate",
     {"instanceType": "p4d.24xlarge", "metadataOptions": {"httpTokens": "required"},
      "networkInterfaces": [{"networkCardIndex": 0, "deviceIndex": 0, "interfaceType": "interface"}] +
                           [{"networkCardIndex": i, "deviceIndex": 0 if i else 1, "interfaceType": "efa-only"}
                            for i in range(4)]}),
    ("gpu-terminate-on-maintenance", "gcp:compute/instance:Instance",
     {"guestAccelerators": [{"type": "nvidia-h100-80gb", "count": 8}],
      "scheduling": {"onHostMaintenance": "MIGRATE"}}),
    ("secrets-encrypted", "aws:ssm/parameter:Parameter", {"name": "/herd/x/api-key", "type": "String"}),
    ("private-buckets", "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock", {"blockPublicAcls": True}),
    ("private-buckets", "gcp:storage/bucket:Bucket", {"uniformBucketLevelAccess": True}),
]


@pytest.mark.parametrize("rule,typ,props", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_each_rule_catches_what_it_is_for_and_nothing_else_fires(rule, typ, props):
    found = violations([(typ, "bad", props)])
    assert found and {v.split(":")[0] for v in found} == {rule}, found


class ResourceArgs:
    """What CrossGuard hands a resource validation policy."""
    def __init__(self, resource_type, props, config=None):
        self.resource_type, self.props, self._config = resource_type, props, config or {}

    def get_config(self):
        return self._config


def test_the_crossguard_pack_enforces_the_same_rules():
    policies = {p.name: p for p in crossguard_policies()}
    assert set(policies) == {rule.name for rule in RULES}
    assert all(p.enforcement_level.value == "mandatory" for p in policies.values())
    for rule, typ, props in BAD:
        reported = []
        policies[rule].validate(ResourceArgs(typ, props), reported.append)
        assert reported, rule
    open_ingress = ResourceArgs("gcp:compute/firewall:Firewall", {"sourceRanges": ["0.0.0.0/0"]},
                                {"openCidrs": ["0.0.0.0/0"]})
    reported = []
    policies["no-world-ingress"].validate(open_ingress, reported.append)
    assert reported == []
