"""GCP preflight with google-cloud-compute: machine and accelerator type in the zone, regional GPU quota,
boot image family."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from infra.gcp_types import gpu_type, quota_metric, region_of
from infra.preflight import Finding, fail, ok, unknown
from runtime.planning import catalog
from runtime.errors import UserError
from runtime.planning.planner import Plan
from runtime.planning.spec import Spec

if TYPE_CHECKING:     # imported when the clients are made: the CLI starts without the Google SDK
    from google.cloud import compute_v1

# A private or test endpoint for the Compute API (e.g. http://127.0.0.1:PORT); unset: Google's.
ENDPOINT_ENV = "HERD_GCE_ENDPOINT"
COMPUTE_READ_ONLY = "https://www.googleapis.com/auth/compute.readonly"


@dataclass
class GcpClients:
    machine_types: compute_v1.MachineTypesClient
    accelerator_types: compute_v1.AcceleratorTypesClient
    regions: compute_v1.RegionsClient
    images: compute_v1.ImagesClient


def client_kwargs(endpoint: str | None = None, scopes: tuple[str, ...] = (COMPUTE_READ_ONLY,)) -> dict:
    """Credentials and endpoint for a google-cloud-compute client: HERD_GCE_ENDPOINT (or `endpoint`)
    points it elsewhere; a plain-HTTP endpoint is a local one, which gets no Google credentials."""
    from google.api_core.client_options import ClientOptions
    endpoint = endpoint or os.environ.get(ENDPOINT_ENV)
    kwargs: dict = {}
    if endpoint:
        kwargs["client_options"] = ClientOptions(api_endpoint=endpoint)
    if endpoint and endpoint.startswith("http://"):
        from google.auth.credentials import AnonymousCredentials
        kwargs["credentials"] = AnonymousCredentials()
    else:
        # Resolved here, once, so a missing login is one clear error whatever the client version does.
        import google.auth
        from google.auth.exceptions import DefaultCredentialsError
        try:
            kwargs["credentials"], _ = google.auth.default(scopes=list(scopes))
        except DefaultCredentialsError:
            raise UserError("gcp: no credentials found: set GOOGLE_APPLICATION_CREDENTIALS or run "
                            "`gcloud auth application-default login`") from None
    return kwargs


def clients_for(endpoint: str | None = None) -> GcpClients:
    from google.cloud import compute_v1
    kwargs = client_kwargs(endpoint)
    return GcpClients(compute_v1.MachineTypesClient(**kwargs), compute_v1.AcceleratorTypesClient(**kwargs),
                      compute_v1.RegionsClient(**kwargs), compute_v1.ImagesClient(**kwargs))


def _api_message(err) -> str:
    """The API's own words, without the client's 'GET https://...: ' prefix."""
    message = err.message or str(err)
    return message.split(": ", 1)[1] if message.startswith(("GET ", "POST ")) and ": " in message else message


def _exists(check: str, get, missing: str, found) -> Finding:
    """ok (found(answer)) when the API returns the thing; fail (missing) when it answers NotFound."""
    from google.api_core.exceptions import NotFound
    try:
        answer = get()
    except NotFound:
        return fail(check, missing)
    return ok(check, found(answer))


def check_machine_type(clients: GcpClients, spec: Spec) -> Finding:
    s = spec.gcp_section
    return _exists("offering",
                   lambda: clients.machine_types.get(project=s.project, zone=s.zone, machine_type=s.machine_type),
                   f"gcp.machine_type: {s.machine_type!r} is not offered in zone {s.zone}",
                   lambda _: f"{s.machine_type} offered in {s.zone}")


def check_accelerator(clients: GcpClients, spec: Spec) -> Finding:
    s = spec.gcp_section
    accelerator = gpu_type(s.machine_type).accelerator_type
    return _exists("accelerator",
                   lambda: clients.accelerator_types.get(project=s.project, zone=s.zone,
                                                         accelerator_type=accelerator),
                   f"gcp.zone: {s.zone!r}: accelerator type {accelerator} is not available there",
                   lambda _: f"{accelerator} available in {s.zone}")


def check_quota(clients: GcpClients, spec: Spec, plan: Plan) -> Finding:
    section = spec.gcp_section
    region = region_of(section.zone)
    metric = quota_metric(section.machine_type, section.spot)
    need = catalog.instance(section.machine_type).gpus * plan.total_nodes   # every replica
    nodes = f"{plan.total_nodes} ({plan.replicas} replicas x {plan.nodes})" if plan.replicas > 1 else str(plan.nodes)
    quotas = {q.metric: q for q in clients.regions.get(project=section.project, region=region).quotas}
    if metric not in quotas:
        return unknown("quota", f"{metric}: the region {region} reports no such quota")
    quota = quotas[metric]
    free = int(quota.limit - quota.usage)
    if need > free:
        return fail("quota", f"{metric} in {region}: need {need} GPUs for {nodes} x {section.machine_type}, "
                             f"limit {int(quota.limit)}, in use {int(quota.usage)}: request a limit of at least "
                             f"{int(quota.usage) + need}")
    return ok("quota", f"{metric} in {region}: {need} needed, {free} free of {int(quota.limit)}")


def check_image(clients: GcpClients, spec: Spec) -> Finding:
    s = spec.gcp_section
    return _exists("image", lambda: clients.images.get_from_family(project=s.image_project, family=s.image_family),
                   f"gcp.image_family: {s.image_family!r}: no image in project {s.image_project}",
                   lambda image: f"{image.name} ({s.image_project}/{s.image_family})")


def gcp_findings(spec: Spec, plan: Plan, clients: GcpClients | None = None) -> list[Finding]:
    from google.api_core import exceptions as api_errors
    section = spec.gcp_section
    clients = clients or clients_for()
    try:
        return [check_machine_type(clients, spec), check_accelerator(clients, spec),
                check_quota(clients, spec, plan), check_image(clients, spec)]
    except api_errors.Forbidden as err:
        raise UserError(f"gcp.project: {section.project!r}: {_api_message(err)} (the credentials need "
                        "compute.machineTypes.get, compute.regions.get and compute.images.getFromFamily)") from None
    except api_errors.GoogleAPICallError as err:
        raise UserError(f"gcp: {section.project}/{section.zone}: {_api_message(err)}") from None
