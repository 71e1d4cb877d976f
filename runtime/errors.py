"""User-facing errors: one line, naming the field, the value and what is allowed."""
from __future__ import annotations

import difflib
from collections.abc import Iterable

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input from the user. The CLI prints `herd: error: <message>` and exits 2, no traceback."""

    def __init__(self, message: str):
        # Always one line: a multi-line message would break log parsers and the contract.
        super().__init__(" ".join(message.split()))


def closest(value: str, allowed: Iterable[str], n: int = 3) -> list[str]:
    """The allowed names closest to a misspelt one (for 'did you mean' hints)."""
    return difflib.get_close_matches(str(value), list(allowed), n=n, cutoff=0.5)


def unknown_name(what: str, value: str, allowed: Iterable[str]) -> UserError:
    allowed = sorted(allowed)
    near = closest(value, allowed)
    hint = f"; did you mean {', '.join(near)}?" if near else ""
    return UserError(f"{what}: unknown value {value!r}{hint} (allowed: {', '.join(allowed)})")
