"""Reading the API key from where a spec or a flag names it (an environment variable or a file): shared by
the server, the smoke test and the batch client. Keys are never logged."""
from __future__ import annotations

import os
from pathlib import Path

from runtime.errors import UserError


def key_from_env(env_var: str, field: str, hint: str = "") -> str:
    """An API key from an environment variable; `field` names where the variable was given."""
    value = os.environ.get(env_var, "").strip()
    if not value:
        raise UserError(f"{field}: {env_var!r} is not set in the environment{hint}")
    return value


def read_api_key(env_var: str | None, file: str | None) -> str | None:
    """The API key, from the variable or file the spec names. Never logged."""
    if env_var:
        return key_from_env(env_var, "serving.api_key_env", " (export it, or use serving.api_key_file)")
    if file:
        path = Path(file).expanduser()
        try:
            mode = path.stat().st_mode & 0o777
            value = path.read_text().strip()
        except OSError as err:
            raise UserError(f"serving.api_key_file: {file!r}: {err.strerror}") from None
        if mode & 0o077:   # as ssh does with private keys: a secret others can read is already leaked
            raise UserError(f"serving.api_key_file: {file!r} has mode {mode:04o}, readable by other users; "
                            "allowed: 0600 or stricter (chmod 600)")
        if not value:
            raise UserError(f"serving.api_key_file: {file!r} is empty")
        return value
    return None
