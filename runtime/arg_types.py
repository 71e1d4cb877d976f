"""Argument types the command-line parsers share (`herd plan`, `serve`, `smoke`, `generate`): their own
module, so the subcommands need not import each other."""
from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1")
    return value


def auto_or_int(text: str):
    return "auto" if text == "auto" else positive_int(text)
