"""The GCP cluster of A2/A3 GPU nodes: on the shared foundation (infra/gcp_foundation.py: network,
firewall, service account without project roles, private bucket, secrets), compact placement and the
nodes. GPUs force `on_host_maintenance: TERMINATE`. The endpoint is HTTPS: the head's certificate and
key are Secret Manager secrets (or the ones the spec names), signed for its static external address,
which is therefore reserved before the node.
"""
from __future__ import annotations

import pulumi
import pulumi_gcp as gcp

from infra.gcp_foundation import GcpClusterArgs, GcpFoundation
from infra.gcp_types import gpu_type
from infra.nodes import disk_gb, node_boot
from infra.rollout_gate import readiness_gate
from infra.stack import TLS_FILES
from provisioning.boot import gcp_sources
from runtime.planning import catalog


class GcpCluster(pulumi.ComponentResource):
    def __init__(self, name: str, args: GcpClusterArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("herd:gcp:Cluster", name, None, opts)
        spec, plan, section = args.spec, args.plan, args.spec.gcp_section
        child = pulumi.ResourceOptions(parent=self)
        base = GcpFoundation(self, name, spec, args.bundle.name, str(args.bundle), args.tls)
        region, tag, labels, subnet = base.region, base.tag, base.labels, base.subnet
        self.internal_firewall, self.external_firewall = base.internal_firewall, base.external_firewall
        gpus = gpu_type(section.machine_type)

        # One compact placement policy per replica (its vm_count is one group's nodes); replica 0 keeps
        # the one-group name.
        placement = None
        if plan.nodes > 1:
            compact = gcp.compute.ResourcePolicyGroupPlacementPolicyArgs(collocation="COLLOCATED", vm_count=plan.nodes)
            placement = [gcp.compute.ResourcePolicy(f"{name}-compact" if r == 0 else f"{name}-r{r}-compact",
                                                    region=region, group_placement_policy=compact, opts=child)
                         for r in range(spec.replicas)]
        self.placement_policy = placement[0] if placement else None
        self.placement_policies = placement or []
        account, network = base.account, base.network

        # Static external addresses, reserved first: the head's certificate names its own.
        ips = [gcp.compute.Address(f"{name}-ip-{rank}", name=f"{spec.name}-node-{rank}", region=region,
                                   address_type="EXTERNAL", labels=labels, opts=child) for rank in range(plan.nodes)]
        self.tls = base.tls
        stored = base.tls_secrets(pulumi.Output.all(ips[0].address),
                                  base.secrets({"api-key": args.api_key, "hf-token": args.hf_token}))
        secrets, versions = stored.ids, stored.versions

        bundle_uri = base.bundle_uri
        instance = catalog.instance(section.machine_type)
        # Replicas: the load balancer first, so each replica's head joins it as it is made and the next
        # replica waits until it is healthy there (infra/rollout_gate.py).
        self.load_balancer = None
        if spec.replicas > 1:
            from infra.load_balancer import certificate_from_config
            from infra.load_balancer_gcp import GcpLoadBalancer, GcpLoadBalancerArgs
            self.load_balancer = GcpLoadBalancer(f"{name}-lb", GcpLoadBalancerArgs(
                deployment=spec.name, zone=section.zone, network=network.id, node_tag=tag,
                api_port=spec.serving.port, replicas=spec.replicas,
                certificate=certificate_from_config("sslCertificate", "gcp"), labels=labels), opts=child)
        groups, addresses, gate = [], [], None
        self.gates = []
        for replica in range(spec.replicas):
            nodes = []
            after = [gate] if gate is not None else []
            # GCP label values: lowercase letters, digits, - and _ (the gate prints a self link).
            rollout = ({"herd-rollout-after": gate.stdout.apply(lambda out: out.strip().rsplit("/", 1)[-1][:63])}
                       if gate is not None else {})
            for rank in range(plan.nodes):
                # Replica 0 keeps the names of a one-group deployment: adding replicas replaces nothing.
                label = f"node-{rank}" if replica == 0 else f"r{replica}-node-{rank}"
                # Only heads serve HTTPS: workers are not handed the certificate and key.
                node_secrets = secrets if rank == 0 else {k: v for k, v in secrets.items() if k not in TLS_FILES}
                startup = node_boot(spec, plan, rank,
                                    lambda uri, known=node_secrets: gcp_sources(uri, section.project, known),
                                    bundle_uri, nodes[0].network_interfaces[0].network_ip if rank else None)
                replica_label = {"herd-replica": str(replica)} if spec.replicas > 1 else {}
                # Replica 0's addresses are reserved before the nodes (its head's certificate names them);
                # later replicas sit behind the load balancer, whose certificate clients see.
                access = gcp.compute.InstanceNetworkInterfaceAccessConfigArgs(
                    nat_ip=ips[rank].address if replica == 0 else None)
                node = gcp.compute.Instance(
                    f"{name}-{label}", name=f"{spec.name}-{label}", machine_type=section.machine_type,
                    zone=section.zone, tags=[tag], labels={**labels, "herd-node-rank": str(rank), **replica_label, **rollout},
                    boot_disk=gcp.compute.InstanceBootDiskArgs(
                        initialize_params=gcp.compute.InstanceBootDiskInitializeParamsArgs(
                            image=f"projects/{section.image_project}/global/images/family/{section.image_family}",
                            size=section.boot_disk_gb or disk_gb(plan), type=gpus.boot_disk_type)),
                    guest_accelerators=[gcp.compute.InstanceGuestAcceleratorArgs(type=gpus.accelerator_type,
                                                                                 count=instance.gpus)],
                    scheduling=self._scheduling(section.spot),
                    network_interfaces=[gcp.compute.InstanceNetworkInterfaceArgs(
                        subnetwork=subnet.id, nic_type="GVNIC", access_configs=[access])],
                    service_account=gcp.compute.InstanceServiceAccountArgs(email=account.email,
                                                                           scopes=["cloud-platform"]),
                    metadata={"startup-script": startup, "enable-oslogin": "TRUE",
                              "block-project-ssh-keys": "TRUE"},
                    resource_policies=placement[replica].id if placement else None,
                    allow_stopping_for_update=True,
                    # The secrets' values exist before the node boots and reads them.
                    opts=pulumi.ResourceOptions(parent=self, depends_on=[*versions, *after]))
                nodes.append(node)
                addresses.append(node.network_interfaces[0].access_configs[0].nat_ip)
            groups.append(nodes)
            if self.load_balancer is not None:
                membership = self.load_balancer.attach(replica, nodes[0])
                if replica < spec.replicas - 1:
                    argv = pulumi.Output.all(self.load_balancer.backend_service.name,
                                             self.load_balancer.groups[replica].self_link).apply(
                        lambda known, r=replica: ["herd", "wait-healthy", "gcp", "--project", section.project,
                                                  "--backend-service", known[0], "--group", known[1],
                                                  "--replica", f"replica-{r}"])
                    gate = readiness_gate(f"{name}-r{replica}-ready", argv, nodes[0].id,
                                          depends_on=[membership, *nodes], parent=self)
                    self.gates.append(gate)
        self.replicas = groups
        self.nodes = [node for group in groups for node in group]
        self.head_address = addresses[0]
        self.node_addresses = pulumi.Output.all(*addresses)
        if self.load_balancer is not None:
            self.endpoint = self.load_balancer.endpoint
        else:
            scheme = "https://" if self.tls.enabled else "http://"
            self.endpoint = pulumi.Output.concat(scheme, addresses[0], f":{spec.serving.port}")
        self.register_outputs({"endpoint": self.endpoint, "node_addresses": self.node_addresses})

    @staticmethod
    def _scheduling(spot: bool) -> gcp.compute.InstanceSchedulingArgs:
        # GPUs cannot live-migrate: maintenance stops the VM (TERMINATE), and it comes back by itself.
        if spot:
            return gcp.compute.InstanceSchedulingArgs(
                on_host_maintenance="TERMINATE", automatic_restart=False, preemptible=True,
                provisioning_model="SPOT", instance_termination_action="STOP")
        return gcp.compute.InstanceSchedulingArgs(on_host_maintenance="TERMINATE", automatic_restart=True,
                                                  provisioning_model="STANDARD")
