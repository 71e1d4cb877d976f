"""Run the target's preflight, print it with the plan, and decide."""
from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table

from infra.preflight import Finding, fail, ok
from runtime.planning.plan_report import render as render_plan
from runtime.planning.plan_spec import request_from_spec
from runtime.planning.planner import Plan, plan
from runtime.planning.spec import Spec

STYLE = {"ok": "green", "fail": "red", "unknown": "yellow"}


def findings_for(spec: Spec, result: Plan, clients=None) -> list[Finding]:
    groups = f"{result.replicas} replicas x " if result.replicas > 1 else ""
    shape = (f"1 x {result.instance} slice ({result.nodes} hosts)" if result.slice_hosts is not None
             else f"{result.nodes} x {result.instance or result.accelerator}")
    fit = ok("plan", f"fits: {groups}{shape}, TP "
                     f"{result.tensor_parallel} x PP {result.pipeline_parallel}") if result.fits else \
        fail("plan", "does not fit: " + "; ".join(result.reasons))
    if spec.target == "aws":
        from infra.preflight.aws import aws_findings
        return [fit, *aws_findings(spec, result, clients)]
    if spec.target == "gcp" and result.slice_hosts is not None:
        from infra.preflight.gcp_tpu import tpu_findings
        return [fit, *tpu_findings(spec, result, *(clients or ()))]
    if spec.target == "gcp":
        from infra.preflight.gcp import gcp_findings
        return [fit, *gcp_findings(spec, result, clients)]
    return [fit]


def render(findings: list[Finding], console: Console) -> None:
    table = Table(title="preflight", show_lines=False)
    for column in ("check", "status", "detail"):
        table.add_column(column)
    for f in findings:
        table.add_row(f.check, f"[{STYLE[f.status]}]{f.status}[/]", f.message)
    console.print(table)


def preflight(spec: Spec, console: Console, as_json: bool = False, clients=None) -> int:
    """0: nothing blocks; 1: a check failed (each failure names what to change)."""
    result = plan(request_from_spec(spec))
    findings = findings_for(spec, result, clients)
    failed = [f for f in findings if f.status == "fail"]
    if as_json:
        print(json.dumps({"plan": result.to_json(), "findings": [f.to_json() for f in findings],
                          "ok": not failed}, indent=2))
    else:
        render_plan(result, console)
        render(findings, console)
        if failed:
            console.print(f"[red]preflight: {len(failed)} check(s) failed; nothing was created[/]")
    return 1 if failed else 0
