"""Provisioning commands (up/down/status for local and on-prem targets, weights)."""
from __future__ import annotations

from runtime.cli import RUNTIME_COMMANDS

PROVISIONING_COMMANDS = list(RUNTIME_COMMANDS)
