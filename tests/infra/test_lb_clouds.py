"""Replicas on the clouds behind the clouds' own load balancers (Pulumi mocks): health checked on
/health/ready, HTTPS listeners, generation-long timeouts, draining, and the nodes' API port reachable
from the load balancer only."""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field

import pulumi
import pytest
import yaml

from infra.load_balancer import DETECTION_S, GCP_FRONT_END_RANGES
from infra.policy import violations
from infra.rollout_gate import ROLLOUT_TAG
from tests.conftest import ROOT
from tests.infra.conftest import ZONES, CloudMocks, is_secret, plain_text, write_env

ENVS = ROOT / "environments"
API_KEY = "sk-herd-test-lb-51c0"
ACM_ARN = "arn:aws:acm:us-east-1:123456789012:certificate/0d1e2f3a-4b5c-6d7e-8f90-a1b2c3d4e5f6"
CERT_PEM = "-----BEGIN CERTIFICATE-----\nMIIBtest\n-----END CERTIFICATE-----\n"
KEY_PEM = "-----BEGIN PRIVATE KEY-----\nMIGHsecretkeymaterial\n-----END PRIVATE KEY-----\n"
LB_DNS = "herd-lb-1234567890.us-east-1.elb.amazonaws.com"
GCP_LB_IP = "34.117.0.42"


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("HERD_API_KEY", API_KEY)


@dataclass
class LbMocks(CloudMocks):
    """CloudMocks, plus what the providers fill in for load balancers, and every resource's state."""
    region_zones: list[str] = field(default_factory=lambda: [*ZONES, "us-east-1f"])
    states: dict = field(default_factory=dict)

    def new_resource(self, args: pulumi.runtime.MockResourceArgs):
        rid, state = super().new_resource(args)
        if args.typ == "aws:lb/loadBalancer:LoadBalancer":
            state.update(dnsName=LB_DNS, arn=f"arn:aws:elasticloadbalancing:us-east-1:123456789012:loadbalancer/app/{args.name}")
        elif args.typ == "aws:lb/targetGroup:TargetGroup":
            state["arn"] = f"arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/{args.name}"
        elif args.typ == "aws:acm/certificate:Certificate":
            state["arn"] = f"arn:aws:acm:us-east-1:123456789012:certificate/{args.name}"
        elif args.typ in ("gcp:compute/instance:Instance", "gcp:compute/instanceGroup:InstanceGroup"):
            state["selfLink"] = f"https://www.googleapis.com/compute/v1/projects/my-project/zones/us-central1-a/x/{args.name}"
            state.setdefault("name", args.name)
        elif args.typ == "gcp:compute/backendService:BackendService":
            state.setdefault("name", args.name)
        elif args.typ == "gcp:compute/globalAddress:GlobalAddress":
            state["address"] = GCP_LB_IP
        self.states[args.name] = state
        return rid, state

    def call(self, args: pulumi.runtime.MockCallArgs):
        if args.token == "aws:index/getAvailabilityZones:getAvailabilityZones":
            self.calls.append((args.token, dict(args.args)))
            return {"id": "us-east-1", "names": self.region_zones, "zoneIds": [f"use1-az{i}" for i, _ in
                                                                              enumerate(self.region_zones)]}
        return super().call(args)


def env_with(tmp_path, base_name: str, name: str, **sections):
    base = yaml.safe_load((ENVS / f"{base_name}.yaml").read_text())
    return write_env(tmp_path, name, base, **sections)


def by_name(mocks, typ: str) -> dict:
    return {r.name: r.inputs for r in mocks.of_type(typ)}


def policy_findings(mocks, outputs, level: str) -> list[str]:
    triples = [(r.type, r.name, r.inputs) for r in mocks.resources]
    return violations([*triples, ("pulumi:pulumi:Stack", "stack", outputs)], level=level)


# ------------------------------------------------------------------ AWS
def aws_two_groups(run_stack, tmp_path, config=None, **sections):
    env = env_with(tmp_path, "aws-p4de-405b-bf16-2node", "aws-x2", replicas=2, **sections)
    return run_stack(env, config=config if config is not None else {"herd:certificateArn": ACM_ARN},
                     mocks=LbMocks())


def test_aws_two_groups_of_two_nodes_each_rendezvous_at_their_own_head(run_stack, tmp_path):
    mocks, outputs = aws_two_groups(run_stack, tmp_path)
    nodes = by_name(mocks, "aws:ec2/instance:Instance")
    assert sorted(nodes) == ["aws-x2-node-0", "aws-x2-node-1", "aws-x2-r1-node-0", "aws-x2-r1-node-1"]
    assert nodes["aws-x2-r1-node-0"]["tags"]["herd:replica"] == "1"
    for worker, head in (("aws-x2-node-1", "aws-x2-node-0"), ("aws-x2-r1-node-1", "aws-x2-r1-node-0")):
        head_ip = mocks.states[head]["privateIp"]
        assert f"--rdzv-endpoint {head_ip}:29400" in nodes[worker]["userData"], worker
        assert "--role worker" in nodes[worker]["userData"] and "--role head" in nodes[head]["userData"]
    assert len(outputs["node_addresses"]) == 4
    assert outputs["endpoint"] == f"https://{LB_DNS}"


def test_aws_target_group_checks_readiness_and_drops_a_dead_group_within_15_s(run_stack, tmp_path):
    mocks, _ = aws_two_groups(run_stack, tmp_path)
    group = mocks.one("aws:lb/targetGroup:TargetGroup").inputs
    check = group["healthCheck"]
    # The heads bind every address, so they serve TLS only: the balancer must speak HTTPS to them, for
    # requests and health checks alike (test_lb_twin.py runs this against a real head).
    assert "--tls-certfile" in by_name(mocks, "aws:ec2/instance:Instance")["aws-x2-node-0"]["userData"]
    assert (check["path"], check["matcher"], check["protocol"], check["port"]) == \
        ("/health/ready", "200", "HTTPS", "traffic-port")
    # Out after unhealthy_threshold failed checks, each up to `timeout` late.
    assert check["unhealthyThreshold"] * check["interval"] + check["timeout"] == DETECTION_S <= 15
    assert check["timeout"] < check["interval"] and check["healthyThreshold"] == 2
    assert (group["port"], group["protocol"], group["targetType"]) == (8000, "HTTPS", "instance")
    assert group["loadBalancingAlgorithmType"] == "least_outstanding_requests"
    assert group["deregistrationDelay"] >= 600           # a group being replaced finishes long generations
    attachments = mocks.of_type("aws:lb/targetGroupAttachment:TargetGroupAttachment")
    assert sorted(a.inputs["targetId"] for a in attachments) == ["aws-x2-node-0-id", "aws-x2-r1-node-0-id"]
    assert {a.inputs["port"] for a in attachments} == {8000}


def test_aws_alb_listens_on_https_with_a_long_idle_timeout_in_two_zones(run_stack, tmp_path):
    mocks, _ = aws_two_groups(run_stack, tmp_path)
    alb = mocks.one("aws:lb/loadBalancer:LoadBalancer").inputs
    assert alb["loadBalancerType"] == "application" and alb["internal"] is False
    assert alb["idleTimeout"] >= 600 and alb["dropInvalidHeaderFields"] is True   # default 60 s cuts generations
    subnets = by_name(mocks, "aws:ec2/subnet:Subnet")
    assert sorted(alb["subnets"]) == sorted(f"{n}-id" for n in subnets)
    assert subnets["aws-x2-subnet"]["availabilityZone"] != subnets["aws-x2-lb-subnet"]["availabilityZone"]
    routes = mocks.of_type("aws:ec2/routeTableAssociation:RouteTableAssociation")
    assert {r.inputs["subnetId"] for r in routes} == {"aws-x2-subnet-id", "aws-x2-lb-subnet-id"}
    (listener,) = [r.inputs for r in mocks.of_type("aws:lb/listener:Listener")]
    assert (listener["port"], listener["protocol"], listener["certificateArn"]) == (443, "HTTPS", ACM_ARN)
    assert listener["sslPolicy"].startswith("ELBSecurityPolicy-TLS13")
    target_group = mocks.one("aws:lb/targetGroup:TargetGroup").name
    assert listener["defaultActions"] == [{"type": "forward", "targetGroupArn":
                                           f"arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/{target_group}"}]
    assert mocks.of_type("aws:acm/certificate:Certificate") == []


def test_aws_nodes_api_port_is_reachable_from_the_load_balancer_only(run_stack, tmp_path):
    mocks, _ = aws_two_groups(run_stack, tmp_path, aws={"allowed_cidrs": ["203.0.113.0/24", "198.51.100.7/32"]})
    groups = by_name(mocks, "aws:ec2/securityGroup:SecurityGroup")
    nodes_sg, lb_sg = "aws-x2-nodes-id", "aws-x2-lb-sg-id"
    assert set(groups) == {"aws-x2-nodes", "aws-x2-lb-sg"}
    ingress = [r.inputs for r in mocks.of_type("aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule")]
    to_nodes_api = [r for r in ingress if r["securityGroupId"] == nodes_sg and r.get("fromPort") == 8000]
    assert to_nodes_api == [{**to_nodes_api[0], "referencedSecurityGroupId": lb_sg}] and \
        "cidrIpv4" not in to_nodes_api[0]
    from_cidrs = sorted((r["securityGroupId"], r["cidrIpv4"], r["fromPort"]) for r in ingress if "cidrIpv4" in r)
    assert from_cidrs == sorted([(nodes_sg, c, 22) for c in ("203.0.113.0/24", "198.51.100.7/32")] +
                                [(lb_sg, c, 443) for c in ("203.0.113.0/24", "198.51.100.7/32")])
    egress = [r.inputs for r in mocks.of_type("aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule")
              if r.inputs["securityGroupId"] == lb_sg]
    assert egress == [{**egress[0], "ipProtocol": "tcp", "fromPort": 8000, "toPort": 8000,
                       "referencedSecurityGroupId": nodes_sg}]
    assert mocks.one("aws:lb/loadBalancer:LoadBalancer").inputs["securityGroups"] == [lb_sg]


def test_aws_imports_the_deployments_certificate_as_a_secret(run_stack, tmp_path):
    mocks, outputs = aws_two_groups(run_stack, tmp_path, config={"herd:tlsCertificate": CERT_PEM,
                                                                 "herd:tlsPrivateKey": KEY_PEM})
    cert = mocks.one("aws:acm/certificate:Certificate")
    assert cert.inputs["certificateBody"] == CERT_PEM and is_secret(cert.inputs["privateKey"])
    assert mocks.one("aws:lb/listener:Listener").inputs["certificateArn"] == \
        f"arn:aws:acm:us-east-1:123456789012:certificate/{cert.name}"
    for resource in mocks.resources:
        assert "MIGHsecretkeymaterial" not in plain_text(resource.inputs), resource.name
    # herd's own policies hold, and the endpoint is HTTPS now (the advisory rule passes too).
    assert policy_findings(mocks, outputs, "mandatory") == []
    assert policy_findings(mocks, outputs, "advisory") == []


def test_aws_replicas_need_a_certificate_and_herds_own_vpc(run_stack, tmp_path):
    with pytest.raises(pulumi.RunError, match="herd:certificateArn"):
        aws_two_groups(run_stack, tmp_path, config={})
    with pytest.raises(pulumi.RunError, match=r"replicas: 2 with aws.subnet_id"):
        aws_two_groups(run_stack, tmp_path, aws={"subnet_id": "subnet-0east1b"})


def test_aws_one_replica_has_no_load_balancer(run_stack):
    mocks, outputs = run_stack(ENVS / "aws-p5-405b-fp8.yaml", mocks=LbMocks())
    assert not [r for r in mocks.resources if r.type.startswith(("aws:lb/", "aws:acm/"))]
    assert outputs["endpoint"].startswith("https://")   # one group: its head serves TLS itself


# ------------------------------------------------------------------ GCP
def gcp_groups(run_stack, tmp_path, replicas=2, config=None, **sections):
    env = env_with(tmp_path, "gcp-a3-405b-fp8", f"gcp-x{replicas}", replicas=replicas, **sections)
    return run_stack(env, config=config if config is not None else {"herd:tlsCertificate": CERT_PEM,
                                                                    "herd:tlsPrivateKey": KEY_PEM},
                     mocks=LbMocks())


def test_gcp_backend_service_checks_readiness_waits_for_long_generations_and_drains(run_stack, tmp_path):
    mocks, outputs = gcp_groups(run_stack, tmp_path)
    nodes = by_name(mocks, "gcp:compute/instance:Instance")
    assert sorted(nodes) == ["gcp-x2-node-0", "gcp-x2-r1-node-0"]
    assert nodes["gcp-x2-r1-node-0"]["name"] == "gcp-x2-r1-node-0"
    groups = by_name(mocks, "gcp:compute/instanceGroup:InstanceGroup")
    members = by_name(mocks, "gcp:compute/instanceGroupMembership:InstanceGroupMembership")
    assert {m["instanceGroup"]: m["instance"] for m in members.values()} == {
        "gcp-x2-lb-replica-0": mocks.states["gcp-x2-node-0"]["selfLink"],
        "gcp-x2-lb-replica-1": mocks.states["gcp-x2-r1-node-0"]["selfLink"]}
    assert sorted(groups) == ["gcp-x2-lb-replica-0", "gcp-x2-lb-replica-1"]
    assert all(g["namedPorts"] == [{"name": "api", "port": 8000}] and g["zone"] == "us-central1-a"
               for g in groups.values())
    check = mocks.one("gcp:compute/healthCheck:HealthCheck").inputs
    # The heads serve TLS only (bound to every address): an HTTPS check, HTTPS to the backends.
    assert "--tls-certfile" in nodes["gcp-x2-node-0"]["metadata"]["startup-script"]
    assert check["httpsHealthCheck"] == {"port": 8000, "requestPath": "/health/ready"} and not check.get("httpHealthCheck")
    assert check["unhealthyThreshold"] * check["checkIntervalSec"] + check["timeoutSec"] == DETECTION_S <= 15
    service = mocks.one("gcp:compute/backendService:BackendService").inputs
    assert service["timeoutSec"] >= 600 > 30                       # GCP's default 30 s cuts generations
    assert service["connectionDrainingTimeoutSec"] >= 600
    assert (service["loadBalancingScheme"], service["protocol"], service["portName"]) == ("EXTERNAL_MANAGED", "HTTPS", "api")
    assert service["localityLbPolicy"] == "LEAST_REQUEST"
    assert service["healthChecks"] == f"{mocks.one('gcp:compute/healthCheck:HealthCheck').name}-id"
    assert sorted(b["group"] for b in service["backends"]) == sorted(mocks.states[n]["selfLink"] for n in groups)
    url_map = mocks.one("gcp:compute/uRLMap:URLMap")
    assert url_map.inputs["defaultService"] == f"{mocks.one('gcp:compute/backendService:BackendService').name}-id"
    proxy = mocks.one("gcp:compute/targetHttpsProxy:TargetHttpsProxy")
    cert = mocks.one("gcp:compute/sSLCertificate:SSLCertificate")
    assert proxy.inputs["urlMap"] == f"{url_map.name}-id" and proxy.inputs["sslCertificates"] == [f"{cert.name}-id"]
    # (the provider marks the certificate secret too)
    assert cert.inputs["certificate"]["value"] == CERT_PEM and is_secret(cert.inputs["privateKey"])
    rule = mocks.one("gcp:compute/globalForwardingRule:GlobalForwardingRule").inputs
    assert (rule["portRange"], rule["target"], rule["loadBalancingScheme"], rule["ipAddress"]) == \
        ("443", f"{proxy.name}-id", "EXTERNAL_MANAGED", GCP_LB_IP)
    assert outputs["endpoint"] == f"https://{GCP_LB_IP}"
    assert policy_findings(mocks, outputs, "mandatory") == []
    assert policy_findings(mocks, outputs, "advisory") == []


def test_gcp_api_port_is_open_to_googles_front_ends_only(run_stack, tmp_path):
    mocks, _ = gcp_groups(run_stack, tmp_path, gcp={"allowed_cidrs": ["203.0.113.0/24"]})
    rules = {r.name: r.inputs for r in mocks.of_type("gcp:compute/firewall:Firewall")}
    opened = {}
    for name, rule in rules.items():
        for allow in rule["allows"]:
            for port in allow.get("ports", ["*"]):
                opened.setdefault(port, []).append((name, sorted(rule.get("sourceRanges", []))))
    assert opened["8000"] == [("gcp-x2-lb-front-ends", sorted(GCP_FRONT_END_RANGES))]
    assert opened["22"] == [("gcp-x2-api-ssh", ["203.0.113.0/24"])]


def test_gcp_each_multi_node_replica_has_its_own_compact_placement(run_stack, tmp_path):
    mocks, _ = gcp_groups(run_stack, tmp_path, config={"herd:sslCertificate": "projects/p/global/sslCertificates/c"},
                          model={"quantization": "none", "source": "gs://my-weights-bucket/405b"},
                          parallelism={"tensor": 8, "pipeline": "auto", "nodes": "auto"},
                          gcp={"machine_type": "a2-ultragpu-8g"})
    policies = by_name(mocks, "gcp:compute/resourcePolicy:ResourcePolicy")
    assert sorted(policies) == ["gcp-x2-compact", "gcp-x2-r1-compact"]
    assert all(p["groupPlacementPolicy"]["vmCount"] == 2 for p in policies.values())
    nodes = by_name(mocks, "gcp:compute/instance:Instance")
    assert {n: i["resourcePolicies"] for n, i in nodes.items()} == {
        "gcp-x2-node-0": "gcp-x2-compact-id", "gcp-x2-node-1": "gcp-x2-compact-id",
        "gcp-x2-r1-node-0": "gcp-x2-r1-compact-id", "gcp-x2-r1-node-1": "gcp-x2-r1-compact-id"}
    assert mocks.one("gcp:compute/targetHttpsProxy:TargetHttpsProxy").inputs["sslCertificates"] == \
        ["projects/p/global/sslCertificates/c"]
    assert mocks.of_type("gcp:compute/sSLCertificate:SSLCertificate") == []


def test_gcp_one_replica_has_no_load_balancer(run_stack):
    mocks, outputs = run_stack(ENVS / "gcp-a3-405b-fp8.yaml", mocks=LbMocks())
    assert not mocks.of_type("gcp:compute/backendService:BackendService")
    assert outputs["endpoint"].startswith("https://")   # one group: its head serves TLS itself


# ------------------------------------------------------------------ one replica after another
def gate_argv(gate) -> dict:
    words = shlex.split(gate.inputs["create"])
    return {"command": words[:3], **{w: words[i + 1] for i, w in enumerate(words) if w.startswith("--")}}


def test_aws_replicas_come_up_one_after_another_behind_a_readiness_gate(run_stack, tmp_path):
    """Replica 1's nodes carry (in a tag) what replica 0's gate printed once its head was healthy in the
    target group: Pulumi cannot create or replace them before that gate has passed."""
    env = env_with(tmp_path, "aws-p4de-405b-bf16-2node", "aws-x3", replicas=3)
    mocks, _ = run_stack(env, config={"herd:certificateArn": ACM_ARN}, mocks=LbMocks())
    gates = {g.name: g for g in mocks.of_type("command:local:Command")}
    assert sorted(gates) == ["aws-x3-r0-ready", "aws-x3-r1-ready"]        # none after the last replica
    target_group = mocks.states["aws-x3-lb-heads"]["arn"]
    for replica, head in ((0, "aws-x3-node-0"), (1, "aws-x3-r1-node-0")):
        gate = gates[f"aws-x3-r{replica}-ready"]
        assert gate_argv(gate) == {"command": ["herd", "wait-healthy", "aws"], "--region": "us-east-1",
                                   "--target-group": target_group, "--target": f"{head}-id", "--port": "8000",
                                   "--replica": f"replica-{replica}"}
        assert gate.inputs["triggers"] == [f"{head}-id"]     # a replaced head passes its gate again
    nodes = by_name(mocks, "aws:ec2/instance:Instance")
    assert {n: t["tags"].get(ROLLOUT_TAG) for n, t in nodes.items()} == {
        "aws-x3-node-0": None, "aws-x3-node-1": None,
        "aws-x3-r1-node-0": "aws-x3-node-0-id\n", "aws-x3-r1-node-1": "aws-x3-node-0-id\n",
        "aws-x3-r2-node-0": "aws-x3-r1-node-0-id\n", "aws-x3-r2-node-1": "aws-x3-r1-node-0-id\n"}
    # Each head joins the target group as its replica is made (the gate waits on that membership).
    attachments = {a.name: a.inputs["targetId"] for a in mocks.of_type("aws:lb/targetGroupAttachment:TargetGroupAttachment")}
    assert attachments == {"aws-x3-lb-replica-0": "aws-x3-node-0-id", "aws-x3-lb-replica-1": "aws-x3-r1-node-0-id",
                           "aws-x3-lb-replica-2": "aws-x3-r2-node-0-id"}


def test_gcp_replicas_come_up_one_after_another_behind_a_readiness_gate(run_stack, tmp_path):
    mocks, _ = gcp_groups(run_stack, tmp_path, replicas=3)
    [gate0, gate1] = sorted(mocks.of_type("command:local:Command"), key=lambda g: g.name)
    assert (gate0.name, gate1.name) == ("gcp-x3-r0-ready", "gcp-x3-r1-ready")
    group0 = mocks.states["gcp-x3-lb-replica-0"]["selfLink"]
    assert gate_argv(gate0) == {"command": ["herd", "wait-healthy", "gcp"], "--project": "my-project",
                                "--backend-service": "gcp-x3-lb-replicas", "--group": group0,
                                "--replica": "replica-0"}
    assert gate0.inputs["triggers"] == ["gcp-x3-node-0-id"]
    nodes = by_name(mocks, "gcp:compute/instance:Instance")
    assert {n: node["labels"].get("herd-rollout-after") for n, node in nodes.items()} == {
        "gcp-x3-node-0": None, "gcp-x3-r1-node-0": "gcp-x3-lb-replica-0", "gcp-x3-r2-node-0": "gcp-x3-lb-replica-1"}
