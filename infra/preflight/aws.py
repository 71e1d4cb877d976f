"""AWS preflight with boto3: offerings, EFA support, P-instance vCPU quota, AMI, capacity reservation."""
from __future__ import annotations

from dataclasses import dataclass

from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, ProfileNotFound

from infra.preflight import Finding, fail, ok, unknown
from runtime.planning import catalog
from runtime.errors import UserError
from runtime.planning.planner import Plan
from runtime.planning.spec import Spec

# Service Quotas codes for P instances (vCPUs): "Running On-Demand P instances" and
# "All P Spot Instance Requests".
ON_DEMAND_P = "L-417A185B"
SPOT_P = "L-7212CCBC"


@dataclass
class AwsClients:
    ec2: object
    quotas: object            # service-quotas
    reservations: object      # ec2, for describe_capacity_reservations (its own client: separately stubbed)


def clients_for(region: str) -> AwsClients:
    import boto3
    try:
        session = boto3.Session(region_name=region)
    except ProfileNotFound as err:
        raise UserError(f"AWS_PROFILE: {err.kwargs.get('profile')!r}: no such profile in the AWS config files "
                        "(allowed: a profile listed by `aws configure list-profiles`)") from None
    ec2 = session.client("ec2")
    return AwsClients(ec2, session.client("service-quotas"), ec2)


def _error(err: Exception) -> str:
    if isinstance(err, ClientError):
        return f"{err.response['Error'].get('Code')}: {err.response['Error'].get('Message')}"
    return str(err)


def offered_zones(ec2, instance_type: str) -> list[str]:
    pages = ec2.get_paginator("describe_instance_type_offerings").paginate(
        LocationType="availability-zone", Filters=[{"Name": "instance-type", "Values": [instance_type]}])
    return sorted({o["Location"] for page in pages for o in page["InstanceTypeOfferings"]})


def check_zones(spec: Spec, zones: list[str]) -> Finding:
    """zones: where the region offers the instance type (offered_zones)."""
    section = spec.aws_section
    if not zones:
        return fail("offering", f"{section.instance_type} is not offered in any zone of {section.region}")
    if section.availability_zones:
        usable = [z for z in section.availability_zones if z in zones]
        if not usable:
            return fail("offering", f"aws.availability_zones: {section.availability_zones}: "
                                    f"{section.instance_type} is offered only in {zones}")
        return ok("offering", f"{section.instance_type} offered in {', '.join(usable)}")
    return ok("offering", f"{section.instance_type} offered in {', '.join(zones)}")


def check_efa(ec2, spec: Spec) -> Finding:
    inst = catalog.instance(spec.aws_section.instance_type)
    info = ec2.describe_instance_types(InstanceTypes=[inst.id])["InstanceTypes"][0]
    network = info.get("NetworkInfo", {})
    if not network.get("EfaSupported"):
        return fail("efa", f"{inst.id}: AWS reports no EFA support (herd's layout needs {inst.efa_interfaces})")
    max_efa = network.get("EfaInfo", {}).get("MaximumEfaInterfaces")
    if max_efa is not None and max_efa < inst.efa_interfaces:
        return fail("efa", f"{inst.id}: AWS allows {max_efa} EFA interfaces, herd's layout attaches "
                           f"{inst.efa_interfaces}")
    return ok("efa", f"{inst.id}: EFA supported, {max_efa} interfaces")


def p_vcpus_in_use(ec2, spot: bool) -> int:
    # The quota covers every P family (p3, p4d, p5, ...): match the family by its first letter.
    filters = [{"Name": "instance-state-name", "Values": ["pending", "running"]}]
    used = 0
    for page in ec2.get_paginator("describe_instances").paginate(Filters=filters):
        for reservation in page["Reservations"]:
            for instance in reservation["Instances"]:
                if not instance["InstanceType"].startswith("p") or \
                        (instance.get("InstanceLifecycle") == "spot") != spot:
                    continue
                known = catalog.instances().get(instance["InstanceType"])
                cpu = instance.get("CpuOptions", {})
                used += known.vcpus if known else cpu.get("CoreCount", 0) * cpu.get("ThreadsPerCore", 1)
    return used


def _count(plan: Plan) -> str:
    """How many nodes the deployment needs, all replicas counted: '4' or '4 (2 replicas x 2)'."""
    total = plan.total_nodes
    return f"{total} ({plan.replicas} replicas x {plan.nodes})" if plan.replicas > 1 else str(total)


def check_quota(ec2, quotas, spec: Spec, plan: Plan) -> Finding:
    section = spec.aws_section
    if section.capacity_block:
        return ok("quota", "capacity block: the block's own capacity applies, not the P-instance quota")
    code = SPOT_P if section.spot else ON_DEMAND_P
    need = catalog.instance(section.instance_type).vcpus * plan.total_nodes   # every replica
    try:
        limit = int(quotas.get_service_quota(ServiceCode="ec2", QuotaCode=code)["Quota"]["Value"])
    except ClientError as err:
        return unknown("quota", f"{code}: could not read the quota ({_error(err)})")
    used = p_vcpus_in_use(ec2, section.spot)
    kind = "Spot" if section.spot else "On-Demand"
    if used + need > limit:
        return fail("quota", f"{code} ({kind} P instances, vCPUs): need {need} for {_count(plan)} x "
                             f"{section.instance_type}, quota {limit}, in use {used}: request at least "
                             f"{used + need} in Service Quotas ({section.region})")
    return ok("quota", f"{code}: {need} vCPUs needed, quota {limit}, in use {used}")


def check_ami(ec2, spec: Spec) -> Finding:
    pattern = spec.aws_section.ami_name_pattern
    images = ec2.describe_images(Owners=spec.aws_section.ami_owners, Filters=[
        {"Name": "name", "Values": [pattern]}, {"Name": "state", "Values": ["available"]},
        {"Name": "architecture", "Values": ["x86_64"]}])["Images"]
    if not images:
        return fail("ami", f"aws.ami_name_pattern: {pattern!r}: no available image owned by "
                           f"{', '.join(spec.aws_section.ami_owners)} matches in {spec.aws_section.region}")
    newest = max(images, key=lambda i: i.get("CreationDate", ""))
    return ok("ami", f"{newest['ImageId']} ({newest.get('Name')})")


def check_reservation(ec2, spec: Spec, plan: Plan) -> Finding | None:
    rid = spec.aws_section.capacity_reservation_id
    if not rid:
        return None
    try:
        found = ec2.describe_capacity_reservations(CapacityReservationIds=[rid])["CapacityReservations"]
    except ClientError as err:
        return fail("reservation", f"aws.capacity_reservation_id: {rid!r}: {_error(err)}")
    if not found:
        return fail("reservation", f"aws.capacity_reservation_id: {rid!r}: not found in {spec.aws_section.region}")
    cr = found[0]
    problems = []
    if cr["State"] not in ("active", "scheduled"):
        problems.append(f"state is {cr['State']}")
    if cr["InstanceType"] != spec.aws_section.instance_type:
        problems.append(f"it reserves {cr['InstanceType']}, the spec asks for {spec.aws_section.instance_type}")
    if cr.get("AvailableInstanceCount", 0) < plan.total_nodes:
        problems.append(f"{cr.get('AvailableInstanceCount', 0)} instances available, {_count(plan)} needed")
    if spec.aws_section.availability_zones and cr["AvailabilityZone"] not in spec.aws_section.availability_zones:
        problems.append(f"it is in {cr['AvailabilityZone']}, outside aws.availability_zones")
    if problems:
        return fail("reservation", f"aws.capacity_reservation_id: {rid!r}: " + "; ".join(problems))
    return ok("reservation", f"{rid}: {cr['State']}, {cr.get('AvailableInstanceCount')} x {cr['InstanceType']} "
                             f"in {cr['AvailabilityZone']}")


def aws_findings(spec: Spec, plan: Plan, clients: AwsClients | None = None) -> list[Finding]:
    clients = clients or clients_for(spec.aws_section.region)
    try:
        zones = offered_zones(clients.ec2, spec.aws_section.instance_type)
        findings = [check_zones(spec, zones), check_efa(clients.ec2, spec),
                    check_quota(clients.ec2, clients.quotas, spec, plan), check_ami(clients.ec2, spec)]
        reservation = check_reservation(clients.reservations, spec, plan)
    except NoCredentialsError:
        raise UserError("aws: no credentials found: set AWS_PROFILE (or AWS_ACCESS_KEY_ID and "
                        "AWS_SECRET_ACCESS_KEY) for an account that may describe EC2 and read Service Quotas") from None
    except (ClientError, BotoCoreError) as err:
        raise UserError(f"aws: {spec.aws_section.region}: {_error(err)}") from None
    return findings + ([reservation] if reservation else [])
