"""The AWS cluster: network, security group, placement group, IAM, secrets, launch template, nodes.

Secure by default: ingress to the API port and SSH only from the spec's allowed_cidrs (all traffic
only among the nodes themselves, which NCCL over EFA needs), IMDSv2 required, encrypted gp3 root
volumes, a private artifacts bucket and the API key as an SSM SecureString (never in user data), both
encrypted with the deployment's own KMS key. The endpoint is HTTPS: the head's certificate and key
reach it as SecureStrings too (or from the parameters the spec names), signed for its Elastic IP,
which is therefore allocated before the node. The nodes' role holds one inline policy naming only this
deployment's resources: its parameters, its buckets, its key. Session Manager is off unless the stack
config asks for it (`pulumi config set herd:sessionManager true`).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pulumi
import pulumi_aws as aws

from infra.efa import interface_layout
from infra.nodes import disk_gb, node_boot, weight_buckets
from infra.rollout_gate import ROLLOUT_TAG, readiness_gate
from infra.stack import TLS_FILES, StackTls, stack_tls
from provisioning.boot import aws_sources
from runtime.planning.planner import Plan
from runtime.planning.spec import AwsSection, Spec

VPC_CIDR = "10.42.0.0/16"
SUBNET_CIDR = "10.42.0.0/20"
LB_SUBNET_CIDR = "10.42.16.0/24"   # replicas: the load balancer's second zone (an ALB needs two)
# What the SSM agent needs on the instance for Session Manager, as in AWS's own minimal instance
# policy (AWSCloud9SSMInstanceProfile): the ssmmessages channel actions have no resource type to
# scope them to, so AWS grants them on "*" (the policy rules allow exactly these on "*").
SESSION_MANAGER_ACTIONS = ["ssm:UpdateInstanceInformation", "ssmmessages:CreateControlChannel",
                           "ssmmessages:CreateDataChannel", "ssmmessages:OpenControlChannel",
                           "ssmmessages:OpenDataChannel"]
SSH_USER = "ubuntu"          # the Ubuntu Deep Learning AMIs


@dataclass
class AwsClusterArgs:
    spec: Spec
    plan: Plan
    bundle: Path                                   # the node bundle (steps, herd wheel, environment)
    api_key: pulumi.Input[str] | None = None       # secret
    hf_token: pulumi.Input[str] | None = None      # secret
    session_manager: bool | None = None            # None: the stack config herd:sessionManager (off)
    tls: StackTls | None = None                    # the head's certificate (None: stack_tls(spec))


def choose_zone(instance_type: str, wanted: list[str], offered: Sequence[str],
                field: str = "aws.availability_zones") -> str:
    """The first wanted zone that offers the type (any offering zone when none is named)."""
    candidates = [z for z in wanted if z in offered] if wanted else sorted(offered)
    if not candidates:
        raise pulumi.RunError(f"{field}: {wanted}: {instance_type} is offered only in "
                              f"{sorted(offered) or 'no zone of this region'}")
    return candidates[0]


def parameter_path(spec: Spec) -> str:
    """The deployment's SSM path: every parameter it creates, and all its nodes may read, is under it."""
    return f"/herd/{spec.name}/"


class AwsCluster(pulumi.ComponentResource):
    endpoint: pulumi.Output[str]
    head_address: pulumi.Output[str]
    node_addresses: pulumi.Output[list]

    def __init__(self, name: str, args: AwsClusterArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("herd:aws:Cluster", name, None, opts)
        spec, plan, section = args.spec, args.plan, args.spec.aws_section
        child = pulumi.ResourceOptions(parent=self)
        tags = {"herd:deployment": spec.name}

        offered = aws.ec2.get_instance_type_offerings(
            filters=[aws.ec2.GetInstanceTypeOfferingsFilterArgs(name="instance-type", values=[section.instance_type])],
            location_type="availability-zone").locations
        vpc_id, subnet_id = self._network(name, spec, offered, tags, child)

        sg = aws.ec2.SecurityGroup(f"{name}-nodes", vpc_id=vpc_id, tags=tags, opts=child,
                                   description=f"herd {spec.name}: nodes talk freely; API and SSH from named CIDRs")
        self.security_group = sg
        # EFA needs all traffic to and from the group itself, in both directions.
        aws.vpc.SecurityGroupIngressRule(f"{name}-self-in", security_group_id=sg.id, ip_protocol="-1",
                                         referenced_security_group_id=sg.id, opts=child)
        aws.vpc.SecurityGroupEgressRule(f"{name}-self-out", security_group_id=sg.id, ip_protocol="-1",
                                        referenced_security_group_id=sg.id, opts=child)
        # Out to the internet: package index, the EFA installer, the weights bucket.
        aws.vpc.SecurityGroupEgressRule(f"{name}-out", security_group_id=sg.id, ip_protocol="-1",
                                        cidr_ipv4="0.0.0.0/0", opts=child)
        # The API port: from allowed_cidrs to the one group; with replicas, from the load balancer only.
        direct = ((spec.serving.port, "api"),) if spec.replicas == 1 else ()
        for i, cidr in enumerate(section.allowed_cidrs):
            for port, what in (*direct, (22, "ssh")):
                aws.vpc.SecurityGroupIngressRule(f"{name}-{what}-{i}", security_group_id=sg.id,
                                                 ip_protocol="tcp", from_port=port, to_port=port,
                                                 cidr_ipv4=cidr, description=f"{what} from {cidr}", opts=child)

        self.placement_group = aws.ec2.PlacementGroup(f"{name}-pg", strategy="cluster", tags=tags, opts=child)

        # One key for what this deployment encrypts (its secrets, its bundle): the nodes may decrypt
        # with this key only, and only through SSM and S3.
        self.key = aws.kms.Key(f"{name}-key", description=f"herd {spec.name}: secrets and node bundle",
                               enable_key_rotation=True, deletion_window_in_days=7, tags=tags, opts=child)
        bucket, bundle_key = self._artifacts(name, args.bundle, tags, child)
        # The public addresses first: the head's certificate names its own, and the head reads that
        # certificate at boot. (Several network cards: AWS assigns no public address, so each node
        # gets an Elastic IP, associated once the node exists.)
        eips = [aws.ec2.Eip(f"{name}-ip-{rank}", domain="vpc", tags=tags, opts=child) for rank in range(plan.nodes)]
        self.tls = args.tls or stack_tls(spec, spec.name)
        secrets = self._secrets(name, spec, args, eips[0], tags, child)
        session_manager = args.session_manager
        if session_manager is None:
            session_manager = bool(pulumi.Config("herd").get_bool("sessionManager"))
        profile = self._role(name, spec, bucket, bundle_key, secrets, session_manager, tags, child)

        ami = aws.ec2.get_ami(most_recent=True, owners=section.ami_owners,
                              filters=[aws.ec2.GetAmiFilterArgs(name="name", values=[section.ami_name_pattern]),
                                       aws.ec2.GetAmiFilterArgs(name="architecture", values=["x86_64"]),
                                       aws.ec2.GetAmiFilterArgs(name="state", values=["available"])])
        # Nested inputs as the provider's typed Args (not dicts): a type checker then checks their keys
        # and types, which mocks echo unchecked. The EBS and interface booleans are strings in
        # the launch template's schema ("true").
        template = aws.ec2.LaunchTemplate(
            f"{name}-node", image_id=ami.id, instance_type=section.instance_type,
            key_name=section.ssh_key_name, update_default_version=True, tags=tags,
            iam_instance_profile=aws.ec2.LaunchTemplateIamInstanceProfileArgs(arn=profile.arn),
            metadata_options=aws.ec2.LaunchTemplateMetadataOptionsArgs(
                http_endpoint="enabled", http_tokens="required", http_put_response_hop_limit=2,
                instance_metadata_tags="disabled"),
            block_device_mappings=[aws.ec2.LaunchTemplateBlockDeviceMappingArgs(
                device_name="/dev/sda1", ebs=aws.ec2.LaunchTemplateBlockDeviceMappingEbsArgs(
                    volume_size=section.root_volume_gb or disk_gb(plan), volume_type="gp3", encrypted="true",
                    iops=16000, throughput=1000, delete_on_termination="true"))],
            network_interfaces=[aws.ec2.LaunchTemplateNetworkInterfaceArgs(
                network_card_index=slot.network_card_index, device_index=slot.device_index,
                interface_type=slot.interface_type, subnet_id=subnet_id, security_groups=[sg.id],
                delete_on_termination="true")
                for slot in interface_layout(section.instance_type)],
            placement=aws.ec2.LaunchTemplatePlacementArgs(group_name=self.placement_group.name),
            instance_market_options=self._market(section),
            capacity_reservation_specification=self._reservation(section),
            tag_specifications=[aws.ec2.LaunchTemplateTagSpecificationArgs(resource_type=kind, tags=tags)
                                for kind in ("instance", "volume")],
            opts=child)
        self.launch_template = template

        bundle_uri = pulumi.Output.concat("s3://", bucket.bucket, "/", bundle_key)
        # Replicas: the load balancer first, so each replica's head joins it as it is made and the next
        # replica waits until it is healthy there (infra/rollout_gate.py).
        self.load_balancer = self._load_balancer(name, spec, vpc_id, subnet_id, tags) if spec.replicas > 1 else None
        groups, addresses, gate = [], [], None
        self.gates = []
        for replica in range(spec.replicas):
            nodes = []
            after = [gate] if gate is not None else []
            rollout = {ROLLOUT_TAG: gate.stdout} if gate is not None else {}
            for rank in range(plan.nodes):
                # Replica 0 keeps the names of a one-group deployment: adding replicas adds resources and
                # replaces none.
                label = f"node-{rank}" if replica == 0 else f"r{replica}-node-{rank}"
                # Only heads serve HTTPS: workers are not handed the certificate and key.
                node_secrets = secrets if rank == 0 else {k: v for k, v in secrets.items() if k not in TLS_FILES}
                user_data = node_boot(spec, plan, rank,
                                      lambda uri, known=node_secrets: aws_sources(uri, section.region, known),
                                      bundle_uri, nodes[0].private_ip if rank else None)
                # The parameters exist before the node boots and reads them.
                # The template's latest_version is a number, the instance's launch_template.version
                # a string ("1", "$Latest"): the provider rejects a number there.
                node = aws.ec2.Instance(
                    f"{name}-{label}", launch_template=aws.ec2.InstanceLaunchTemplateArgs(
                        id=template.id, version=template.latest_version.apply(str)),
                    user_data=user_data, user_data_replace_on_change=True,
                    tags={**tags, "Name": f"{spec.name}-{label}", "herd:node-rank": str(rank),
                          **({"herd:replica": str(replica)} if spec.replicas > 1 else {}), **rollout},
                    opts=pulumi.ResourceOptions(parent=self, depends_on=[template, *self.parameters, *after]))
                if replica == 0:   # allocated before the nodes, so the head's certificate can name it
                    eip = eips[rank]
                    aws.ec2.EipAssociation(f"{name}-ip-{rank}-attach", allocation_id=eip.allocation_id,
                                           network_interface_id=node.primary_network_interface_id, opts=child)
                else:              # behind the load balancer: its certificate is the one clients see
                    eip = aws.ec2.Eip(f"{name}-r{replica}-ip-{rank}", domain="vpc",
                                      network_interface=node.primary_network_interface_id, tags=tags, opts=child)
                nodes.append(node)
                addresses.append(eip.public_ip)
            groups.append(nodes)
            if self.load_balancer is not None:
                attachment = self.load_balancer.attach(replica, nodes[0])
                if replica < spec.replicas - 1:
                    argv = pulumi.Output.all(self.load_balancer.target_group.arn, nodes[0].id).apply(
                        lambda known, r=replica: ["herd", "wait-healthy", "aws", "--region", section.region,
                                                  "--target-group", known[0], "--target", known[1],
                                                  "--port", str(spec.serving.port), "--replica", f"replica-{r}"])
                    gate = readiness_gate(f"{name}-r{replica}-ready", argv, nodes[0].id,
                                          depends_on=[attachment, *nodes], parent=self)
                    self.gates.append(gate)
        self.replicas = groups
        self.nodes = [node for group in groups for node in group]
        nodes = self.nodes
        self.head_address = addresses[0]
        self.node_addresses = pulumi.Output.all(*addresses)
        self.private_addresses = pulumi.Output.all(*[n.private_ip for n in nodes])
        if self.load_balancer is not None:
            self.endpoint = self.load_balancer.endpoint
        else:
            scheme = "https://" if self.tls.enabled else "http://"
            self.endpoint = pulumi.Output.concat(scheme, addresses[0], f":{spec.serving.port}")
        self.register_outputs({"endpoint": self.endpoint, "node_addresses": self.node_addresses})

    def _load_balancer(self, name: str, spec: Spec, vpc_id, subnet_id, tags: dict):
        """The ALB in front of the replicas' heads (attached as each is made), in the nodes' subnet and a
        second zone's subnet."""
        from infra.load_balancer import certificate_from_config
        from infra.load_balancer_aws import AwsLoadBalancer, AwsLoadBalancerArgs
        section = spec.aws_section
        if section.subnet_id:
            raise pulumi.RunError(f"replicas: {spec.replicas} with aws.subnet_id: the load balancer needs a second "
                                  "subnet in another zone, which herd makes only in a VPC of its own (remove "
                                  "aws.subnet_id, or use one replica)")
        child = pulumi.ResourceOptions(parent=self)
        zones = aws.get_availability_zones(state="available").names
        others = [z for z in sorted(zones) if z != self.zone]
        if not others:
            raise pulumi.RunError(f"aws.region: {section.region!r}: one zone only; an application load balancer "
                                  "needs two")
        lb_subnet = aws.ec2.Subnet(f"{name}-lb-subnet", vpc_id=vpc_id, cidr_block=LB_SUBNET_CIDR,
                                   availability_zone=others[0], map_public_ip_on_launch=False, tags=tags,
                                   opts=child)
        aws.ec2.RouteTableAssociation(f"{name}-routes-lb-subnet", subnet_id=lb_subnet.id,
                                      route_table_id=self.route_table.id, opts=child)
        return AwsLoadBalancer(f"{name}-lb", AwsLoadBalancerArgs(
            deployment=spec.name, vpc_id=vpc_id, subnet_ids=[subnet_id, lb_subnet.id],
            node_security_group=self.security_group, api_port=spec.serving.port,
            allowed_cidrs=section.allowed_cidrs, certificate=certificate_from_config("certificateArn", "aws"),
            tags=tags), opts=child)

    # ------------------------------------------------------------------ parts
    def _network(self, name: str, spec: Spec, offered: Sequence[str], tags: dict, child):
        """(VPC id, subnet id): the spec's subnet, which must be in a zone that offers the type, or a new
        VPC and subnet in the first wanted zone that does."""
        section = spec.aws_section
        if section.subnet_id:
            subnet = aws.ec2.get_subnet(id=section.subnet_id)
            choose_zone(section.instance_type, [subnet.availability_zone], offered,
                        f"aws.subnet_id: {section.subnet_id!r} (its zone)")
            return subnet.vpc_id, subnet.id
        zone = choose_zone(section.instance_type, section.availability_zones, offered)
        self.zone = zone
        vpc = aws.ec2.Vpc(f"{name}-vpc", cidr_block=VPC_CIDR, enable_dns_hostnames=True,
                          enable_dns_support=True, tags=tags, opts=child)
        gateway = aws.ec2.InternetGateway(f"{name}-igw", vpc_id=vpc.id, tags=tags, opts=child)
        subnet = aws.ec2.Subnet(f"{name}-subnet", vpc_id=vpc.id, cidr_block=SUBNET_CIDR, availability_zone=zone,
                                map_public_ip_on_launch=False, tags=tags, opts=child)
        routes = aws.ec2.RouteTable(f"{name}-routes", vpc_id=vpc.id, tags=tags, opts=child,
                                    routes=[aws.ec2.RouteTableRouteArgs(cidr_block="0.0.0.0/0",
                                                                        gateway_id=gateway.id)])
        self.route_table = routes
        aws.ec2.RouteTableAssociation(f"{name}-routes-subnet", subnet_id=subnet.id, route_table_id=routes.id,
                                      opts=child)
        return vpc.id, subnet.id

    def _artifacts(self, name: str, bundle: Path, tags: dict, child):
        """A private, encrypted bucket holding the node bundle (herd is not on a package index)."""
        bucket = aws.s3.Bucket(f"{name}-artifacts", force_destroy=True, tags=tags, opts=child)
        aws.s3.BucketPublicAccessBlock(f"{name}-artifacts-private", bucket=bucket.id, block_public_acls=True,
                                       block_public_policy=True, ignore_public_acls=True,
                                       restrict_public_buckets=True, opts=child)
        aws.s3.BucketServerSideEncryptionConfiguration(
            f"{name}-artifacts-sse", bucket=bucket.id, opts=child,
            rules=[aws.s3.BucketServerSideEncryptionConfigurationRuleArgs(
                apply_server_side_encryption_by_default=(
                    aws.s3.BucketServerSideEncryptionConfigurationRuleApplyServerSideEncryptionByDefaultArgs(
                        sse_algorithm="aws:kms", kms_master_key_id=self.key.arn)),
                bucket_key_enabled=True)])
        key = f"herd/{bundle.name}"
        aws.s3.BucketObjectv2(f"{name}-bundle", bucket=bucket.id, key=key, source=pulumi.FileAsset(str(bundle)),
                              server_side_encryption="aws:kms", kms_key_id=self.key.arn, opts=child)
        self.artifacts_bucket = bucket
        return bucket, key

    def _secrets(self, name: str, spec: Spec, args: AwsClusterArgs, head_eip, tags: dict, child) -> dict:
        """secret file name on the node -> SSM parameter name (SecureString, the deployment's key), all
        under the deployment's own path /herd/NAME/, which is all the nodes may read; plus the TLS
        parameters the spec names, if it does (the node role may read those two as well)."""
        out = {}
        self.parameters = []
        tls_values = self.tls.secrets(pulumi.Output.all(head_eip.public_ip, head_eip.public_dns))
        for file, value in (("api-key", args.api_key), ("hf-token", args.hf_token), *tls_values.items()):
            if value is None:
                continue
            param_name = f"{parameter_path(spec)}{file}"
            self.parameters.append(aws.ssm.Parameter(
                f"{name}-{file}", name=param_name, type="SecureString", key_id=self.key.arn,
                value=pulumi.Output.secret(value), tags=tags, opts=child))
            out[file] = param_name
        out.update(self.tls.references)
        return out

    def _role(self, name: str, spec: Spec, artifacts, bundle_key: str, secrets: dict, session_manager: bool,
              tags: dict, child):
        role = aws.iam.Role(f"{name}-node", tags=tags, opts=child, assume_role_policy=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                           "Principal": {"Service": "ec2.amazonaws.com"}}]}))
        caller = aws.get_caller_identity()
        partition = caller.arn.split(":")[1]          # aws, aws-cn, aws-us-gov: from the caller's own ARN
        region, account = spec.aws_section.region, caller.account_id
        weights = weight_buckets(spec)

        def policy(known: list[str]) -> str:
            artifacts_arn, key_arn = known
            statements = [
                # The node bundle: one object prefix of this deployment's bucket, read only.
                {"Sid": "Bundle", "Effect": "Allow", "Action": ["s3:GetObject"],
                 "Resource": [f"{artifacts_arn}/{bundle_key.rsplit('/', 1)[0]}/*"]},
                # Its key, to decrypt what SSM and S3 hand back (not usable directly, nor any other key).
                {"Sid": "DeploymentKey", "Effect": "Allow", "Action": ["kms:Decrypt"], "Resource": [key_arn],
                 "Condition": {"StringEquals": {"kms:ViaService": [f"ssm.{region}.amazonaws.com",
                                                                   f"s3.{region}.amazonaws.com"]}}},
            ]
            if weights:
                # The weights: list and read those buckets, nothing else (no write, no other bucket).
                arns = [f"arn:{partition}:s3:::{bucket}" for bucket in weights]
                statements += [
                    {"Sid": "WeightsList", "Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": arns},
                    {"Sid": "WeightsRead", "Effect": "Allow", "Action": ["s3:GetObject"],
                     "Resource": [f"{arn}/*" for arn in arns]},
                ]
            if secrets:
                # The deployment's parameters, by the ARN prefix of its own path, and the certificate
                # parameters the spec names, each by its own ARN.
                named = [f"arn:{partition}:ssm:{region}:{account}:parameter{'' if n.startswith('/') else '/'}{n}"
                         for n in self.tls.references.values()]
                statements.append({"Sid": "Secrets", "Effect": "Allow", "Action": ["ssm:GetParameter"],
                                   "Resource": [f"arn:{partition}:ssm:{region}:{account}:parameter"
                                                f"{parameter_path(spec)}*", *named]})
            if session_manager:
                statements.append({"Sid": "SessionManager", "Effect": "Allow", "Action": SESSION_MANAGER_ACTIONS,
                                   "Resource": "*"})
            return json.dumps({"Version": "2012-10-17", "Statement": statements})

        self.node_policy = aws.iam.RolePolicy(
            f"{name}-node-read", role=role.id, opts=child,
            policy=pulumi.Output.all(artifacts.arn, self.key.arn).apply(policy))
        self.role = role
        return aws.iam.InstanceProfile(f"{name}-node", role=role.name, tags=tags, opts=child)

    @staticmethod
    def _market(section: AwsSection) -> aws.ec2.LaunchTemplateInstanceMarketOptionsArgs | None:
        if section.capacity_block:
            return aws.ec2.LaunchTemplateInstanceMarketOptionsArgs(market_type="capacity-block")
        if section.spot:
            return aws.ec2.LaunchTemplateInstanceMarketOptionsArgs(
                market_type="spot", spot_options=aws.ec2.LaunchTemplateInstanceMarketOptionsSpotOptionsArgs(
                    instance_interruption_behavior="terminate", spot_instance_type="one-time"))
        return None

    @staticmethod
    def _reservation(section: AwsSection) -> aws.ec2.LaunchTemplateCapacityReservationSpecificationArgs | None:
        if not section.capacity_reservation_id:
            return None
        target = aws.ec2.LaunchTemplateCapacityReservationSpecificationCapacityReservationTargetArgs(
            capacity_reservation_id=section.capacity_reservation_id)
        return aws.ec2.LaunchTemplateCapacityReservationSpecificationArgs(capacity_reservation_target=target)
