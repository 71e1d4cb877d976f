"""The rules every herd cluster obeys, written once: run in tests over the Pulumi mocks' resources and
packaged as a CrossGuard policy pack (infra/policy_pack) for `pulumi preview --policy-pack`.

A rule reads one resource (its type token and camelCase properties, as both mocks and CrossGuard see
them) and returns violations as one line each. `open_cidrs` are the world-open ranges the environment
itself writes in allowed_cidrs: only then may ingress come from 0.0.0.0/0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from runtime import catalog

WORLD = ("0.0.0.0/0", "::/0")


@dataclass(frozen=True)
class Rule:
    name: str
    description: str
    check: Callable[[str, dict, frozenset], list[str]]


def _true(value) -> bool:
    return value is True or str(value).lower() == "true"


def no_world_ingress(typ: str, props: dict, open_cidrs: frozenset) -> list[str]:
    ranges: list[str] = []
    if typ == "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule":
        ranges = [props.get("cidrIpv4"), props.get("cidrIpv6")]
    elif typ == "aws:ec2/securityGroup:SecurityGroup":
        for rule in props.get("ingress") or []:
            ranges += (rule.get("cidrBlocks") or []) + (rule.get("ipv6CidrBlocks") or [])
    elif typ == "aws:ec2/securityGroupRule:SecurityGroupRule" and props.get("type") == "ingress":
        ranges = props.get("cidrBlocks") or []
    elif typ == "gcp:compute/firewall:Firewall" and props.get("direction", "INGRESS") == "INGRESS":
        ranges = props.get("sourceRanges") or []
    return [f"ingress from {r} (allowed only when the environment's allowed_cidrs lists it)"
            for r in ranges if r in WORLD and r not in open_cidrs]


def imds_v2(typ: str, props: dict, _: frozenset) -> list[str]:
    if typ in ("aws:ec2/launchTemplate:LaunchTemplate", "aws:ec2/instance:Instance"):
        tokens = (props.get("metadataOptions") or {}).get("httpTokens")
        if typ.endswith("LaunchTemplate") or "launchTemplate" not in props:
            if tokens != "required":
                return [f"metadataOptions.httpTokens is {tokens!r}: IMDSv2 must be required"]
    return []


def encrypted_volumes(typ: str, props: dict, _: frozenset) -> list[str]:
    out = []
    if typ in ("aws:ec2/launchTemplate:LaunchTemplate",):
        for mapping in props.get("blockDeviceMappings") or []:
            ebs = mapping.get("ebs") or {}
            if ebs and not _true(ebs.get("encrypted")):
                out.append(f"volume {mapping.get('deviceName')} is not encrypted")
    elif typ == "aws:ebs/volume:Volume" and not _true(props.get("encrypted")):
        out.append("EBS volume is not encrypted")
    return out


def efa_layout(typ: str, props: dict, _: frozenset) -> list[str]:
    """EFA instance types get every EFA card (catalog count), one ENA primary, and a placement group."""
    if typ != "aws:ec2/launchTemplate:LaunchTemplate":
        return []
    inst = catalog.instances().get(props.get("instanceType", ""))
    if not inst or not inst.efa_interfaces:
        return []
    nics = props.get("networkInterfaces") or []
    efa = [n for n in nics if n.get("interfaceType") in ("efa", "efa-only")]
    out = []
    if len(efa) != inst.efa_interfaces:
        out.append(f"{inst.id} has {inst.efa_interfaces} EFA cards but the template attaches {len(efa)}")
    slots = [(n.get("networkCardIndex", 0), n.get("deviceIndex", 0)) for n in nics]
    if len(set(slots)) != len(slots):
        out.append("two network interfaces share a (network card, device) slot")
    if not any(n.get("deviceIndex", 0) == 0 and n.get("networkCardIndex", 0) == 0
               and n.get("interfaceType") in (None, "interface", "efa") for n in nics):
        out.append("no primary interface with an IP address at card 0, device 0")
    if not (props.get("placement") or {}).get("groupName"):
        out.append("EFA nodes need a cluster placement group")
    return out


def gpu_maintenance(typ: str, props: dict, _: frozenset) -> list[str]:
    if typ == "gcp:compute/instance:Instance" and props.get("guestAccelerators"):
        policy = (props.get("scheduling") or {}).get("onHostMaintenance")
        if policy != "TERMINATE":
            return [f"scheduling.onHostMaintenance is {policy!r}: GPU VMs must TERMINATE (no live migration)"]
    return []


def secrets_stored_encrypted(typ: str, props: dict, _: frozenset) -> list[str]:
    if typ == "aws:ssm/parameter:Parameter" and props.get("type") != "SecureString":
        return [f"SSM parameter {props.get('name')} is {props.get('type')!r}: secrets must be SecureString"]
    return []


def private_buckets(typ: str, props: dict, _: frozenset) -> list[str]:
    if typ == "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock":
        flags = ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls", "restrictPublicBuckets")
        return [f"{f} is not set" for f in flags if not _true(props.get(f))]
    if typ == "gcp:storage/bucket:Bucket":
        out = []
        if props.get("publicAccessPrevention") != "enforced":
            out.append("publicAccessPrevention is not 'enforced'")
        if not _true(props.get("uniformBucketLevelAccess")):
            out.append("uniformBucketLevelAccess is off")
        return out
    return []


RULES = [
    Rule("no-world-ingress", "No ingress from 0.0.0.0/0 or ::/0 unless the environment names it.", no_world_ingress),
    Rule("imdsv2-required", "EC2 instance metadata needs session tokens (IMDSv2).", imds_v2),
    Rule("encrypted-volumes", "Every EBS volume is encrypted.", encrypted_volumes),
    Rule("efa-layout", "EFA instance types attach every EFA card and sit in a cluster placement group.",
         efa_layout),
    Rule("gpu-terminate-on-maintenance", "GPU VMs on GCP stop for host maintenance.", gpu_maintenance),
    Rule("secrets-encrypted", "Secrets in SSM are SecureString.", secrets_stored_encrypted),
    Rule("private-buckets", "Buckets herd creates block all public access.", private_buckets),
]


def violations(resources, open_cidrs=frozenset()) -> list[str]:
    """Every violation in (type, name, props) triples, as 'rule: type name: message'."""
    out = []
    for typ, name, props in resources:
        for rule in RULES:
            out += [f"{rule.name}: {typ} {name}: {message}" for message in rule.check(typ, props, open_cidrs)]
    return out


def crossguard_policies():
    """The same rules as CrossGuard policies (mandatory). Config `openCidrs` lists world-open ranges
    an environment deliberately allows."""
    from pulumi_policy import EnforcementLevel, PolicyConfigSchema, ResourceValidationPolicy

    schema = PolicyConfigSchema(properties={"openCidrs": {"type": "array", "items": {"type": "string"}}})

    def validator(rule: Rule):
        def validate(args, report_violation):
            open_cidrs = frozenset((args.get_config() or {}).get("openCidrs", []))
            for message in rule.check(args.resource_type, args.props, open_cidrs):
                report_violation(message)
        return validate

    return [ResourceValidationPolicy(name=rule.name, description=rule.description,
                                     enforcement_level=EnforcementLevel.MANDATORY, validate=validator(rule),
                                     config_schema=schema)
            for rule in RULES]
