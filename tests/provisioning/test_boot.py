"""The cloud boot script, run for real here (bash, the node bundle, a secret command, the steps)."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess

import pytest
from rich.console import Console

from provisioning.boot import NODE_ADDR, USER_DATA_LIMIT, BootSources, aws_sources, boot_script
from provisioning.bundle import node_bundle
from provisioning.steps import HostProfile, herd_version, plan_host
from runtime.planning.plan_spec import request_from_spec
from runtime.planning.planner import plan
from runtime.planning.spec import load_spec
from tests.conftest import ROOT

UBUNTU = 'ID=ubuntu\nVERSION_ID="24.04"\n'
ENV = ROOT / "environments" / "local.yaml"


def cpu_node(home, steps=None, rank=0, head=NODE_ADDR, env=ENV):
    spec = load_spec(env)
    result = plan(request_from_spec(spec))
    profile = HostProfile(f"node-{rank}", NODE_ADDR, rank, gpu=False, gpus=0, cloud="aws", home=str(home))
    host = plan_host(spec, result, profile, head, f"{home}/models/m", spec.model.source, f"{home}/environment.yaml")
    if steps is not None:
        host.steps = steps
    return host


def run_boot(script, tmp_path, dry_run):
    (tmp_path / "os-release").write_text(UBUNTU)
    path = tmp_path / "boot.sh"
    path.write_text(script)
    env = {**os.environ, "HERD_OS_RELEASE": str(tmp_path / "os-release"), "HERD_DRY_RUN": "1" if dry_run else "0"}
    return subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def sources(tmp_path):
    bundle = node_bundle(ENV, Console(quiet=True))
    return BootSources(fetch_bundle=f'cp {bundle} "$bundle"', address="echo 10.42.0.17",
                       secrets={"api-key": "printf sk-boot-test-key"})


def test_a_node_fetches_its_bundle_and_key_learns_its_address_and_runs_every_step(tmp_path, sources):
    home = tmp_path / "opt-herd"
    host = cpu_node(home)
    done = run_boot(boot_script(host, sources, nodes=1), tmp_path, dry_run=True)
    assert done.returncode == 0, done.stdout + done.stderr
    ran = [line.split(":")[0] for line in done.stdout.splitlines() if line[:2].isdigit()]
    assert list(dict.fromkeys(ran)) == host.steps
    assert "50-venv: would run:" in done.stdout and "60-weights: would run:" in done.stdout
    assert sorted(p.name for p in (home / "steps").iterdir()) == sorted(p.name for p in
                                                                        (ROOT / "provisioning/steps").glob("*.sh"))
    # The one file the 50-venv step installs by path (herd-VERSION-*.whl), never `herd==VERSION`.
    assert len(list((home / "wheels").glob(f"herd-{herd_version()}-*.whl"))) == 1
    assert (home / "environment.yaml").read_bytes() == ENV.read_bytes()
    assert "herd==" not in done.stdout
    key = home / "secrets" / "api-key"
    assert key.read_text() == "sk-boot-test-key" and stat.S_IMODE(key.stat().st_mode) == 0o600
    assert "sk-boot-test-key" not in done.stdout + done.stderr
    node_env = (home / "node.env").read_text()
    assert "HERD_NODE_RANK=0" in node_env and NODE_ADDR not in node_env
    assert not list((home / "state" / "steps").iterdir())     # a dry run stamps nothing


def test_a_worker_gets_the_heads_address_and_its_own(tmp_path, sources):
    home = tmp_path / "opt-herd"
    two_nodes = ROOT / "environments" / "aws-p4de-405b-bf16-2node.yaml"
    host = cpu_node(home, steps=[], rank=1, head="10.42.0.5", env=two_nodes)
    done = run_boot(boot_script(host, sources, nodes=2), tmp_path, dry_run=False)
    assert done.returncode == 0, done.stderr
    node_env = (home / "node.env").read_text()
    assert "HERD_NODE_RANK=1" in node_env and "HERD_NODES=2" in node_env
    # The serve arguments are one quoted value; only the worker's own address is filled in at boot.
    serve = next(line for line in node_env.splitlines() if line.startswith("HERD_SERVE_ARGS"))
    assert "--rdzv-endpoint 10.42.0.5:29400" in serve and "--node-addr 10.42.0.17" in serve
    assert "--role worker" in serve


def test_a_reboot_skips_the_steps_that_finished(tmp_path, sources):
    home = tmp_path / "opt-herd"
    script = boot_script(cpu_node(home, steps=["00-preflight", "40-shm"]), sources, nodes=1)
    first = run_boot(script, tmp_path, dry_run=False)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "00-preflight: ok: cpu-only host" in first.stdout
    assert sorted(p.name for p in (home / "state" / "steps").iterdir()) == ["00-preflight.done", "40-shm.done"]
    again = run_boot(script, tmp_path, dry_run=False)
    assert again.returncode == 0
    assert "00-preflight: done before, skipped" in again.stdout and "40-shm: done before, skipped" in again.stdout


def test_a_failed_step_stops_the_boot_and_leaves_no_stamp(tmp_path, sources):
    home = tmp_path / "opt-herd"
    host = cpu_node(home, steps=["00-preflight", "40-shm"])
    host.env["HERD_MIN_DISK_GB"] = str(10**7)
    done = run_boot(boot_script(host, sources, nodes=1), tmp_path, dry_run=False)
    assert done.returncode != 0
    assert "00-preflight: FAILED: free disk" in done.stderr
    assert not list((home / "state" / "steps").iterdir())


def test_the_boot_script_is_shellcheck_clean_and_fits_aws_user_data(tmp_path):
    assert shutil.which("shellcheck")
    host = cpu_node("/opt/herd")
    script = boot_script(host, aws_sources("s3://b/herd/node.tar.gz", "us-east-1", {"api-key": "/herd/x/api-key"}),
                         nodes=2)
    path = tmp_path / "boot.sh"
    path.write_text(script)
    done = subprocess.run(["shellcheck", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
    assert len(script.encode()) < USER_DATA_LIMIT
    assert "http://169.254.169.254/latest/api/token" in script        # IMDSv2: a session token first


def test_a_reboot_keeps_the_owner_the_service_step_gave_the_api_key(tmp_path, sources):
    """GCP runs the startup script at every boot and fetches the secrets again; the API key must stay
    readable by the runtime's own user (given it by 70-service, which a reboot skips)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to give the key to another user")
    home = tmp_path / "opt-herd"
    script = boot_script(cpu_node(home, steps=[]), sources, nodes=1)
    assert run_boot(script, tmp_path, dry_run=False).returncode == 0
    key = home / "secrets" / "api-key"
    os.chown(key, 65534, 65534)                                       # as 70-service does for `herd`
    again = run_boot(script, tmp_path, dry_run=False)
    assert again.returncode == 0, again.stderr
    assert key.read_text() == "sk-boot-test-key"
    assert (key.stat().st_uid, key.stat().st_gid, stat.S_IMODE(key.stat().st_mode)) == (65534, 65534, 0o600)
    assert not list((home / "secrets").glob(".*.partial"))
