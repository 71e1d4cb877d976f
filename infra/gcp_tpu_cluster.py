"""A Cloud TPU slice on GCP: on the shared foundation (infra/gcp_foundation.py: network, firewall,
service account without project roles, private bucket, secrets), one TPU VM resource holding every host
of the slice (v5e, v5p and v6e through the Cloud TPU API's `tpu.googleapis.com/v2` nodes, which Google
supports for those generations; TPU7x comes through Compute Engine machine types and is not in herd's
catalog yet).

Every host boots the same startup script and runs its own node's steps (provisioning/boot.py:
slice_boot_script): the TPU metadata says which worker it is and where worker 0, the head, is. The
endpoint is the head's external address, HTTPS: the slice gets its addresses only when it is created,
so the head's certificate, signed for that address, is stored after the slice, and the hosts wait for
it at boot (fetch_secret retries).
"""
from __future__ import annotations

import pulumi
import pulumi_gcp as gcp

from infra.gcp_foundation import GcpClusterArgs, GcpFoundation
from infra.nodes import node_steps
from infra.stack import TLS_FILES
from provisioning.boot import HEAD_ADDR, boot_script, gcp_sources, slice_boot_script
from runtime.planning import catalog
from runtime.planning.planner import Plan
from runtime.planning.spec import Spec


def runtime_version(spec: Spec) -> str:
    """The TPU VM software version: the spec's, else the catalog's for the generation."""
    section = spec.gcp_section
    inst = catalog.instance(section.machine_type)
    return section.tpu_runtime_version or inst.runtime_version or ""


def slice_startup(spec: Spec, plan: Plan, sources) -> str:
    """The startup script every host of the slice boots (each picks its own node's)."""
    scripts = [boot_script(steps, sources(steps.profile.node_rank), plan.nodes)
               for steps in node_steps(spec, plan, HEAD_ADDR)]
    return slice_boot_script(scripts)


def external_ips(endpoints) -> list[str]:
    """The slice's hosts' external addresses, in worker order (worker 0 is the head)."""
    ips = []
    for endpoint in endpoints or []:
        configs = endpoint.access_configs or []
        if not configs or not configs[0].external_ip:
            raise pulumi.RunError("the TPU slice reports a host without an external address (network_config "
                                  "enable_external_ips is on)")
        ips.append(configs[0].external_ip)
    if not ips:
        raise pulumi.RunError("the TPU slice reports no network endpoints")
    return ips


class TpuCluster(pulumi.ComponentResource):
    def __init__(self, name: str, args: GcpClusterArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("herd:gcp:TpuSlice", name, None, opts)
        spec, plan, section = args.spec, args.plan, args.spec.gcp_section
        if spec.replicas > 1:
            raise pulumi.RunError(f"{spec.name}: replicas on TPU slices are not built yet (one slice serves; "
                                  "the GCP load balancer in front of several is GPU-only so far)")
        inst = catalog.instance(section.machine_type)
        base = GcpFoundation(self, name, spec, args.bundle.name, str(args.bundle), args.tls)
        self.internal_firewall, self.external_firewall = base.internal_firewall, base.external_firewall
        self.tls = base.tls

        # The secrets the boot needs before anything else (API key, hub token), then the slice, then the
        # head's certificate for the address the slice was given.
        early = base.secrets({"api-key": args.api_key, "hf-token": args.hf_token})
        known = dict(early.ids)
        for file in TLS_FILES:
            if file in self.tls.references:
                known[file] = self.tls.references[file]
            elif self.tls.enabled:
                known[file] = f"herd-{spec.name}-{file}"

        def sources(rank: int, uri: str):
            # Only the head serves HTTPS: the workers are not handed the certificate and key.
            ids = known if rank == 0 else {k: v for k, v in known.items() if k not in TLS_FILES}
            return gcp_sources(uri, section.project, ids)

        startup = base.bundle_uri.apply(lambda uri: slice_startup(spec, plan, lambda rank: sources(rank, uri)))
        self.slice = gcp.tpu.V2Vm(
            f"{name}-slice", name=f"{spec.name}-slice", zone=section.zone, accelerator_type=inst.accelerator_type,
            runtime_version=runtime_version(spec), tags=[base.tag],
            labels={**base.labels, "herd-slice-hosts": str(inst.hosts)},
            network_config=gcp.tpu.V2VmNetworkConfigArgs(network=base.network.id, subnetwork=base.subnet.id,
                                                         enable_external_ips=True),
            scheduling_config=gcp.tpu.V2VmSchedulingConfigArgs(spot=section.spot or None,
                                                               reserved=section.reserved or None),
            service_account=gcp.tpu.V2VmServiceAccountArgs(email=base.account.email, scopes=["cloud-platform"]),
            shielded_instance_config=gcp.tpu.V2VmShieldedInstanceConfigArgs(enable_secure_boot=True),
            # Every host reads the same weights: one disk, attached read-only to all of them.
            data_disks=[gcp.tpu.V2VmDataDiskArgs(source_disk=section.weights_disk, mode="READ_ONLY")]
            if section.weights_disk else None,
            metadata={"startup-script": startup, "enable-oslogin": "TRUE", "block-project-ssh-keys": "TRUE"},
            opts=pulumi.ResourceOptions(parent=self, depends_on=early.versions))
        endpoints = self.slice.network_endpoints
        self.head_address = endpoints.apply(lambda eps: external_ips(eps)[0])
        self.node_addresses = endpoints.apply(external_ips)
        # The head's certificate, for the address the slice was given (its hosts wait for it at boot).
        base.tls_secrets(pulumi.Output.all(self.head_address))
        scheme = "https://" if self.tls.enabled else "http://"
        self.endpoint = pulumi.Output.concat(scheme, self.head_address, f":{spec.serving.port}")
        self.nodes = [self.slice]
        self.register_outputs({"endpoint": self.endpoint, "node_addresses": self.node_addresses})
