"""Waiting, from the machine that runs `pulumi up`, until a replica's head is healthy in its cloud load
balancer: the gate between one replica and the next (infra/rollout_gate.py).

The load balancer's own view is the signal: the target group's health (AWS) or the backend service's
(GCP) is `/health/ready` answered 200 from inside the VPC, the same check that puts the replica in
rotation. The nodes' API port is closed to everyone else, this machine included, so herd asks the
cloud's API instead of the node.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Console

from runtime.errors import UserError


@dataclass(frozen=True)
class Health:
    healthy: bool
    state: str          # the cloud's word: healthy, initial, unhealthy, unused / HEALTHY, UNHEALTHY, ...
    reason: str = ""


def wait_until_healthy(what: str, probe: Callable[[], Health], timeout: float, poll_s: float,
                       console: Console) -> float:
    """Poll `probe` until healthy; the seconds it took. Refuses with the last state after `timeout`."""
    started = time.monotonic()
    last = Health(False, "not asked yet")
    with console.status(f"waiting for {what} to be healthy in the load balancer") as status:
        while True:
            last = probe()
            waited = time.monotonic() - started
            if last.healthy:
                console.print(f"{what}: healthy after {waited:.0f}s")
                return waited
            if waited >= timeout:
                raise UserError(f"{what}: not healthy within {timeout:.0f}s (last state: {last.state}"
                                + (f", {last.reason}" if last.reason else "") + "); the replicas after it were "
                                "not replaced")
            status.update(f"waiting for {what} to be healthy in the load balancer: {last.state} after "
                          f"{waited:.0f}s")
            time.sleep(poll_s)


def aws_target_health(region: str, target_group_arn: str, target_id: str, port: int) -> Callable[[], Health]:
    """The target group's view of one target (boto3; AWS_ENDPOINT_URL points it elsewhere, e.g. moto)."""
    import boto3
    client = boto3.client("elbv2", region_name=region)

    def probe() -> Health:
        found = client.describe_target_health(TargetGroupArn=target_group_arn,
                                              Targets=[{"Id": target_id, "Port": port}])["TargetHealthDescriptions"]
        health = found[0]["TargetHealth"] if found else {"State": "unknown"}
        return Health(health["State"] == "healthy", health["State"], health.get("Reason", ""))
    return probe


def gcp_group_health(project: str, backend_service: str, group: str, endpoint: str | None = None) -> Callable[[], Health]:
    """The backend service's view of one instance group (a replica's head): healthy when its instance is
    HEALTHY. HERD_GCE_ENDPOINT (or `endpoint`) points the client elsewhere, as for preflight."""
    from google.cloud import compute_v1

    from infra.preflight.gcp import client_kwargs
    client = compute_v1.BackendServicesClient(**client_kwargs(endpoint))
    reference = compute_v1.ResourceGroupReference(group=group)

    def probe() -> Health:
        answer = client.get_health(project=project, backend_service=backend_service,
                                   resource_group_reference_resource=reference)
        states = [status.health_state for status in answer.health_status]
        return Health(bool(states) and all(s == "HEALTHY" for s in states), ", ".join(states) or "no instance")
    return probe


# ------------------------------------------------------------------ the command
def add_wait_healthy(sub) -> None:
    p = sub.add_parser("wait-healthy", help="wait until a replica's head is healthy in its cloud load balancer "
                                            "(run by `pulumi up` between replicas)")
    clouds = p.add_subparsers(dest="cloud", required=True)
    aws = clouds.add_parser("aws")
    aws.add_argument("--region", required=True)
    aws.add_argument("--target-group", required=True, help="the target group's ARN")
    aws.add_argument("--target", required=True, help="the head's instance id")
    aws.add_argument("--port", type=int, required=True)
    gcp = clouds.add_parser("gcp")
    gcp.add_argument("--project", required=True)
    gcp.add_argument("--backend-service", required=True, help="the backend service's name")
    gcp.add_argument("--group", required=True, help="the replica's instance group (self link)")
    for cloud in (aws, gcp):
        cloud.add_argument("--replica", required=True, help="what to call it in messages")
        cloud.add_argument("--timeout", type=float, default=3600, help="seconds (default: 3600)")
        cloud.add_argument("--poll", type=float, default=10, help="seconds between checks (default: 10)")
    p.set_defaults(func=cmd_wait_healthy)


def cmd_wait_healthy(args) -> int:
    console = Console(stderr=True)
    if args.cloud == "aws":
        probe = aws_target_health(args.region, args.target_group, args.target, args.port)
        what = f"{args.replica} (instance {args.target})"
    else:
        probe = gcp_group_health(args.project, args.backend_service, args.group)
        what = f"{args.replica} (group {args.group.rsplit('/', 1)[-1]})"
    wait_until_healthy(what, probe, args.timeout, args.poll, console)
    print(args.target if args.cloud == "aws" else args.group)   # the gate's output: what is healthy
    return 0
