"""The rules every herd cluster obeys, written once: run in tests over the Pulumi mocks' resources and
packaged as a CrossGuard policy pack (infra/policy_pack) for `pulumi preview --policy-pack`.

A rule reads one resource (its type token and camelCase properties, as both mocks and CrossGuard see
them) and returns violations as one line each. A stack rule reads every resource at once (a listener
and the URL map it points to; outputs, read from the properties of the pulumi:pulumi:Stack resource and
of herd's components, which is where a stack validation sees a resource's outputs; the tests hand the
mocks' exported outputs in that shape, as no Pulumi engine runs here). `open_cidrs` are the world-open
ranges the environment itself writes in allowed_cidrs: only then may ingress come from 0.0.0.0/0.

Mandatory rules fail the stack. An advisory rule reports and lets it deploy: `https-endpoint` is
advisory because herd's node endpoint is plain HTTP today (no TLS in the runtime, no load balancer
yet); a stack's policy config can make it mandatory ({"https-endpoint": {"enforcementLevel":
"mandatory"}}), and it should become mandatory once the endpoint is served over TLS.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

from runtime.planning import catalog

if TYPE_CHECKING:     # the policy extra: imported only where the CrossGuard pack is built
    from pulumi_policy import Policy

WORLD = ("0.0.0.0/0", "::/0")


@dataclass(frozen=True)
class Rule:
    name: str
    description: str
    check: Callable[[str, dict, frozenset], list[str]]
    level: str = "mandatory"


@dataclass(frozen=True)
class StackRule:
    """A rule over the whole stack: check(resources, open_cidrs) -> [(resource name, message)]."""
    name: str
    description: str
    check: Callable[[list[tuple[str, str, dict]], frozenset], list[tuple[str, str]]]
    level: str = "mandatory"


def _true(value) -> bool:
    return value is True or str(value).lower() == "true"


def no_world_ingress(typ: str, props: dict, open_cidrs: frozenset) -> list[str]:
    ranges: list[str | None] = []   # an unset cidrIpv4 / cidrIpv6 is None
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


# ------------------------------------------------------------------ least privilege
# Actions AWS defines no resource type for (so a policy can only grant them on "*"): the agent
# channel Session Manager opens, as in AWS's own minimal instance policy for it.
NO_RESOURCE_ACTIONS = frozenset({"ssm:UpdateInstanceInformation", "ssmmessages:CreateControlChannel",
                                 "ssmmessages:CreateDataChannel", "ssmmessages:OpenControlChannel",
                                 "ssmmessages:OpenDataChannel"})
# AWS managed policies that grant far more than a node needs: everything, all of IAM, any *FullAccess,
# and the SSM core policies (ssm:GetParameter on every parameter of the account, with kms:Decrypt).
BROAD_MANAGED_POLICIES = frozenset({"AdministratorAccess", "PowerUserAccess", "IAMFullAccess",
                                    "AmazonSSMManagedInstanceCore", "AmazonEC2RoleforSSM"})
AWS_POLICY_DOCUMENTS = {"aws:iam/policy:Policy", "aws:iam/rolePolicy:RolePolicy", "aws:iam/userPolicy:UserPolicy",
                        "aws:iam/groupPolicy:GroupPolicy"}
AWS_ATTACHMENTS = {"aws:iam/rolePolicyAttachment:RolePolicyAttachment", "aws:iam/policyAttachment:PolicyAttachment",
                   "aws:iam/userPolicyAttachment:UserPolicyAttachment",
                   "aws:iam/groupPolicyAttachment:GroupPolicyAttachment"}
# GCP grants on a whole project, folder or organization reach every bucket and secret in it. Only
# write-only telemetry roles are narrow enough there; anything else is bound on its resource.
GCP_HIERARCHY_IAM = ("gcp:projects/iAM", "gcp:folder/iAM", "gcp:organizations/iAM")
GCP_HIERARCHY_ALLOWED = frozenset({"roles/logging.logWriter", "roles/monitoring.metricWriter"})
GCP_BASIC_ROLES = frozenset({"roles/owner", "roles/editor", "roles/viewer"})


def _as_list(value) -> list:
    return value if isinstance(value, list) else [] if value is None else [value]


def _document(value) -> dict | None:
    """A policy document from a property: JSON text (as the program passes it) or already parsed.
    An unknown value (a preview before the document is computed) is skipped."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            return None
        return parsed if isinstance(parsed, dict) else None
    return None


def wildcard_statements(document: dict) -> list[str]:
    """What in an IAM policy document grants beyond named actions on named resources."""
    out = []
    for i, st in enumerate(_as_list(document.get("Statement"))):
        if not isinstance(st, dict) or st.get("Effect") != "Allow":
            continue                                   # a Deny may be as wide as it likes
        label = f"statement {i}" + (f" ({st['Sid']})" if st.get("Sid") else "")
        for negated in ("NotAction", "NotResource"):
            if negated in st:
                out.append(f"{label}: Allow with {negated} grants everything not listed")
        actions = [str(a) for a in _as_list(st.get("Action"))]
        wild = [a for a in actions if a == "*" or a.endswith(":*")]
        if wild:
            out.append(f"{label}: Action {wild[0]!r} allows every action; name the actions")
        if "*" in _as_list(st.get("Resource")):
            scoped = [a for a in actions if a not in NO_RESOURCE_ACTIONS]
            if scoped or not actions:
                out.append(f"{label}: Resource '*' for {', '.join(scoped) or 'its actions'}; name the resources")
    return out


def least_privilege(typ: str, props: dict, _: frozenset) -> list[str]:
    """No wildcard IAM: no Action or Resource "*" in AWS policy documents, no broad managed policy,
    no broad GCP role on a project, folder or organization."""
    if typ in AWS_POLICY_DOCUMENTS:
        document = _document(props.get("policy"))
        return wildcard_statements(document) if document else []
    if typ == "aws:iam/role:Role":
        out = []
        for inline in props.get("inlinePolicies") or []:
            document = _document((inline or {}).get("policy"))
            out += [f"inline policy {inline.get('name')}: {m}" for m in wildcard_statements(document or {})]
        return out + _broad_managed(props.get("managedPolicyArns") or [])
    if typ in AWS_ATTACHMENTS:
        return _broad_managed([props.get("policyArn")])
    if typ.startswith(GCP_HIERARCHY_IAM):
        if "policyData" in props:
            document = _document(props.get("policyData")) or {}
            roles = [b.get("role") for b in document.get("bindings") or [] if isinstance(b, dict)]
        else:
            roles = [props.get("role")]
        level = {"projects": "project", "folder": "folder", "organizations": "organization"}[
            typ.split(":")[1].split("/")[0]]
        return [f"{role!r} granted on the whole {level}: bind it on the bucket or secret it is for"
                for role in roles if role and role not in GCP_HIERARCHY_ALLOWED]
    if typ.startswith("gcp:") and "iam" in typ.lower() and props.get("role") in GCP_BASIC_ROLES:
        # On any resource: a basic role is the legacy, service-wide owner/editor/viewer.
        return [f"basic role {props['role']!r} grants every service's permissions; use a predefined role"]
    return []


def _broad_managed(arns: Iterable) -> list[str]:
    out = []
    for arn in arns:
        if not isinstance(arn, str) or ":iam::aws:policy/" not in arn:
            continue                                   # the account's own policies are checked as documents
        name = arn.rsplit("/", 1)[-1]
        if name in BROAD_MANAGED_POLICIES or name.endswith("FullAccess"):
            out.append(f"AWS managed policy {name} grants far beyond this deployment's resources; "
                       "write an inline policy naming them")
    return out


# ------------------------------------------------------------------ plain HTTP
def _http_only_redirects(actions) -> bool:
    actions = _as_list(actions)
    return bool(actions) and all(
        isinstance(a, dict) and a.get("type") == "redirect"
        and str((a.get("redirect") or {}).get("protocol", "")).upper() == "HTTPS" for a in actions)


def plain_http_listeners(resources: list[tuple[str, str, dict]], _: frozenset) -> list[tuple[str, str]]:
    """Load balancer listeners and GCP HTTP proxies on plain HTTP, unless all they do is redirect to
    HTTPS. (A layer-4 passthrough names no protocol; its endpoint is checked by https-endpoint.)"""
    out = []
    http_listeners = set()
    url_maps = {}
    for typ, name, props in resources:
        if typ in ("aws:lb/listener:Listener", "aws:alb/listener:Listener"):
            protocol = str(props.get("protocol") or ("HTTP" if props.get("port") == 80 else "")).upper()
            if protocol == "HTTP":
                http_listeners.update(str(v) for v in (props.get("arn"), props.get("id"), name) if v)
                if not _http_only_redirects(props.get("defaultActions")):
                    out.append((name, f"listener on plain HTTP port {props.get('port')} serves traffic; "
                                      "listen on HTTPS and only redirect HTTP to it"))
        elif typ in ("gcp:compute/uRLMap:URLMap", "gcp:compute/regionUrlMap:RegionUrlMap"):
            redirect = props.get("defaultUrlRedirect") or {}
            only_redirect = bool(redirect.get("httpsRedirect")) and not props.get("pathMatchers")
            for key in (props.get("name"), props.get("selfLink"), props.get("id"), name):
                if key:
                    url_maps[str(key).rsplit("/", 1)[-1]] = only_redirect
    for typ, name, props in resources:
        if typ in ("aws:lb/listenerRule:ListenerRule", "aws:alb/listenerRule:ListenerRule"):
            if str(props.get("listenerArn")) in http_listeners and not _http_only_redirects(props.get("actions")):
                out.append((name, "rule on a plain-HTTP listener serves traffic; only redirect to HTTPS"))
        elif typ in ("gcp:compute/targetHttpProxy:TargetHttpProxy",
                     "gcp:compute/regionTargetHttpProxy:RegionTargetHttpProxy"):
            url_map = str(props.get("urlMap") or "").rsplit("/", 1)[-1]
            if not url_maps.get(url_map, False):
                out.append((name, f"HTTP proxy (URL map {url_map or '?'}) serves traffic on plain HTTP; "
                                  "use an HTTPS proxy and a URL map that only redirects HTTP to it"))
    return out


def _http_urls(value, path: str):
    if isinstance(value, str):
        if value.lower().startswith("http://"):
            yield path, value
    elif isinstance(value, dict):
        for key, inner in value.items():
            yield from _http_urls(inner, f"{path}.{key}")
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            yield from _http_urls(inner, f"{path}[{i}]")


def https_endpoint(resources: list[tuple[str, str, dict]], _: frozenset) -> list[tuple[str, str]]:
    """Stack and component outputs named like an endpoint or URL must not be http:// addresses: API
    keys and prompts would cross the network in the clear."""
    out = []
    for typ, name, props in resources:
        if typ != "pulumi:pulumi:Stack" and not typ.startswith("herd:"):
            continue
        for key, value in props.items():
            if "endpoint" in key.lower() or "url" in key.lower():
                out += [(name, f"output {where} is plain HTTP ({url}): serve it over TLS")
                        for where, url in _http_urls(value, key)]
    return out


RULES = [
    Rule("no-world-ingress", "No ingress from 0.0.0.0/0 or ::/0 unless the environment names it.", no_world_ingress),
    Rule("imdsv2-required", "EC2 instance metadata needs session tokens (IMDSv2).", imds_v2),
    Rule("encrypted-volumes", "Every EBS volume is encrypted.", encrypted_volumes),
    Rule("efa-layout", "EFA instance types attach every EFA card and sit in a cluster placement group.",
         efa_layout),
    Rule("gpu-terminate-on-maintenance", "GPU VMs on GCP stop for host maintenance.", gpu_maintenance),
    Rule("secrets-encrypted", "Secrets in SSM are SecureString.", secrets_stored_encrypted),
    Rule("private-buckets", "Buckets herd creates block all public access.", private_buckets),
    Rule("least-privilege", "No wildcard IAM: no Action or Resource '*', no broad managed policy, no broad "
         "role on a GCP project, folder or organization.", least_privilege),
]

STACK_RULES = [
    StackRule("no-plain-http-listener", "Load balancers listen on HTTPS; plain HTTP only redirects to it.",
              plain_http_listeners),
    StackRule("https-endpoint", "The stack's endpoint outputs are https:// (advisory until herd serves TLS).",
              https_endpoint, level="advisory"),
]


def violations(resources, open_cidrs=frozenset(), level: str = "mandatory") -> list[str]:
    """Every violation of the rules at `level` (mandatory or advisory) in (type, name, props) triples,
    as 'rule: type name: message' ('rule: name: message' for a stack rule)."""
    resources = list(resources)
    out = []
    for typ, name, props in resources:
        for rule in RULES:
            if rule.level == level:
                out += [f"{rule.name}: {typ} {name}: {message}" for message in rule.check(typ, props, open_cidrs)]
    for stack_rule in STACK_RULES:
        if stack_rule.level == level:
            out += [f"{stack_rule.name}: {name}: {message}"
                    for name, message in stack_rule.check(resources, open_cidrs)]
    return out


def crossguard_policies() -> list[Policy]:
    """The same rules as CrossGuard policies (each at its level). Config `openCidrs` lists world-open
    ranges an environment deliberately allows."""
    from pulumi_policy import (EnforcementLevel, PolicyConfigSchema, ResourceValidationPolicy,
                               StackValidationPolicy)

    schema = PolicyConfigSchema(properties={"openCidrs": {"type": "array", "items": {"type": "string"}}})
    levels = {"mandatory": EnforcementLevel.MANDATORY, "advisory": EnforcementLevel.ADVISORY}

    def validator(rule: Rule):
        def validate(args, report_violation):
            open_cidrs = frozenset((args.get_config() or {}).get("openCidrs", []))
            for message in rule.check(args.resource_type, args.props, open_cidrs):
                report_violation(message)
        return validate

    def stack_validator(rule: StackRule):
        def validate(args, report_violation):
            open_cidrs = frozenset((args.get_config() or {}).get("openCidrs", []))
            urns = {r.name: r.urn for r in args.resources}
            triples = [(r.resource_type, r.name, dict(r.props or {})) for r in args.resources]
            for name, message in rule.check(triples, open_cidrs):
                report_violation(f"{name}: {message}", urns.get(name))
        return validate

    policies: list[Policy] = [ResourceValidationPolicy(name=rule.name, description=rule.description,
                                                       enforcement_level=levels[rule.level],
                                                       validate=validator(rule), config_schema=schema)
                              for rule in RULES]
    policies += [StackValidationPolicy(name=rule.name, description=rule.description,
                                       enforcement_level=levels[rule.level], validate=stack_validator(rule),
                                       config_schema=schema)
                 for rule in STACK_RULES]
    return policies
