"""`herd`: the one console script. Collects every layer's commands and adds the clouds'."""
from __future__ import annotations

import sys
import warnings

from rich.console import Console

from provisioning.cli import PROVISIONING_COMMANDS, register_target
from runtime.cli import run
from runtime.planning.spec import load_spec


def _register_clouds() -> None:
    from infra import deploy
    for target in ("aws", "gcp"):
        register_target(target, deploy.up_cloud, deploy.down_cloud, deploy.status_cloud)


def add_preflight(sub) -> None:
    p = sub.add_parser("preflight", help="check fit, offerings, quotas, images and reservations before `up`")
    p.add_argument("environment", help="environments/NAME.yaml")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_preflight)


def cmd_preflight(args) -> int:
    from infra.preflight.checks import preflight
    spec = load_spec(args.environment)
    return preflight(spec, Console(stderr=args.json), as_json=args.json)


def add_wait_healthy(sub) -> None:
    from infra.readiness import add_wait_healthy as add
    add(sub)


INFRA_COMMANDS = [*PROVISIONING_COMMANDS, add_preflight, add_wait_healthy]


def main(argv=None) -> int:
    # google-api-core announces, on import, when it will stop supporting this Python: not the user's
    # concern in the middle of a command, and it would break one-line errors.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"google\.api_core\..*")
    _register_clouds()
    return run(argv, INFRA_COMMANDS)


if __name__ == "__main__":
    sys.exit(main())
