"""Which Pulumi stack names which environment file (no Pulumi import: the CLI uses it everywhere)."""
from __future__ import annotations

from pathlib import Path

INFRA_DIR = Path(__file__).resolve().parent


def stack_name(env_path: str | Path) -> str:
    """environments/aws-p5-405b-fp8.yaml -> aws-p5-405b-fp8 (infra/Pulumi.aws-p5-405b-fp8.yaml)."""
    return Path(env_path).stem
