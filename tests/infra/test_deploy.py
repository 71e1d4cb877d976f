"""`herd up|down` for cloud targets: preflight first; without the Pulumi CLI, the exact commands."""
from __future__ import annotations

import os

import pytest

from tests.conftest import ROOT, run_herd
from tests.infra.gce_fake import FakeCompute
from tests.infra.test_preflight import a3_project


@pytest.fixture
def no_pulumi_cli(tmp_path):
    """PATH with python but without any `pulumi` binary (none is installable here anyway)."""
    path = [p for p in os.environ["PATH"].split(os.pathsep) if not os.path.exists(os.path.join(p, "pulumi"))]
    return {"PATH": os.pathsep.join(path), "HERD_API_KEY": "sk-deploy-test"}


def test_up_runs_preflight_then_prints_the_pulumi_commands_when_the_cli_is_missing(no_pulumi_cli):
    with FakeCompute(a3_project()) as fake:
        done = run_herd("up", "environments/gcp-a3-405b-fp8.yaml", env={**no_pulumi_cli,
                                                                        "HERD_GCE_ENDPOINT": fake.endpoint})
    assert done.returncode == 1, done.stderr
    out = done.stdout
    assert out.index("preflight") < out.index("The Pulumi CLI is not installed")
    commands = out[out.index("run:"):].splitlines()[1:]
    assert commands == [f"cd {ROOT / 'infra'}",
                        "pulumi stack select --create gcp-a3-405b-fp8",
                        "pulumi config set herd:environment ../environments/gcp-a3-405b-fp8.yaml",
                        "printenv HERD_API_KEY | pulumi config set --secret herd:apiKey",
                        "pulumi up",
                        'herd smoke --endpoint "$(pulumi stack output endpoint)" '
                        '--ca-file "$(pulumi stack output ca_file)" --api-key-env HERD_API_KEY']
    assert (ROOT / "infra" / "Pulumi.gcp-a3-405b-fp8.yaml").read_text().strip().endswith(
        "herd:environment: ../environments/gcp-a3-405b-fp8.yaml")
    assert "sk-deploy-test" not in done.stdout + done.stderr


def test_up_stops_at_a_failed_preflight_before_anything_else(no_pulumi_cli):
    with FakeCompute(a3_project(quotas={"us-central1": {"NVIDIA_H100_GPUS": (0, 0)}})) as fake:
        done = run_herd("up", "environments/gcp-a3-405b-fp8.yaml", env={**no_pulumi_cli,
                                                                        "HERD_GCE_ENDPOINT": fake.endpoint})
    assert done.returncode == 1
    assert "preflight: 1 check(s) failed; nothing was created" in done.stdout
    assert "pulumi" not in done.stdout.replace("Pulumi", "")


def test_down_without_the_cli_prints_the_destroy_commands(no_pulumi_cli):
    done = run_herd("down", "environments/aws-p5-405b-fp8.yaml", env=no_pulumi_cli)
    assert done.returncode == 1
    assert done.stdout.strip().splitlines()[-1] == "pulumi destroy"


def test_every_shipped_cloud_environment_has_a_stack_naming_it():
    from runtime.planning.spec import load_spec
    for env in sorted((ROOT / "environments").glob("*.yaml")):
        if load_spec(env).target == "local":
            continue
        stack = ROOT / "infra" / f"Pulumi.{env.stem}.yaml"
        assert stack.read_text().strip().endswith(f"herd:environment: ../environments/{env.name}"), env.name
