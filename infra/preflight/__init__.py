"""Preflight: what would stop a cluster, found before any money is spent.

Each check gives a Finding: ok, fail (with the quota code or zone and the number needed) or unknown
(the API could not answer; shown, not blocking). `herd preflight ENV` prints them after the plan
(fit, cost per hour and per million tokens, cold start); `herd up` runs them first.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Finding:
    check: str
    status: str          # ok | fail | unknown
    message: str

    def to_json(self) -> dict:
        return asdict(self)


def ok(check: str, message: str) -> Finding:
    return Finding(check, "ok", message)


def fail(check: str, message: str) -> Finding:
    return Finding(check, "fail", message)


def unknown(check: str, message: str) -> Finding:
    return Finding(check, "unknown", message)
