"""Imports flow one way: infra -> provisioning -> runtime. runtime must install without cloud SDKs."""
import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

FORBIDDEN = {
    "runtime": {"provisioning", "infra", "pulumi", "pulumi_aws", "pulumi_gcp", "boto3", "google", "paramiko"},
    "provisioning": {"infra", "pulumi", "pulumi_aws", "pulumi_gcp"},
}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_lower_layers_never_import_upper_ones(package):
    offenders = {str(p.relative_to(ROOT)): sorted(imported_roots(p) & FORBIDDEN[package])
                 for p in (ROOT / package).rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_front_door_runs_on_a_node_without_pulumi_or_cloud_sdks():
    """A GPU node installs herd's base only: `herd` must start, plan and check without them."""
    import subprocess
    import sys
    blocked = ["pulumi", "pulumi_aws", "pulumi_gcp", "pulumi_command", "boto3", "botocore", "google.cloud",
               "paramiko"]
    code = ("import sys\n"
            f"for name in {blocked!r}: sys.modules[name] = None\n"
            "from infra.cli import main\n"
            "sys.exit(main(['plan', 'environments/aws-p5-405b-fp8.yaml']))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "p5.48xlarge" in done.stdout
