"""What the clouds' load balancers in front of the replicas share: the health signal, the timings, and
where the HTTPS certificate comes from.

Health: `/health/ready` answers 200 only when every rank of a group is loaded and a canary generation
answered; anything else takes the group out of rotation. Checked every 5 s, out after 2 failures: a dead
group leaves within about 2 x 5 s + the 3 s check timeout = 13 s (the issue's goal: ~15 s).

Timeouts: the clouds' defaults (ALB idle timeout 60 s, GCP backend service 30 s) cut a long non-streaming
generation, which sends nothing until it ends: both get the same generation timeout as the on-prem
HAProxy (15 min), and draining (deregistration delay / connection draining) lasts as long, so a group
taken out of rotation finishes the generations it has (a target with nothing in flight leaves at once).

The certificate (until the spec's own TLS section names one): the stack configuration either names an
existing certificate (`herd:certificateArn`, an ACM ARN, on AWS; `herd:sslCertificate`, a
compute SSL certificate's self link, on GCP) or holds the certificate to import
(`herd:tlsCertificate`: the PEM certificate; `herd:tlsPrivateKey`, set with --secret: its key;
`herd:tlsChain`: the intermediates, optional).
"""
from __future__ import annotations

from dataclasses import dataclass

import pulumi

from provisioning.haproxy import GENERATION_TIMEOUT_S

__all__ = ["GENERATION_TIMEOUT_S", "HEALTH_PATH", "DETECTION_S", "Certificate", "certificate_from_config"]
HEALTH_PATH = "/health/ready"
HEALTH_INTERVAL_S = 5
HEALTH_TIMEOUT_S = 3
HEALTHY_THRESHOLD = 2
UNHEALTHY_THRESHOLD = 2
# How long after a group dies the balancer has stopped sending to it, at most.
DETECTION_S = UNHEALTHY_THRESHOLD * HEALTH_INTERVAL_S + HEALTH_TIMEOUT_S
# Google Front Ends: where GCP's health checks and its external Application Load Balancer's proxies
# connect from (the nodes' API port is open to these ranges only).
GCP_FRONT_END_RANGES = ["35.191.0.0/16", "130.211.0.0/22"]


@dataclass
class Certificate:
    """Either an existing certificate (`existing`: ACM ARN / GCP self link) or PEM material to import."""
    existing: str | None = None
    body: str | None = None
    private_key: pulumi.Input[str] | None = None     # secret
    chain: str | None = None


def certificate_from_config(existing_key: str, cloud: str) -> Certificate:
    config = pulumi.Config("herd")
    existing = config.get(existing_key)
    body = config.get("tlsCertificate")
    key = config.get_secret("tlsPrivateKey")
    if existing and body:
        raise pulumi.RunError(f"herd:{existing_key} and herd:tlsCertificate both set: name one certificate")
    if existing:
        return Certificate(existing=existing)
    if body and key is not None:
        return Certificate(body=body, private_key=key, chain=config.get("tlsChain"))
    raise pulumi.RunError(
        f"replicas on {cloud} are served through a load balancer with an HTTPS listener, which needs a "
        f"certificate: `pulumi config set herd:{existing_key} ...` (an existing one) or `pulumi config set "
        "herd:tlsCertificate -- \"$(cat cert.pem)\"` and `pulumi config set --secret herd:tlsPrivateKey -- "
        "\"$(cat key.pem)\"` (imported)")
