"""A stack's inputs: the environment file its config names, the plan, and its secrets.

`infra/Pulumi.<stack>.yaml` holds `herd:environment: ../environments/NAME.yaml`; the API key and a hub
token come from `pulumi config set --secret herd:apiKey|herd:hfToken` (encrypted in the stack config,
secret in state), or else from the environment variable the spec names. The head's TLS certificate comes
from the spec (files or the cloud's secret names) or from the deployment CA this machine keeps (StackTls).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pulumi

from infra.stacks import INFRA_DIR
from runtime.errors import UserError
from runtime.planning.plan_spec import request_from_spec
from runtime.serving import tls
from runtime.planning.planner import Plan, plan
from runtime.planning.spec import Spec, check_against_catalog, load_spec

# The head node's certificate and key: files under the node's secrets/ directory, handed over like the
# API key (an SSM SecureString, a Secret Manager secret, or stdin into a 0600 file on-prem).
TLS_FILES = ("tls-cert", "tls-key")


@dataclass
class StackTls:
    """How the head node gets its certificate, and what herd's clients trust for the endpoint.

    Three ways, from the spec's serving.tls: cloud secret names (the node reads them at boot; the stack
    only grants that), PEM files (read here and handed over), or neither: the deployment CA, kept on
    this machine (tls.deployment_tls_dir), signs a certificate for the head's public address. The CA's
    key never leaves this machine."""
    spec: Spec
    named: tls.ServerTls | None = None                       # the spec's files, checked
    references: dict[str, str] = field(default_factory=dict)  # tls-cert/tls-key -> secret name (spec's)
    ca_file: Path | None = None                               # what clients trust (None: the system store)

    @property
    def enabled(self) -> bool:
        return self.spec.serving.tls_enabled

    def pair(self, addresses: list[str]) -> tuple[str, str]:
        """(certificate PEM, key PEM) for the head node, reached at `addresses` (public first)."""
        if self.named is not None:
            return self.named.certfile.read_text(), self.named.keyfile.read_text()
        names = [a for a in addresses if a]
        material, _ = tls.deployment_material(tls.deployment_tls_dir(self.spec),
                                              tls.server_sans(names[0], names[1:] + tls.spec_sans(self.spec)),
                                              self.spec.name)
        return material.certfile.read_text(), material.keyfile.read_text()

    def secrets(self, addresses: pulumi.Input[list]) -> dict[str, pulumi.Output[str]]:
        """tls-cert and tls-key as secret Outputs, once the head's addresses are known; none when the
        cloud's secret store already holds them (references) or the endpoint is plain HTTP."""
        if not self.enabled or self.references:
            return {}
        pair = pulumi.Output.from_input(addresses).apply(self.pair)
        return {"tls-cert": pulumi.Output.secret(pair[0]), "tls-key": pulumi.Output.secret(pair[1])}


def stack_tls(spec: Spec, where: str) -> StackTls:
    if not spec.serving.tls_enabled:
        return StackTls(spec)
    t = spec.serving.tls
    # cert and key come together (TlsSection refuses one without the other).
    if t.cert and t.key and tls.is_secret_reference(t.cert):
        refs = {f: v.split(":", 1)[1] for f, v in zip(TLS_FILES, (t.cert, t.key))}
        return StackTls(spec, references=refs, ca_file=Path(t.ca).expanduser() if t.ca else None)
    named = tls.named_material(spec, where)
    if named is not None:
        return StackTls(spec, named=named, ca_file=named.ca_file)
    ca_file, _ = tls.ensure_ca(tls.deployment_tls_dir(spec), spec.name)
    return StackTls(spec, ca_file=ca_file)


@dataclass
class StackInputs:
    env_path: Path
    spec: Spec
    plan: Plan
    api_key: pulumi.Output[str] | None
    hf_token: pulumi.Output[str] | None
    tls: StackTls | None = None


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
    try:
        stack_tls_inputs = stack_tls(spec, str(path))
    except UserError as err:
        raise pulumi.RunError(str(err)) from None
    return StackInputs(path, spec, result, api_key, hf_token, stack_tls_inputs)
