"""GCP: a global external Application Load Balancer in front of the replicas' heads.

One unmanaged instance group per replica holds its head (named port `api`; the head joins it as the
cluster makes it, InstanceGroupMembership, so the next replica can wait until it is healthy); one backend service over
those groups checks `/health/ready` over HTTPS (a GCP HTTPS health check passes on 200 only; the
heads bind every address, so they serve HTTPS only, and Google's front ends do not verify a backend's
certificate: tests/infra/test_lb_twin.py runs this declaration against a real head), balances per request
to the group with the fewest requests in flight (LEAST_REQUEST), waits the generation timeout for a
response (the default 30 s cuts a long non-streaming generation) and drains a removed group as long.
The HTTPS proxy holds the deployment's certificate; a global address and forwarding rule on 443 are
the endpoint. The nodes' API port is open only to Google's front ends (health checks and the load
balancer's proxies connect from 35.191.0.0/16 and 130.211.0.0/22), no longer to allowed_cidrs.
"""
from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_gcp as gcp

from infra.load_balancer import (GCP_FRONT_END_RANGES, GENERATION_TIMEOUT_S, HEALTH_INTERVAL_S, HEALTH_PATH,
                                 HEALTH_TIMEOUT_S, HEALTHY_THRESHOLD, UNHEALTHY_THRESHOLD, Certificate)

PORT_NAME = "api"


@dataclass
class GcpLoadBalancerArgs:
    deployment: str
    zone: str
    network: pulumi.Input[str]
    node_tag: str
    api_port: int
    replicas: int                                 # one instance group each; attach() puts its head in
    certificate: Certificate
    labels: dict


class GcpLoadBalancer(pulumi.ComponentResource):
    endpoint: pulumi.Output[str]

    def __init__(self, name: str, args: GcpLoadBalancerArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("herd:gcp:LoadBalancer", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)

        # The heads' API port: from Google's front ends only (health checks and the proxies).
        self.firewall = gcp.compute.Firewall(
            f"{name}-front-ends", network=args.network, direction="INGRESS", source_ranges=GCP_FRONT_END_RANGES,
            target_tags=[args.node_tag], allows=[gcp.compute.FirewallAllowArgs(protocol="tcp",
                                                                               ports=[str(args.api_port)])],
            description=f"herd {args.deployment}: the load balancer and its health checks to the API", opts=child)

        self.groups = [
            gcp.compute.InstanceGroup(f"{name}-replica-{r}", zone=args.zone, network=args.network,
                                      named_ports=[gcp.compute.InstanceGroupNamedPortArgs(name=PORT_NAME,
                                                                                          port=args.api_port)],
                                      description=f"herd {args.deployment}: replica {r}'s head", opts=child)
            for r in range(args.replicas)]
        self._name, self._zone, self._child = name, args.zone, child

        self.health_check = gcp.compute.HealthCheck(
            f"{name}-ready", check_interval_sec=HEALTH_INTERVAL_S, timeout_sec=HEALTH_TIMEOUT_S,
            healthy_threshold=HEALTHY_THRESHOLD, unhealthy_threshold=UNHEALTHY_THRESHOLD,
            https_health_check=gcp.compute.HealthCheckHttpsHealthCheckArgs(port=args.api_port,
                                                                           request_path=HEALTH_PATH),
            opts=child)

        self.backend_service = gcp.compute.BackendService(
            f"{name}-replicas", load_balancing_scheme="EXTERNAL_MANAGED", protocol="HTTPS", port_name=PORT_NAME,
            health_checks=self.health_check.id, timeout_sec=GENERATION_TIMEOUT_S,
            connection_draining_timeout_sec=GENERATION_TIMEOUT_S, locality_lb_policy="LEAST_REQUEST",
            backends=[gcp.compute.BackendServiceBackendArgs(group=group.self_link, balancing_mode="UTILIZATION",
                                                            capacity_scaler=1.0)
                      for group in self.groups],
            opts=child)
        self.url_map = gcp.compute.URLMap(f"{name}-urls", default_service=self.backend_service.id, opts=child)

        cert = args.certificate
        if cert.existing:
            certificate = cert.existing
        else:
            certificate = gcp.compute.SSLCertificate(
                f"{name}-cert", certificate="\n".join(p.strip() for p in (cert.body, cert.chain) if p) + "\n",
                private_key=pulumi.Output.secret(cert.private_key), opts=child).id
        self.proxy = gcp.compute.TargetHttpsProxy(f"{name}-https", url_map=self.url_map.id,
                                                  ssl_certificates=[certificate], opts=child)
        self.address = gcp.compute.GlobalAddress(f"{name}-ip", labels=args.labels, opts=child)
        self.forwarding_rule = gcp.compute.GlobalForwardingRule(
            f"{name}-443", target=self.proxy.id, ip_address=self.address.address, port_range="443",
            ip_protocol="TCP", load_balancing_scheme="EXTERNAL_MANAGED", labels=args.labels, opts=child)
        self.endpoint = pulumi.Output.concat("https://", self.address.address)
        self.register_outputs({"endpoint": self.endpoint})

    def attach(self, replica: int, head: gcp.compute.Instance) -> gcp.compute.InstanceGroupMembership:
        """Put replica `replica`'s head in its instance group, behind the backend service."""
        return gcp.compute.InstanceGroupMembership(f"{self._name}-replica-{replica}-head", zone=self._zone,
                                                   instance_group=self.groups[replica].name,
                                                   instance=head.self_link, opts=self._child)
