"""What every GCP deployment's nodes stand on, A2/A3 instances and TPU slices alike.

The network and firewall (all traffic among the nodes; the API port and SSH only from the spec's
allowed_cidrs), the nodes' service account with no project-level role (every grant is bound on the
one bucket or secret it is for), the private artifacts bucket holding the node bundle, read access to
the weights buckets, and the deployment's secrets (API key, hub token, the head's TLS certificate and
key) readable by that account alone. Created as children of the cluster component, under the names a
GCP deployment has always had.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pulumi
import pulumi_gcp as gcp

from infra.gcp_types import region_of
from infra.nodes import weight_buckets
from infra.stack import StackTls, stack_tls
from runtime.planning.planner import Plan
from runtime.planning.spec import Spec

SUBNET_CIDR = "10.42.0.0/20"


@dataclass
class GcpClusterArgs:
    """What a GCP cluster component (GPU nodes or a TPU slice) is made from."""
    spec: Spec
    plan: Plan
    bundle: Path
    api_key: pulumi.Input[str] | None = None
    hf_token: pulumi.Input[str] | None = None
    tls: StackTls | None = None                    # the head's certificate (None: stack_tls(spec))


@dataclass
class GcpSecrets:
    ids: dict[str, str] = field(default_factory=dict)                 # file name -> Secret Manager id
    versions: list[pulumi.Resource] = field(default_factory=list)    # what a node's boot must follow


class GcpFoundation:
    def __init__(self, parent: pulumi.ComponentResource, name: str, spec: Spec, bundle_name: str,
                 bundle_path: str, tls: StackTls | None):
        section = spec.gcp_section
        self.name, self.spec, self.parent = name, spec, parent
        child = self.child = pulumi.ResourceOptions(parent=parent)
        self.region = region_of(section.zone)
        self.tag = f"herd-{spec.name}"
        self.labels = {"herd-deployment": spec.name}

        # GPU NICs and NCCL prefer jumbo frames: 8896 is GCP's largest MTU.
        self.network = gcp.compute.Network(f"{name}-net", auto_create_subnetworks=False, mtu=8896, opts=child)
        self.subnet = gcp.compute.Subnetwork(f"{name}-subnet", network=self.network.id, region=self.region,
                                             ip_cidr_range=SUBNET_CIDR, private_ip_google_access=True, opts=child)
        self.internal_firewall = gcp.compute.Firewall(
            f"{name}-internal", network=self.network.id, direction="INGRESS", source_tags=[self.tag],
            target_tags=[self.tag], allows=[gcp.compute.FirewallAllowArgs(protocol=p) for p in ("tcp", "udp", "icmp")],
            opts=child)
        # The API port from allowed_cidrs to the one group; with replicas, only from the load balancer.
        direct = [str(spec.serving.port)] if spec.replicas == 1 else []
        self.external_firewall = gcp.compute.Firewall(
            f"{name}-api-ssh", network=self.network.id, direction="INGRESS",
            source_ranges=section.allowed_cidrs, target_tags=[self.tag],
            allows=[gcp.compute.FirewallAllowArgs(protocol="tcp", ports=[*direct, "22"])], opts=child)

        self.account = gcp.serviceaccount.Account(f"{name}-nodes", account_id=f"herd-{spec.name}"[:30].rstrip("-"),
                                                  display_name=f"herd {spec.name} nodes", opts=child)
        self.member = self.account.email.apply(lambda email: f"serviceAccount:{email}")

        self.bucket = gcp.storage.Bucket(f"{name}-artifacts", location=self.region.upper(), force_destroy=True,
                                         uniform_bucket_level_access=True, public_access_prevention="enforced",
                                         labels=self.labels, opts=child)
        bundle_key = f"herd/{bundle_name}"
        gcp.storage.BucketObject(f"{name}-bundle", bucket=self.bucket.name, name=bundle_key,
                                 source=pulumi.FileAsset(bundle_path), opts=child)
        self.bundle_uri = pulumi.Output.concat("gs://", self.bucket.name, "/", bundle_key)
        # objectViewer (get and list objects) on the artifacts bucket and the weights buckets.
        readable = [("artifacts", self.bucket.name)] + [(f"weights-{i}" if i else "weights", b)
                                                        for i, b in enumerate(weight_buckets(spec))]
        for label, bucket_name in readable:
            gcp.storage.BucketIAMMember(f"{name}-{label}-read", bucket=bucket_name,
                                        role="roles/storage.objectViewer", member=self.member, opts=child)
        self.tls = tls or stack_tls(spec, spec.name)

    def secrets(self, values: dict[str, pulumi.Input[str] | None]) -> GcpSecrets:
        """`values` (API key, hub token; None: not set) in Secret Manager, each readable by the nodes'
        account alone."""
        out = GcpSecrets()
        for file, value in values.items():
            if value is not None:
                self._secret(file, value, out)
        return out

    def tls_secrets(self, head_addresses: pulumi.Input, out: GcpSecrets | None = None) -> GcpSecrets:
        """The head's certificate and key, signed for `head_addresses`, stored like the other secrets; or
        the spec's own certificate secrets, which the nodes' account may then read (those two only)."""
        out = out or GcpSecrets()
        for file, value in self.tls.secrets(head_addresses).items():
            self._secret(file, value, out)
        for file, secret_id in self.tls.references.items():
            gcp.secretmanager.SecretIamMember(f"{self.name}-{file}-read", project=self.spec.gcp_section.project,
                                              secret_id=secret_id, member=self.member,
                                              role="roles/secretmanager.secretAccessor", opts=self.child)
            out.ids[file] = secret_id
        return out

    def _secret(self, file: str, value: pulumi.Input[str], out: GcpSecrets) -> None:
        secret_id = f"herd-{self.spec.name}-{file}"
        secret = gcp.secretmanager.Secret(
            f"{self.name}-{file}", secret_id=secret_id, labels=self.labels, opts=self.child,
            replication=gcp.secretmanager.SecretReplicationArgs(auto=gcp.secretmanager.SecretReplicationAutoArgs()))
        out.versions.append(gcp.secretmanager.SecretVersion(f"{self.name}-{file}-v", secret=secret.id,
                                                            secret_data=pulumi.Output.secret(value), opts=self.child))
        gcp.secretmanager.SecretIamMember(f"{self.name}-{file}-read", secret_id=secret.id, member=self.member,
                                          role="roles/secretmanager.secretAccessor", opts=self.child)
        out.ids[file] = secret_id
