"""GCP preflight with google-cloud-compute: machine and accelerator type in the zone, regional GPU quota,
boot image family."""
from __future__ import annotations

import os
from dataclasses import dataclass

from infra.gcp_types import gpu_type, quota_metric, region_of
from infra.preflight import Finding, fail, ok, unknown
from runtime import catalog
from runtime.errors import UserError
from runtime.planner import Plan
from runtime.spec import Spec

# A private or test endpoint for the Compute API (e.g. http://127.0.0.1:PORT); unset: Google's.
ENDPOINT_ENV = "HERD_GCE_ENDPOINT"


@dataclass
class GcpClients:
    machine_types: object
    accelerator_types: object
    regions: object
    images: object


def clients_for(endpoint: str | None = None) -> GcpClients:
    from google.api_core.client_options import ClientOptions
    from google.cloud import compute_v1
    endpoint = endpoint or os.environ.get(ENDPOINT_ENV)
    kwargs: dict = {}
    if endpoint:
        kwargs["client_options"] = ClientOptions(api_endpoint=endpoint)
        if endpoint.startswith("http://"):
            # A plain-HTTP endpoint is a local one: no Google credentials go to it.
            from google.auth.credentials import AnonymousCredentials
            kwargs["credentials"] = AnonymousCredentials()
    try:
        return GcpClients(compute_v1.MachineTypesClient(**kwargs), compute_v1.AcceleratorTypesClient(**kwargs),
                          compute_v1.RegionsClient(**kwargs), compute_v1.ImagesClient(**kwargs))
    except Exception as err:   # google.auth.exceptions.DefaultCredentialsError and kin
        if type(err).__name__ == "DefaultCredentialsError":
            raise UserError("gcp: no credentials found: set GOOGLE_APPLICATION_CREDENTIALS or run "
                            "`gcloud auth application-default login`") from None
        raise


def _api_message(err) -> str:
    """The API's own words, without the client's 'GET https://...: ' prefix."""
    message = err.message or str(err)
    return message.split(": ", 1)[1] if message.startswith(("GET ", "POST ")) and ": " in message else message


def _not_found(err: Exception) -> bool:
    return type(err).__name__ == "NotFound"


def check_machine_type(clients: GcpClients, spec: Spec) -> Finding:
    section = spec.gcp
    try:
        clients.machine_types.get(project=section.project, zone=section.zone, machine_type=section.machine_type)
    except Exception as err:
        if _not_found(err):
            return fail("offering", f"gcp.machine_type: {section.machine_type!r} is not offered in zone "
                                    f"{section.zone}")
        raise
    return ok("offering", f"{section.machine_type} offered in {section.zone}")


def check_accelerator(clients: GcpClients, spec: Spec) -> Finding:
    section = spec.gcp
    accelerator = gpu_type(section.machine_type).accelerator_type
    try:
        clients.accelerator_types.get(project=section.project, zone=section.zone, accelerator_type=accelerator)
    except Exception as err:
        if _not_found(err):
            return fail("accelerator", f"gcp.zone: {section.zone!r}: accelerator type {accelerator} is not "
                                       "available there")
        raise
    return ok("accelerator", f"{accelerator} available in {section.zone}")


def check_quota(clients: GcpClients, spec: Spec, plan: Plan) -> Finding:
    section = spec.gcp
    region = region_of(section.zone)
    metric = quota_metric(section.machine_type, section.spot)
    need = catalog.instance(section.machine_type).gpus * plan.nodes
    quotas = {q.metric: q for q in clients.regions.get(project=section.project, region=region).quotas}
    if metric not in quotas:
        return unknown("quota", f"{metric}: the region {region} reports no such quota")
    quota = quotas[metric]
    free = int(quota.limit - quota.usage)
    if need > free:
        return fail("quota", f"{metric} in {region}: need {need} GPUs for {plan.nodes} x {section.machine_type}, "
                             f"limit {int(quota.limit)}, in use {int(quota.usage)}: request a limit of at least "
                             f"{int(quota.usage) + need}")
    return ok("quota", f"{metric} in {region}: {need} needed, {free} free of {int(quota.limit)}")


def check_image(clients: GcpClients, spec: Spec) -> Finding:
    section = spec.gcp
    try:
        image = clients.images.get_from_family(project=section.image_project, family=section.image_family)
    except Exception as err:
        if _not_found(err):
            return fail("image", f"gcp.image_family: {section.image_family!r}: no image in project "
                                 f"{section.image_project}")
        raise
    return ok("image", f"{image.name} ({section.image_project}/{section.image_family})")


def gcp_findings(spec: Spec, plan: Plan, clients: GcpClients | None = None) -> list[Finding]:
    from google.api_core import exceptions as api_errors
    clients = clients or clients_for()
    try:
        return [check_machine_type(clients, spec), check_accelerator(clients, spec),
                check_quota(clients, spec, plan), check_image(clients, spec)]
    except api_errors.Forbidden as err:
        raise UserError(f"gcp.project: {spec.gcp.project!r}: {_api_message(err)} (the credentials need "
                        "compute.machineTypes.get, compute.regions.get and compute.images.getFromFamily)") from None
    except api_errors.GoogleAPICallError as err:
        raise UserError(f"gcp: {spec.gcp.project}/{spec.gcp.zone}: {_api_message(err)}") from None
