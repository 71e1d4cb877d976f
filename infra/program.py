"""The Pulumi program: the stack's environment file -> the target's component -> stack outputs."""
from __future__ import annotations

import shlex
import sys

import pulumi
from rich.console import Console

from infra.stack import read_stack


def main():
    inputs = read_stack()
    spec, plan = inputs.spec, inputs.plan
    console = Console(file=sys.stderr)
    from provisioning.bundle import node_bundle
    bundle = node_bundle(inputs.env_path, console)
    if spec.target == "aws":
        from infra.aws_cluster import SSH_USER, AwsCluster, AwsClusterArgs
        cluster = AwsCluster(spec.name, AwsClusterArgs(spec, plan, bundle, inputs.api_key, inputs.hf_token,
                                                          tls=inputs.tls))
        ssh = cluster.node_addresses.apply(lambda ips: [f"ssh {SSH_USER}@{ip}" for ip in ips])
    elif spec.target == "gcp" and plan.slice_hosts is not None:
        from infra.gcp_foundation import GcpClusterArgs
        from infra.gcp_tpu_cluster import TpuCluster
        cluster = TpuCluster(spec.name, GcpClusterArgs(spec, plan, bundle, inputs.api_key, inputs.hf_token,
                                                       tls=inputs.tls))
        ssh = pulumi.Output.from_input([f"gcloud compute tpus tpu-vm ssh {spec.name}-slice --worker {rank} "
                                        f"--zone {spec.gcp_section.zone} --project {spec.gcp_section.project}"
                                        for rank in range(plan.nodes)])
    elif spec.target == "gcp":
        from infra.gcp_cluster import GcpCluster
        from infra.gcp_foundation import GcpClusterArgs
        cluster = GcpCluster(spec.name, GcpClusterArgs(spec, plan, bundle, inputs.api_key, inputs.hf_token,
                                                          tls=inputs.tls))
        ssh = pulumi.Output.from_input([f"gcloud compute ssh {spec.name}-node-{rank} --zone {spec.gcp_section.zone} "
                                        f"--project {spec.gcp_section.project}" for rank in range(plan.nodes)])
    elif spec.target == "onprem":
        from infra.onprem_cluster import OnpremCluster, OnpremClusterArgs
        from provisioning.bundle import wheel_bundle
        cluster = OnpremCluster(spec.name, OnpremClusterArgs(spec, plan, bundle, wheel_bundle(console),
                                                             inputs.api_key, tls=inputs.tls))
        ssh = pulumi.Output.from_input([f"ssh -p {h.port} {h.user}@{h.address}"
                                        for h in spec.onprem_section.hosts[:plan.nodes]])
    else:
        raise pulumi.RunError(f"target: {spec.target!r}: has no infrastructure (allowed in a stack: aws, gcp, "
                              "onprem); run `herd up` for it")
    key_flag = f" --api-key-env {spec.serving.api_key_env}" if spec.serving.api_key_env else ""
    ca_file = inputs.tls.ca_file if inputs.tls else None
    # The CA clients pin: its path on this machine (for the smoke command) and, for everyone else, the
    # certificate itself and its fingerprint (public: it is the private key that stays here).
    ca_flag = f" --ca-file {shlex.quote(str(ca_file))}" if ca_file else ""
    outputs = {
        "endpoint": cluster.endpoint,
        "head_address": cluster.head_address,
        "node_addresses": cluster.node_addresses,
        "ssh": ssh,
        "smoke": cluster.endpoint.apply(lambda url: f"herd smoke --endpoint {url}{ca_flag}{key_flag}"),
        "plan": {"nodes": plan.nodes, "gpus_per_node": plan.gpus_per_node,
                 "cost_usd_per_hour": plan.cost_usd_per_hour,
                 "cost_usd_per_million_tokens": plan.cost_usd_per_million_tokens,
                 "cold_start_s": round(plan.cold_start_s)},
    }
    if ca_file is not None:
        from runtime.serving.tls import fingerprint
        outputs.update(ca_file=str(ca_file), ca_fingerprint=fingerprint(ca_file), ca_certificate=ca_file.read_text())
    for name, value in outputs.items():
        pulumi.export(name, value)
    return outputs
