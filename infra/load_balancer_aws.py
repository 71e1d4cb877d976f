"""AWS: an Application Load Balancer in front of the replicas' heads.

Why an ALB rather than an NLB with a TLS listener: the ALB checks health with a path and an exact status
(`/health/ready`, 200 only), balances per request by outstanding requests (an NLB balances
connections, so a client's keep-alive connection would pin it to one group), drains per request, and
its idle timeout (up to 4000 s) covers a long non-streaming generation; SSE streams pass through it as
ordinary chunked responses. One target group per deployment holds each replica's head; the nodes' API
port is open to the load balancer's security group only, the load balancer's port 443 to allowed_cidrs.
The heads bind every address, so they serve HTTPS only (herd's rule off loopback): the target group and
its health check speak HTTPS to them (an ALB does not verify a target's certificate; the hop stays
encrypted inside the VPC). tests/infra/test_lb_twin.py runs this declaration against a real head.
The ALB needs subnets in two zones: the nodes' subnet (one zone, for the cluster placement group) and
a second public subnet in another zone that holds only the load balancer's interfaces.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pulumi
import pulumi_aws as aws

from infra.load_balancer import (GENERATION_TIMEOUT_S, HEALTH_INTERVAL_S, HEALTH_PATH, HEALTH_TIMEOUT_S,
                                 HEALTHY_THRESHOLD, UNHEALTHY_THRESHOLD, Certificate)

# TLS 1.3 and 1.2 with forward-secret ciphers only.
SSL_POLICY = "ELBSecurityPolicy-TLS13-1-2-2021-06"
HTTPS_PORT = 443


@dataclass
class AwsLoadBalancerArgs:
    deployment: str
    vpc_id: pulumi.Input[str]
    subnet_ids: list[pulumi.Input[str]]           # two zones at least
    node_security_group: aws.ec2.SecurityGroup
    api_port: int
    allowed_cidrs: list[str]
    certificate: Certificate
    tags: dict
    heads: list[aws.ec2.Instance] = field(default_factory=list)   # one per replica; or attach() each


class AwsLoadBalancer(pulumi.ComponentResource):
    endpoint: pulumi.Output[str]

    def __init__(self, name: str, args: AwsLoadBalancerArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("herd:aws:LoadBalancer", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        tags = args.tags

        sg = aws.ec2.SecurityGroup(f"{name}-sg", vpc_id=args.vpc_id, tags=tags, opts=child,
                                   description=f"herd {args.deployment}: HTTPS from named CIDRs to the load balancer")
        self.security_group = sg
        for i, cidr in enumerate(args.allowed_cidrs):
            aws.vpc.SecurityGroupIngressRule(f"{name}-https-{i}", security_group_id=sg.id, ip_protocol="tcp",
                                             from_port=HTTPS_PORT, to_port=HTTPS_PORT, cidr_ipv4=cidr,
                                             description=f"https from {cidr}", opts=child)
        # Out: only to the nodes, only on the API port (requests and health checks).
        aws.vpc.SecurityGroupEgressRule(f"{name}-to-nodes", security_group_id=sg.id, ip_protocol="tcp",
                                        from_port=args.api_port, to_port=args.api_port,
                                        referenced_security_group_id=args.node_security_group.id,
                                        description="api to the replicas' heads", opts=child)
        # In on the nodes: the API port from the load balancer only.
        aws.vpc.SecurityGroupIngressRule(f"{name}-api-from-lb", security_group_id=args.node_security_group.id,
                                         ip_protocol="tcp", from_port=args.api_port, to_port=args.api_port,
                                         referenced_security_group_id=sg.id,
                                         description="api from the load balancer", opts=child)

        self.target_group = aws.lb.TargetGroup(
            f"{name}-heads", port=args.api_port, protocol="HTTPS", protocol_version="HTTP1",
            target_type="instance", vpc_id=args.vpc_id, tags=tags, opts=child,
            # The group with the fewest requests in flight gets the next one (HAProxy's leastconn).
            load_balancing_algorithm_type="least_outstanding_requests",
            deregistration_delay=GENERATION_TIMEOUT_S,
            health_check=aws.lb.TargetGroupHealthCheckArgs(
                enabled=True, protocol="HTTPS", port="traffic-port", path=HEALTH_PATH, matcher="200",
                interval=HEALTH_INTERVAL_S, timeout=HEALTH_TIMEOUT_S, healthy_threshold=HEALTHY_THRESHOLD,
                unhealthy_threshold=UNHEALTHY_THRESHOLD))
        self._name, self._port, self._child = name, args.api_port, child
        self.attachments = [self.attach(r, head) for r, head in enumerate(args.heads)]

        self.load_balancer = aws.lb.LoadBalancer(
            f"{name}-alb", load_balancer_type="application", internal=False, security_groups=[sg.id],
            subnets=args.subnet_ids, idle_timeout=GENERATION_TIMEOUT_S, drop_invalid_header_fields=True,
            enable_http2=True, tags=tags, opts=child)

        cert = args.certificate
        if cert.existing:
            certificate_arn = cert.existing
        else:
            imported = aws.acm.Certificate(f"{name}-cert", certificate_body=cert.body,
                                           private_key=pulumi.Output.secret(cert.private_key),
                                           certificate_chain=cert.chain, tags=tags, opts=child)
            certificate_arn = imported.arn
        self.listener = aws.lb.Listener(
            f"{name}-https", load_balancer_arn=self.load_balancer.arn, port=HTTPS_PORT, protocol="HTTPS",
            ssl_policy=SSL_POLICY, certificate_arn=certificate_arn, opts=child,
            default_actions=[aws.lb.ListenerDefaultActionArgs(type="forward", target_group_arn=self.target_group.arn)])
        self.endpoint = pulumi.Output.concat("https://", self.load_balancer.dns_name)
        self.register_outputs({"endpoint": self.endpoint})

    def attach(self, replica: int, head: aws.ec2.Instance) -> aws.lb.TargetGroupAttachment:
        """Put replica `replica`'s head in the target group (the cluster does so as each replica is made,
        so the next one can wait until it is healthy)."""
        return aws.lb.TargetGroupAttachment(f"{self._name}-replica-{replica}", target_group_arn=self.target_group.arn,
                                            target_id=head.id, port=self._port, opts=self._child)
