"""On-prem hosts in Pulumi state: the same steps over SSH with pulumi-command's remote resources.

For teams that want their racks in the same state and review flow as their clouds. `herd up` (the
paramiko installer) does the same without Pulumi. Host keys are pinned from the spec's known_hosts file:
pulumi-command ignores host keys unless given one, so a host missing from known_hosts is refused here.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

import pulumi
from pulumi_command import remote

from infra.stack import StackTls, stack_tls
from provisioning.boot import BootSources, boot_script
from provisioning.onprem import runtime_control
from provisioning.steps import plan_host, profiles_for
from runtime.planning.planner import Plan
from runtime.planning.spec import OnpremHost, Spec


@dataclass
class OnpremClusterArgs:
    spec: Spec
    plan: Plan
    bundle: Path                     # node bundle: steps, herd wheel, environment
    wheels: Path                     # herd's dependencies as wheels (hosts usually have no index)
    api_key: pulumi.Input[str] | None = None
    tls: StackTls | None = None      # the head's certificate (None: stack_tls(spec))


def pinned_host_key(known_hosts: Path, host: OnpremHost) -> str:
    """The host's recorded key as 'type base64', or a one-line error saying how to record it."""
    import paramiko
    keys = paramiko.HostKeys()
    if known_hosts.is_file():
        keys.load(str(known_hosts))
    name = host.address if host.port == 22 else f"[{host.address}]:{host.port}"
    entry = keys.lookup(name)
    if not entry:
        raise pulumi.RunError(f"onprem.hosts: {host.address!r}: no host key in {known_hosts} (allowed: hosts "
                              "with a recorded key; run `herd up --trust-new-hosts` once, or ssh-keyscan and "
                              "check the fingerprint)")
    key_type = sorted(entry.keys())[0]
    return f"{key_type} {entry[key_type].get_base64()}"


class OnpremCluster(pulumi.ComponentResource):
    def __init__(self, name: str, args: OnpremClusterArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("herd:onprem:Cluster", name, None, opts)
        spec, plan, section = args.spec, args.plan, args.spec.onprem_section
        home = section.install_dir
        key_file = Path(section.ssh_key).expanduser()
        if not key_file.is_file():
            raise pulumi.RunError(f"onprem.ssh_key: {section.ssh_key!r}: no such file")
        private_key = pulumi.Output.secret(key_file.read_text())
        known_hosts = Path(section.known_hosts).expanduser()
        head = section.hosts[0].address
        self.tls = args.tls or stack_tls(spec, spec.name)
        # The head's certificate names every host address the spec lists (and serving.tls.sans).
        tls_values = self.tls.secrets([h.address for h in section.hosts])
        commands, runtimes = [], []
        for profile, host in zip(profiles_for(spec, plan), section.hosts):
            child = pulumi.ResourceOptions(parent=self)
            connection = remote.ConnectionArgs(host=host.address, port=host.port, user=host.user,
                                               private_key=private_key,
                                               host_key=pinned_host_key(known_hosts, host))
            rank = profile.node_rank
            bundle = remote.CopyToRemote(f"{name}-bundle-{rank}", connection=connection,
                                         source=pulumi.FileAsset(str(args.bundle)),
                                         remote_path=f"/tmp/herd-node-bundle.tar.gz", opts=child)
            wheels = remote.CopyToRemote(f"{name}-wheels-{rank}", connection=connection,
                                         source=pulumi.FileArchive(str(args.wheels)),
                                         remote_path=f"{home}/wheels", opts=child)
            depends: list[pulumi.Resource] = [bundle, wheels]
            handed = {"api-key": args.api_key} if args.api_key is not None else {}
            if rank == 0:
                handed.update(tls_values)     # only the head serves HTTPS
            for file, value in handed.items():
                # Secrets travel on stdin into 0600 files: never in argv, logs or the command text.
                depends.append(remote.Command(
                    f"{name}-{file}-{rank}", connection=connection, stdin=pulumi.Output.secret(value),
                    create=f"mkdir -p {home}/secrets && chmod 700 {home}/secrets && "
                           f"(umask 077; cat > {home}/secrets/{file})",
                    delete=f"rm -f {home}/secrets/{file}", logging=remote.Logging.NONE, opts=child))
            steps = plan_host(spec, plan, profile, head, f"{home}/models/{spec.model.id}", spec.model.source,
                              f"{home}/environment.yaml")
            sources = BootSources(fetch_bundle='cp /tmp/herd-node-bundle.tar.gz "$bundle"',
                                  address=f"echo {shlex.quote(host.address)}")
            script = boot_script(steps, sources, plan.nodes)
            install = remote.Command(f"{name}-install-{rank}", connection=connection, create=script,
                                     triggers=[script], opts=pulumi.ResourceOptions(parent=self, depends_on=depends))
            commands.append(install)
            # The runtime, started and stopped as `herd up` and `herd down` do: the unit where the
            # service step installed one (the boot script restarted it already), else one process as
            # the `herd` user, never a second copy; stopped with its ranks. A changed install replaces
            # it, stopping the old runtime before the new one starts (never the other way around).
            runtimes.append(remote.Command(
                f"{name}-runtime-{rank}", connection=connection, triggers=[script],
                create=runtime_control(home, "ensure", steps.env["HERD_SERVE_ARGS"], gpu=profile.gpu),
                delete=runtime_control(home, "stop"),
                opts=pulumi.ResourceOptions(parent=self, depends_on=[install], delete_before_replace=True)))
        self.install_commands = commands
        self.runtime_commands = runtimes
        self.head_address = pulumi.Output.from_input(head)
        self.node_addresses = pulumi.Output.from_input([h.address for h in section.hosts[:plan.nodes]])
        scheme = "https" if self.tls.enabled else "http"
        self.endpoint = pulumi.Output.from_input(f"{scheme}://{head}:{spec.serving.port}")
        self.register_outputs({"endpoint": self.endpoint})
