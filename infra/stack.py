"""A stack's inputs: the environment file its config names, the plan, and its secrets.

`infra/Pulumi.<stack>.yaml` holds `herd:environment: ../environments/NAME.yaml`; the API key and a hub
token come from `pulumi config set --secret herd:apiKey|herd:hfToken` (encrypted in the stack config,
secret in state), or else from the environment variable the spec names.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pulumi

from infra.stacks import INFRA_DIR
from runtime.errors import UserError
from runtime.plan_spec import request_from_spec
from runtime.planner import Plan, plan
from runtime.spec import Spec, check_against_catalog, load_spec

@dataclass
class StackInputs:
    env_path: Path
    spec: Spec
    plan: Plan
    api_key: pulumi.Output[str] | None
    hf_token: pulumi.Output[str] | None


def _secret(config: pulumi.Config, key: str, env_var: str | None) -> pulumi.Output[str] | None:
    value = config.get_secret(key)
    if value is not None:
        return value
    if env_var and os.environ.get(env_var):
        return pulumi.Output.secret(os.environ[env_var])
    return None


def read_stack() -> StackInputs:
    config = pulumi.Config("herd")
    named = config.require("environment")
    path = Path(named) if Path(named).is_absolute() else (INFRA_DIR / named).resolve()
    try:
        spec = load_spec(path)
        check_against_catalog(spec, str(path))
    except UserError as err:
        raise pulumi.RunError(str(err)) from None
    result = plan(request_from_spec(spec))
    if not result.fits:
        raise pulumi.RunError(f"{path}: the plan does not fit, nothing is created: {'; '.join(result.reasons)}")
    api_key = _secret(config, "apiKey", spec.serving.api_key_env)
    if api_key is None and (spec.serving.api_key_env or spec.serving.api_key_file):
        where = f"or export {spec.serving.api_key_env}" if spec.serving.api_key_env else ""
        raise pulumi.RunError(f"herd:apiKey: not set: run `pulumi config set --secret herd:apiKey` {where}".strip())
    hf_token = _secret(config, "hfToken", "HF_TOKEN") if (spec.model.source or "").startswith("hf://") else None
    return StackInputs(path, spec, result, api_key, hf_token)
