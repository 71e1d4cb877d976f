"""Argument types the command-line parsers share (`herd plan`, `serve`, `smoke`, `generate`): their own
module, so the subcommands need not import each other."""
from __future__ import annotations

import argparse


def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
    return value


def positive_int(text: str) -> int:
    return _whole_number(text, 1)


def count(text: str) -> int:
    """A whole number from 0 up (0 restarts, 0 retries: give up at the first failure)."""
    return _whole_number(text, 0)


def auto_or_int(text: str):
    return "auto" if text == "auto" else positive_int(text)
