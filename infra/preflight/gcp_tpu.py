"""GCP preflight for a TPU slice, over REST: the accelerator type and the TPU software version in the
zone (the Cloud TPU API, tpu.googleapis.com/v2) and the zone's TPU quota (the Cloud Quotas API's
QuotaInfo for tpu.googleapis.com).

Quota IDs follow Cloud TPU's naming, per generation and capacity type (on-demand, spot, reserved), in
chips for v5e and v6e; for v5p the quota may be granted in chips or TensorCores (Google's "Cloud TPU
quotas"), so the check compares chips and says which unit it assumed. The Quotas API reports the limit,
not the usage: TPUs already running in the zone count against it, and the check says so.
"""
from __future__ import annotations

import os

from infra.preflight import Finding, fail, ok, unknown
from runtime.errors import UserError
from runtime.planning import catalog
from runtime.planning.planner import Plan
from runtime.planning.spec import Spec

# Private or test endpoints (e.g. http://127.0.0.1:PORT); unset: Google's.
TPU_ENDPOINT_ENV, QUOTAS_ENDPOINT_ENV = "HERD_TPU_ENDPOINT", "HERD_QUOTAS_ENDPOINT"
CLOUD_PLATFORM_READ_ONLY = "https://www.googleapis.com/auth/cloud-platform.read-only"
# The quota ID's generation part, per catalog accelerator.
GENERATIONS = {"tpu-v5e": "V5E", "tpu-v5p": "V5P", "tpu-v6e": "V6E"}


def quota_id(accelerator: str, spot: bool, reserved: bool) -> str:
    kind = "Preemptible" if spot else "Reserved" if reserved else ""
    return f"TPU{GENERATIONS[accelerator]}{kind}PerProjectPerZoneForTPUAPI"


class Rest:
    """GET JSON from a Google API: with the caller's credentials, or anonymously from a plain-HTTP local
    endpoint (which speaks the same REST shapes)."""

    def __init__(self, base: str):
        self.base = base.rstrip("/")
        if self.base.startswith("http://"):
            import requests
            self.session = requests.Session()
        else:
            import google.auth
            from google.auth.exceptions import DefaultCredentialsError
            from google.auth.transport.requests import AuthorizedSession
            try:
                credentials, _ = google.auth.default(scopes=[CLOUD_PLATFORM_READ_ONLY])
            except DefaultCredentialsError:
                raise UserError("gcp: no credentials found: set GOOGLE_APPLICATION_CREDENTIALS or run "
                                "`gcloud auth application-default login`") from None
            self.session = AuthorizedSession(credentials)

    def get(self, path: str) -> dict | None:
        """The resource, or None when the API answers 404. 403 and other errors: one UserError."""
        response = self.session.get(f"{self.base}{path}", timeout=30)
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:200]
            raise UserError(f"gcp: GET {path}: {message}")
        return response.json()


def tpu_findings(spec: Spec, plan: Plan, tpu: Rest | None = None, quotas: Rest | None = None) -> list[Finding]:
    from infra.gcp_tpu_cluster import runtime_version
    section = spec.gcp_section
    inst = catalog.instance(section.machine_type)
    tpu = tpu or Rest(os.environ.get(TPU_ENDPOINT_ENV) or "https://tpu.googleapis.com")
    quotas = quotas or Rest(os.environ.get(QUOTAS_ENDPOINT_ENV) or "https://cloudquotas.googleapis.com")
    where = f"/v2/projects/{section.project}/locations/{section.zone}"
    findings = []
    accel = tpu.get(f"{where}/acceleratorTypes/{inst.accelerator_type}")
    findings.append(ok("accelerator", f"{inst.accelerator_type} offered in {section.zone}") if accel else
                    fail("accelerator", f"gcp.zone: {section.zone!r}: the TPU type {inst.accelerator_type} is not "
                                        f"offered there (gcp.machine_type: {section.machine_type})"))
    version = runtime_version(spec)
    found = tpu.get(f"{where}/runtimeVersions/{version}")
    findings.append(ok("runtime", f"TPU software {version} available in {section.zone}") if found else
                    fail("runtime", f"gcp.tpu_runtime_version: {version!r} is not available in zone {section.zone}"))
    findings.append(_quota(spec, plan, inst, quotas))
    return findings


def _quota(spec: Spec, plan: Plan, inst, quotas: Rest) -> Finding:
    section = spec.gcp_section
    qid = quota_id(inst.accelerator, section.spot, section.reserved)
    info = quotas.get(f"/v1/projects/{section.project}/locations/global/services/tpu.googleapis.com/quotaInfos/{qid}")
    need = inst.gpus * inst.hosts * plan.replicas
    if info is None:
        return unknown("quota", f"{qid}: the project reports no such quota")
    limit = None
    for dim in info.get("dimensionsInfos", []):
        if dim.get("dimensions", {}).get("zone") == section.zone:
            limit = int(dim.get("details", {}).get("value", 0))
    if limit is None:
        return unknown("quota", f"{qid}: no limit reported for zone {section.zone}")
    unit = "chips (if granted in TensorCores, twice as many)" if inst.accelerator == "tpu-v5p" else "chips"
    if need > limit:
        return fail("quota", f"{qid} in {section.zone}: need {need} {unit} for {section.machine_type}, limit "
                             f"{limit}: request a limit of at least {need}")
    return ok("quota", f"{qid} in {section.zone}: {need} {unit} needed, limit {limit} (TPUs running in the zone "
                       "count against it)")
