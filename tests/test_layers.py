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
