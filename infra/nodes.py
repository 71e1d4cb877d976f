"""What every cloud node runs: its provisioning steps and boot script, from the spec and the plan.

The head (node 0) serves the API and hosts the rendezvous; it learns its own address at boot. Workers
get the head's private address, known once the head instance exists (a Pulumi Output).
"""
from __future__ import annotations

from typing import Callable

import pulumi

from provisioning.boot import NODE_ADDR, BootSources, boot_script
from provisioning.steps import HostSteps, cloud_profiles, plan_host
from runtime.planning.planner import Plan
from runtime.planning.spec import Spec

HOME = "/opt/herd"


def weight_buckets(spec: Spec) -> list[str]:
    """The buckets a cloud's nodes read weights from: the section's weights_bucket and the model source's
    bucket (s3:// on AWS, gs:// on GCP)."""
    section = spec.target_section
    scheme = {"aws": "s3://", "gcp": "gs://"}[spec.target]
    buckets = [section.weights_bucket] if section.weights_bucket else []
    source = spec.model.source or ""
    if source.startswith(scheme):
        bucket = source.removeprefix(scheme).split("/", 1)[0]
        if bucket and bucket not in buckets:
            buckets.append(bucket)
    return buckets


def disk_gb(plan: Plan) -> int:
    """A node's disk: the weights, a partial copy while fetching, the venv and engine, the OS."""
    return int(plan.weights_total_bytes * 2.2 / 1e9) + 150


def node_steps(spec: Spec, plan: Plan, head_addr: str) -> list[HostSteps]:
    model_dir = f"{HOME}/models/{spec.model.id}"
    return [plan_host(spec, plan, profile, head_addr if profile.node_rank else NODE_ADDR, model_dir,
                      spec.model.source, f"{HOME}/environment.yaml")
            for profile in cloud_profiles(spec, plan, NODE_ADDR)]


def node_boot(spec: Spec, plan: Plan, rank: int, sources: Callable[[str], BootSources],
              bundle_uri: pulumi.Input[str], head_addr: pulumi.Input[str] | None = None) -> pulumi.Output[str]:
    """Node `rank`'s boot script, once the bundle's location (and, for a worker, the head's address)
    are known. `sources` makes the cloud's BootSources from the bundle URI."""
    if rank and head_addr is None:
        raise ValueError("a worker node needs the head's address")
    return pulumi.Output.all(bundle_uri, head_addr if rank else NODE_ADDR).apply(
        lambda known: boot_script(node_steps(spec, plan, known[1])[rank], sources(known[0]), plan.nodes))
