"""`herd`: the one console script. Collects every layer's commands."""
from __future__ import annotations

import sys

from provisioning.cli import PROVISIONING_COMMANDS
from runtime.cli import run

INFRA_COMMANDS = list(PROVISIONING_COMMANDS)


def main(argv=None) -> int:
    return run(argv, INFRA_COMMANDS)


if __name__ == "__main__":
    sys.exit(main())
