"""`herd up|down|status` for the aws and gcp targets: preflight, then the Pulumi program in infra/.

With the Pulumi CLI installed, the Automation API runs the same program as `pulumi up` in infra/ (the
stack named after the environment file, its config pointing at that file, the API key stored as a
stack secret), then herd waits for readiness through the endpoint output and runs the smoke test.
Without it, herd prints the exact commands to run and changes nothing.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path

from rich.console import Console

from infra.preflight.checks import preflight
from infra.stacks import INFRA_DIR, stack_name
from runtime.errors import UserError
from runtime.planning.spec import Spec


def _env_config_value(env_path: str) -> str:
    return os.path.relpath(Path(env_path).resolve(), INFRA_DIR)


def manual_commands(spec: Spec, env_path: str, action: str) -> list[str]:
    stack = stack_name(env_path)
    lines = [f"cd {shlex.quote(str(INFRA_DIR))}",
             f"pulumi stack select --create {shlex.quote(stack)}",
             f"pulumi config set herd:environment {shlex.quote(_env_config_value(env_path))}"]
    if action == "up":
        if spec.serving.api_key_env:
            lines.append(f"printenv {spec.serving.api_key_env} | pulumi config set --secret herd:apiKey")
        if (spec.model.source or "").startswith("hf://"):
            lines.append("printenv HF_TOKEN | pulumi config set --secret herd:hfToken")
        key = f" --api-key-env {spec.serving.api_key_env}" if spec.serving.api_key_env else ""
        # The program writes the deployment CA it made (or the spec's serving.tls.ca) as this output.
        pinned = spec.serving.tls_enabled and (not spec.serving.tls.cert or spec.serving.tls.ca)
        ca = ' --ca-file "$(pulumi stack output ca_file)"' if pinned else ""
        lines += ["pulumi up", f'herd smoke --endpoint "$(pulumi stack output endpoint)"{ca}{key}']
    elif action == "down":
        lines.append("pulumi destroy")
    else:
        lines.append("pulumi stack output --json")
    return lines


def _no_pulumi(spec: Spec, env_path: str, console: Console, action: str) -> int:
    console.print("[yellow]The Pulumi CLI is not installed (https://www.pulumi.com/docs/install/); nothing was "
                  f"changed. To {action} {spec.name}, run:[/]")
    for line in manual_commands(spec, env_path, action):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    return 1


def _stack(spec: Spec, env_path: str):
    from pulumi import automation as auto
    stack = auto.create_or_select_stack(stack_name=stack_name(env_path), work_dir=str(INFRA_DIR))
    stack.set_config("herd:environment", auto.ConfigValue(value=_env_config_value(env_path)))
    for key, var in (("apiKey", spec.serving.api_key_env), ("hfToken", "HF_TOKEN")):
        if var and os.environ.get(var):
            stack.set_config(f"herd:{key}", auto.ConfigValue(value=os.environ[var], secret=True))
    return stack


def up_cloud(spec: Spec, env_path: str, console: Console, smoke: bool = True) -> int:
    if preflight(spec, console) != 0:
        return 1
    if not shutil.which("pulumi"):
        return _no_pulumi(spec, env_path, console, "up")
    stack = _stack(spec, env_path)
    result = stack.up(on_output=lambda line: console.print(line, markup=False, highlight=False, end=""))
    endpoint = result.outputs["endpoint"].value
    console.print(f"[green]{spec.name}: created[/] endpoint {endpoint}")
    if not smoke:
        return 0
    from runtime.serving.serve import read_api_key
    from runtime.serving.smoke import render, run_smoke
    from runtime.serving.tls import client_ca, client_verify
    api_key = read_api_key(spec.serving.api_key_env, None)
    # Nodes install drivers, the engine and hundreds of GB of weights before they are ready. The
    # endpoint's certificate is checked against the deployment CA only (the spec's CA, if it names one).
    verify = client_verify(client_ca(spec)) if endpoint.startswith("https://") else True
    report = run_smoke(endpoint, api_key, 3 * 3600, console, verify=verify)
    render(report, console)
    return 0 if report.passed else 1


def down_cloud(spec: Spec, env_path: str, console: Console) -> int:
    if not shutil.which("pulumi"):
        return _no_pulumi(spec, env_path, console, "down")
    _stack(spec, env_path).destroy(on_output=lambda line: console.print(line, markup=False, end=""))
    console.print(f"[green]{spec.name}: destroyed[/]")
    return 0


def status_cloud(spec: Spec, env_path: str, console: Console, as_json: bool = False) -> int:
    if not shutil.which("pulumi"):
        return _no_pulumi(spec, env_path, console, "status")
    outputs = {k: v.value for k, v in _stack(spec, env_path).outputs().items()}
    if not outputs:
        raise UserError(f"{spec.name}: the stack has no outputs: it is not up (run `herd up {env_path}`)")
    if as_json:
        print(json.dumps(outputs))
    else:
        console.print_json(json.dumps(outputs))
    return 0
