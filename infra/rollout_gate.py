"""The order in which `pulumi up` replaces replicas behind a cloud load balancer: one at a time.

Each replica's nodes depend on a gate: a local command (pulumi-command, on the machine running
`pulumi up`) that waits until the replica before is healthy in the load balancer (`herd wait-healthy`,
infra/readiness.py), and prints what became healthy. The next replica's nodes carry that output in a
tag, so they cannot be created (or replaced) before the gate has passed; the gate's triggers name the
head it waits for, so a replaced head runs its gate again. A change that replaces every node (new boot
script: another model, engine or setting) thus brings up replica 0, waits until the load balancer
sends it traffic, then replica 1, and so on; Pulumi deletes the replaced nodes after their successors
exist (create before delete), and the load balancer drains them (deregistration delay / connection
draining) before they go.
"""
from __future__ import annotations

import shlex

import pulumi
import pulumi_command as command

ROLLOUT_TAG = "herd:rollout-after"    # AWS tag (GCP label: herd-rollout-after) naming what passed the gate


def readiness_gate(name: str, argv: pulumi.Input[list[str]], head_id: pulumi.Input[str],
                   depends_on: list[pulumi.Resource], parent: pulumi.Resource) -> command.local.Command:
    """A gate that passes when `argv` (a `herd wait-healthy ...` command) exits 0."""
    create = pulumi.Output.from_input(argv).apply(shlex.join)
    return command.local.Command(name, create=create, triggers=[head_id],
                                 opts=pulumi.ResourceOptions(parent=parent, depends_on=depends_on))
