"""The cluster rules (infra/policy.py): every shipped cloud environment passes them, each rule catches
what it is for, and the CrossGuard pack enforces the same rules."""
from __future__ import annotations

import copy
import json

import pytest
import yaml

from infra.policy import RULES, STACK_RULES, crossguard_policies, violations
from infra.stacks import stack_name
from runtime.planning.spec import load_spec
from tests.conftest import ROOT
from tests.infra.conftest import write_env

CLOUD_ENVS = sorted(p for p in (ROOT / "environments").glob("*.yaml") if load_spec(p).target in ("aws", "gcp"))


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("HERD_API_KEY", "sk-policy-test")


def triples(mocks, outputs=None, env=None):
    """The stack as the rules see it: every resource, and (as CrossGuard shows them) the stack's
    outputs as the properties of its pulumi:pulumi:Stack resource."""
    found = [(r.type, r.name, r.inputs) for r in mocks.resources]
    if outputs is not None:
        found.append(("pulumi:pulumi:Stack", f"herd-{stack_name(env)}", outputs))
    return found


def test_the_shipped_cloud_environments_are_all_checked():
    assert {p.stem for p in CLOUD_ENVS} >= {"aws-p5-405b-fp8", "aws-p4de-405b-bf16-2node", "gcp-a3-405b-fp8"}


@pytest.mark.parametrize("env", CLOUD_ENVS, ids=lambda p: p.stem)
def test_every_shipped_cloud_environment_passes_every_rule(run_stack, env):
    mocks, outputs = run_stack(env)
    assert len(mocks.resources) > 10
    assert violations(triples(mocks, outputs, env)) == []
    # The endpoint is served over TLS: not even the advisory https-endpoint rule has anything to say.
    assert outputs["endpoint"].startswith("https://")
    assert violations(triples(mocks, outputs, env), level="advisory") == []


def test_a_stack_with_a_wildcard_role_is_rejected(run_stack):
    env = ROOT / "environments" / "aws-p5-405b-fp8.yaml"
    mocks, outputs = run_stack(env)
    stack = triples(mocks, outputs, env)
    for resource, wildcard in (("Resource", "*"), ("Action", "*"), ("Action", "s3:*")):
        widened = copy.deepcopy(stack)
        (policy,) = [props for typ, _, props in widened if typ == "aws:iam/rolePolicy:RolePolicy"]
        document = json.loads(policy["policy"])
        document["Statement"][0][resource] = wildcard
        policy["policy"] = json.dumps(document)
        found = violations(widened)
        assert len(found) == 1 and found[0].startswith("least-privilege: aws:iam/rolePolicy:RolePolicy "), found
        assert f"{resource} '{wildcard}'" in found[0]
    attached = stack + [("aws:iam/rolePolicyAttachment:RolePolicyAttachment", "core",
                         {"role": "r", "policyArn": "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"})]
    assert [v.split(":")[0] for v in violations(attached)] == ["least-privilege"]


def test_a_gcp_stack_with_a_project_wide_grant_is_rejected(run_stack):
    env = ROOT / "environments" / "gcp-a3-405b-fp8.yaml"
    mocks, outputs = run_stack(env)
    stack = triples(mocks, outputs, env)
    member = "serviceAccount:herd-gcp-a3-405b-fp8@my-project.iam.gserviceaccount.com"
    wide = stack + [("gcp:projects/iAMMember:IAMMember", "read-all",
                     {"project": "my-project", "role": "roles/storage.objectViewer", "member": member})]
    assert violations(wide) == ["least-privilege: gcp:projects/iAMMember:IAMMember read-all: "
                                "'roles/storage.objectViewer' granted on the whole project: bind it on the "
                                "bucket or secret it is for"]
    logs = stack + [("gcp:projects/iAMMember:IAMMember", "logs",
                     {"project": "my-project", "role": "roles/logging.logWriter", "member": member})]
    assert violations(logs) == []


def test_session_manager_channels_are_the_only_actions_allowed_on_every_resource():
    channel = ["ssm:UpdateInstanceInformation", "ssmmessages:CreateControlChannel", "ssmmessages:OpenDataChannel"]
    ok = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": channel, "Resource": "*"}]}
    assert violations([("aws:iam/rolePolicy:RolePolicy", "sm", {"policy": json.dumps(ok)})]) == []
    ok["Statement"][0]["Action"] = channel + ["ssm:GetParameter"]
    found = violations([("aws:iam/rolePolicy:RolePolicy", "sm", {"policy": json.dumps(ok)})])
    assert found == ["least-privilege: aws:iam/rolePolicy:RolePolicy sm: statement 0: Resource '*' for "
                     "ssm:GetParameter; name the resources"]
    deny = {"Statement": {"Effect": "Deny", "Action": "*", "Resource": "*"}}
    assert violations([("aws:iam/policy:Policy", "guard", {"policy": json.dumps(deny)})]) == []


def test_plain_http_listeners_fail_unless_they_only_redirect_to_https():
    forward = [{"type": "forward", "targetGroupArn": "tg"}]
    redirect = [{"type": "redirect", "redirect": {"protocol": "HTTPS", "port": "443", "statusCode": "HTTP_301"}}]
    https = ("aws:lb/listener:Listener", "https", {"arn": "l-443", "protocol": "HTTPS", "port": 443,
                                                   "defaultActions": forward})
    assert violations([https, ("aws:lb/listener:Listener", "to-https",
                               {"arn": "l-80", "protocol": "HTTP", "port": 80, "defaultActions": redirect})]) == []
    found = violations([https, ("aws:alb/listener:Listener", "plain",
                                {"arn": "l-80", "protocol": "HTTP", "port": 80, "defaultActions": forward})])
    assert found == ["no-plain-http-listener: plain: listener on plain HTTP port 80 serves traffic; listen on "
                     "HTTPS and only redirect HTTP to it"]
    sneaky = [("aws:lb/listener:Listener", "to-https", {"arn": "l-80", "protocol": "HTTP", "port": 80,
                                                         "defaultActions": redirect}),
              ("aws:lb/listenerRule:ListenerRule", "api", {"listenerArn": "l-80", "actions": forward})]
    assert [v.split(":")[0] for v in violations(sneaky)] == ["no-plain-http-listener"]
    redirect_map = ("gcp:compute/uRLMap:URLMap", "redirect", {"name": "redirect-map",
                                                              "defaultUrlRedirect": {"httpsRedirect": True}})
    serving_map = ("gcp:compute/uRLMap:URLMap", "serve", {"name": "serve-map", "defaultService": "backend"})
    proxy = ("gcp:compute/targetHttpProxy:TargetHttpProxy", "http-proxy",
             {"urlMap": "projects/p/global/urlMaps/redirect-map"})
    assert violations([redirect_map, serving_map, proxy]) == []
    serving = ("gcp:compute/targetHttpProxy:TargetHttpProxy", "http-proxy",
               {"urlMap": "projects/p/global/urlMaps/serve-map"})
    assert [v.split(":")[0] for v in violations([redirect_map, serving_map, serving])] == ["no-plain-http-listener"]


def test_an_https_endpoint_output_needs_no_advisory():
    stack = [("pulumi:pulumi:Stack", "herd-x", {"endpoint": "https://api.example.com/v1",
                                                "smoke": "herd smoke --endpoint http://10.0.0.1:8000"}),
             ("herd:aws:Cluster", "x", {"endpoint": "https://api.example.com/v1"})]
    assert violations(stack) == [] and violations(stack, level="advisory") == []
    plain = [("herd:gcp:Cluster", "x", {"endpoint": "http://203.0.113.10:8000", "node_addresses": ["203.0.113.10"]})]
    assert violations(plain, level="advisory") == [
        "https-endpoint: x: output endpoint is plain HTTP (http://203.0.113.10:8000): serve it over TLS"]


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
    ("least-privilege", "aws:iam/rolePolicy:RolePolicy",
     {"policy": json.dumps({"Statement": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"}]})}),
    ("least-privilege", "aws:iam/policy:Policy",
     {"policy": {"Statement": [{"Effect": "Allow", "Action": "*", "Resource": "arn:aws:s3:::b"}]}}),
    ("least-privilege", "aws:iam/rolePolicy:RolePolicy",
     {"policy": json.dumps({"Statement": {"Effect": "Allow", "NotAction": "iam:*", "Resource": "arn:aws:s3:::b"}})}),
    ("least-privilege", "aws:iam/role:Role",
     {"managedPolicyArns": ["arn:aws:iam::aws:policy/AdministratorAccess"]}),
    ("least-privilege", "aws:iam/role:Role",
     {"inlinePolicies": [{"name": "x", "policy": json.dumps(
         {"Statement": [{"Effect": "Allow", "Action": "kms:Decrypt", "Resource": "*"}]})}]}),
    ("least-privilege", "aws:iam/rolePolicyAttachment:RolePolicyAttachment",
     {"role": "r", "policyArn": "arn:aws:iam::aws:policy/AmazonS3FullAccess"}),
    ("least-privilege", "gcp:projects/iAMMember:IAMMember",
     {"project": "p", "role": "roles/secretmanager.secretAccessor", "member": "serviceAccount:a@p.iam"}),
    ("least-privilege", "gcp:projects/iAMBinding:IAMBinding", {"project": "p", "role": "roles/editor", "members": []}),
    ("least-privilege", "gcp:projects/iAMPolicy:IAMPolicy",
     {"project": "p", "policyData": json.dumps({"bindings": [{"role": "roles/owner", "members": ["user:a@b"]}]})}),
    ("least-privilege", "gcp:storage/bucketIAMMember:BucketIAMMember",
     {"bucket": "b", "role": "roles/editor", "member": "serviceAccount:a@p.iam"}),
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
    assert set(policies) == {rule.name for rule in RULES + STACK_RULES}
    for rule in RULES + STACK_RULES:
        assert policies[rule.name].enforcement_level.value == rule.level
    assert {r.name for r in RULES + STACK_RULES if r.level == "advisory"} == {"https-endpoint"}
    for rule, typ, props in BAD:
        reported = []
        policies[rule].validate(ResourceArgs(typ, props), reported.append)
        assert reported, rule
    open_ingress = ResourceArgs("gcp:compute/firewall:Firewall", {"sourceRanges": ["0.0.0.0/0"]},
                                {"openCidrs": ["0.0.0.0/0"]})
    reported = []
    policies["no-world-ingress"].validate(open_ingress, reported.append)
    assert reported == []


class PolicyResource:
    """What CrossGuard hands a stack validation policy for each resource."""
    def __init__(self, resource_type, name, props):
        self.resource_type, self.name, self.props = resource_type, name, props
        self.urn = f"urn:pulumi:s::herd::{resource_type}::{name}"


class StackArgs:
    def __init__(self, resources, config=None):
        self.resources, self._config = resources, config or {}

    def get_config(self):
        return self._config


def test_the_crossguard_stack_policies_see_listeners_and_outputs():
    policies = {p.name: p for p in crossguard_policies()}
    resources = [PolicyResource("aws:lb/listener:Listener", "plain",
                                {"arn": "l", "protocol": "HTTP", "port": 80, "defaultActions": [{"type": "forward"}]}),
                 PolicyResource("pulumi:pulumi:Stack", "herd-x", {"endpoint": "http://198.51.100.7:8000"})]
    reported = []
    policies["no-plain-http-listener"].validate(StackArgs(resources), lambda *a: reported.append(a))
    assert reported == [("plain: listener on plain HTTP port 80 serves traffic; listen on HTTPS and only "
                         "redirect HTTP to it", "urn:pulumi:s::herd::aws:lb/listener:Listener::plain")]
    reported = []
    policies["https-endpoint"].validate(StackArgs(resources), lambda *a: reported.append(a))
    assert reported == [("herd-x: output endpoint is plain HTTP (http://198.51.100.7:8000): serve it over TLS",
                         "urn:pulumi:s::herd::pulumi:pulumi:Stack::herd-x")]
