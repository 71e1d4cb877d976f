"""The load balancer twin: HAProxy configured from what a Pulumi program declares for the cloud's load
balancer, and from nothing herd knows about its own heads.

A cloud balancer runs what its resources say: the listener's protocol and port, the target group's
(AWS) or backend service's (GCP) protocol to the heads, and the health check's protocol, port, path,
expected status, interval, timeout and thresholds. Pulumi's mocks accept any of these values; the twin
reads them back from the mocks and makes HAProxy behave the same way against real herd heads, so a
value the heads cannot answer (plain HTTP to a head that serves HTTPS) fails here as it would there.
Both clouds connect to HTTPS backends without verifying their certificate (ALB and GCP's external
Application Load Balancer alike), and so does the twin.
"""
from __future__ import annotations

from dataclasses import dataclass

AWS_TARGET_GROUP = "aws:lb/targetGroup:TargetGroup"
AWS_LISTENER = "aws:lb/listener:Listener"
AWS_LOAD_BALANCER = "aws:lb/loadBalancer:LoadBalancer"
GCP_HEALTH_CHECK = "gcp:compute/healthCheck:HealthCheck"
GCP_INSTANCE_GROUP = "gcp:compute/instanceGroup:InstanceGroup"
GCP_BACKEND_SERVICE = "gcp:compute/backendService:BackendService"
GCP_PROXY = "gcp:compute/targetHttpsProxy:TargetHttpsProxy"
GCP_FORWARDING_RULE = "gcp:compute/globalForwardingRule:GlobalForwardingRule"


@dataclass(frozen=True)
class DeclaredBalancer:
    """One cloud load balancer, as its resources declare it."""
    cloud: str
    listener_protocol: str       # what clients speak to the balancer
    listener_port: int
    backend_protocol: str        # what the balancer speaks to the heads
    api_port: int                # the port the heads are declared to serve on
    check_protocol: str
    check_port: int | None       # None: the traffic port
    check_path: str
    check_status: str            # the status a healthy head answers
    interval_s: int
    timeout_s: int
    healthy_threshold: int
    unhealthy_threshold: int
    backend_timeout_s: int       # how long a response may take
    drain_s: int


def declared_aws(mocks) -> DeclaredBalancer:
    group = mocks.one(AWS_TARGET_GROUP).inputs
    check = group["healthCheck"]
    listener = mocks.one(AWS_LISTENER).inputs
    balancer = mocks.one(AWS_LOAD_BALANCER).inputs
    port = check.get("port", "traffic-port")
    return DeclaredBalancer(
        cloud="aws", listener_protocol=listener["protocol"], listener_port=int(listener["port"]),
        backend_protocol=group["protocol"], api_port=int(group["port"]), check_protocol=check["protocol"],
        check_port=None if port == "traffic-port" else int(port), check_path=check["path"],
        check_status=check["matcher"], interval_s=int(check["interval"]), timeout_s=int(check["timeout"]),
        healthy_threshold=int(check["healthyThreshold"]), unhealthy_threshold=int(check["unhealthyThreshold"]),
        # An ALB waits for a response as long as its idle timeout.
        backend_timeout_s=int(balancer["idleTimeout"]), drain_s=int(group["deregistrationDelay"]))


def declared_gcp(mocks) -> DeclaredBalancer:
    check = mocks.one(GCP_HEALTH_CHECK).inputs
    service = mocks.one(GCP_BACKEND_SERVICE).inputs
    mocks.one(GCP_PROXY)                       # the listener: a target HTTPS proxy...
    rule = mocks.one(GCP_FORWARDING_RULE).inputs
    (named,) = {p["port"] for g in mocks.of_type(GCP_INSTANCE_GROUP) for p in g.inputs["namedPorts"]
                if p["name"] == service["portName"]}
    kinds = {"httpHealthCheck": "HTTP", "httpsHealthCheck": "HTTPS", "http2HealthCheck": "HTTP2"}
    (kind,) = [k for k in kinds if check.get(k)]
    probe = check[kind]
    return DeclaredBalancer(
        cloud="gcp", listener_protocol="HTTPS", listener_port=int(rule["portRange"]),   # ...on its rule's port
        backend_protocol=service["protocol"], api_port=int(named), check_protocol=kinds[kind],
        check_port=int(probe["port"]) if probe.get("port") else None, check_path=probe.get("requestPath", "/"),
        check_status="200",   # GCP's HTTP(S) health checks pass on 200 only
        interval_s=int(check["checkIntervalSec"]), timeout_s=int(check["timeoutSec"]),
        healthy_threshold=int(check["healthyThreshold"]), unhealthy_threshold=int(check["unhealthyThreshold"]),
        backend_timeout_s=int(service["timeoutSec"]), drain_s=int(service["connectionDrainingTimeoutSec"]))


@dataclass(frozen=True)
class Head:
    name: str
    address: str
    port: int    # where this head listens: it stands for the declared API port (on a cloud node, that port)


def haproxy_config(declared: DeclaredBalancer, heads: list[Head], listen_port: int, pem: str, socket: str) -> str:
    """HAProxy behaving as the declared balancer: `listen_port` stands for the listener's port on
    loopback, `pem` for the listener's certificate."""
    if declared.listener_protocol != "HTTPS":
        raise ValueError(f"the twin serves the clouds' HTTPS listeners only, not {declared.listener_protocol}")
    to_heads = "ssl verify none" if declared.backend_protocol == "HTTPS" else ""
    # The probe's own protocol, whatever the traffic's (HAProxy: checks follow `ssl` unless told).
    probe_tls = {"HTTPS": "check-ssl", "HTTP": "no-check-ssl" if to_heads else ""}.get(declared.check_protocol)
    if probe_tls is None:
        raise ValueError(f"the twin has no {declared.check_protocol} health check")
    def probe_port(head: Head) -> int:
        # A check of the declared API port reaches the head where it really listens; a check of any
        # other port goes to that port, where nothing answers (as on the cloud).
        return head.port if declared.check_port in (None, declared.api_port) else int(declared.check_port)
    servers = "\n".join(f"  server {h.name} {h.address}:{h.port} check {to_heads} {probe_tls} port {probe_port(h)}"
                         for h in heads)
    return f"""global
  stats socket {socket} mode 600 level admin
defaults
  mode http
  timeout connect 5s
  timeout client {declared.backend_timeout_s}s
  timeout server {declared.backend_timeout_s}s
  timeout check {declared.timeout_s}s
frontend listener
  bind 127.0.0.1:{listen_port} ssl crt {pem}
  default_backend heads
backend heads
  balance leastconn
  option httpchk GET {declared.check_path}
  http-check expect status {declared.check_status}
  default-server inter {declared.interval_s}s rise {declared.healthy_threshold} fall {declared.unhealthy_threshold}
{servers}
"""
