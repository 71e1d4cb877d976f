"""A loopback stand-in for the Compute Engine REST API (there is no emulator): the four GET endpoints
preflight uses, and backendServices.getHealth (the readiness gate between replicas), answering in the
API's JSON shapes and error format, so the real google-cloud-compute client (transport, paging, error
mapping) runs against it."""
from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROUTES = [
    ("machine_type", re.compile(r"^/compute/v1/projects/([^/]+)/zones/([^/]+)/machineTypes/([^/?]+)")),
    ("accelerator_type", re.compile(r"^/compute/v1/projects/([^/]+)/zones/([^/]+)/acceleratorTypes/([^/?]+)")),
    ("region", re.compile(r"^/compute/v1/projects/([^/]+)/regions/([^/?]+)")),
    ("image_family", re.compile(r"^/compute/v1/projects/([^/]+)/global/images/family/([^/?]+)")),
    # The Cloud TPU API (tpu.googleapis.com/v2) and the Cloud Quotas API (cloudquotas.googleapis.com/v1):
    # the same loopback server stands in for both (their paths do not overlap).
    ("tpu_accelerator_type", re.compile(r"^/v2/projects/([^/]+)/locations/([^/]+)/acceleratorTypes/([^/?]+)")),
    ("tpu_runtime_version", re.compile(r"^/v2/projects/([^/]+)/locations/([^/]+)/runtimeVersions/([^/?]+)")),
    ("quota_info", re.compile(r"^/v1/projects/([^/]+)/locations/global/services/tpu\.googleapis\.com/"
                              r"quotaInfos/([^/?]+)")),
]


@dataclass
class ComputeState:
    """What the fake project holds."""
    machine_types: dict[str, set[str]] = field(default_factory=dict)        # zone -> machine types
    accelerator_types: dict[str, set[str]] = field(default_factory=dict)    # zone -> accelerator types
    quotas: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)  # region -> metric -> (limit, usage)
    image_families: dict[tuple[str, str], str] = field(default_factory=dict)  # (project, family) -> image name
    forbidden_projects: set[str] = field(default_factory=set)
    # (backend service, instance group self link) -> the health state of its instance, as getHealth says
    backend_health: dict[tuple[str, str], str] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    tpu_types: dict[str, set[str]] = field(default_factory=dict)            # zone -> TPU accelerator types
    tpu_versions: dict[str, set[str]] = field(default_factory=dict)         # zone -> TPU software versions
    tpu_quotas: dict[str, dict[str, int]] = field(default_factory=dict)     # quota id -> zone -> limit


class FakeCompute:
    def __init__(self, state: ComputeState):
        self.state = state
        handler = type("Handler", (_Handler,), {"state": state})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    state: ComputeState

    def log_message(self, *args):
        pass

    def _send(self, code: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, code: int, message: str, reason: str):
        self._send(code, {"error": {"code": code, "message": message,
                                    "errors": [{"message": message, "domain": "global", "reason": reason}]}})

    def do_GET(self):
        self.state.requests.append(self.path)
        for kind, pattern in ROUTES:
            match = pattern.match(self.path)
            if match:
                project = match.group(1)
                if project in self.state.forbidden_projects:
                    return self._error(403, f"Required 'compute.regions.get' permission for 'projects/{project}'",
                                       "forbidden")
                return getattr(self, kind)(*match.groups())
        self._error(404, f"no route for {self.path}", "notFound")

    def do_POST(self):
        self.state.requests.append(self.path)
        match = re.match(r"^/compute/v1/projects/([^/]+)/global/backendServices/([^/]+)/getHealth", self.path)
        if not match:
            return self._error(404, f"no route for {self.path}", "notFound")
        project, service = match.groups()
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        group = body.get("group", "")
        state = self.state.backend_health.get((service, group))
        if state is None:
            return self._error(404, f"The resource 'projects/{project}/global/backendServices/{service}' has no "
                                    f"backend {group}", "notFound")
        instance = group.rsplit("/", 1)[-1] + "-head"
        self._send(200, {"kind": "compute#backendServiceGroupHealth",
                         "healthStatus": [{"instance": instance, "port": 8000, "healthState": state}]})

    def machine_type(self, project, zone, name):
        if name not in self.state.machine_types.get(zone, set()):
            return self._error(404, f"The resource 'projects/{project}/zones/{zone}/machineTypes/{name}' was not "
                                    "found", "notFound")
        self._send(200, {"kind": "compute#machineType", "name": name, "zone": zone, "guestCpus": 208,
                         "accelerators": [{"guestAcceleratorType": "nvidia-h100-80gb", "guestAcceleratorCount": 8}]})

    def accelerator_type(self, project, zone, name):
        if name not in self.state.accelerator_types.get(zone, set()):
            return self._error(404, f"The resource 'projects/{project}/zones/{zone}/acceleratorTypes/{name}' was "
                                    "not found", "notFound")
        self._send(200, {"kind": "compute#acceleratorType", "name": name, "zone": zone, "maximumCardsPerInstance": 8})

    def region(self, project, region):
        if region not in self.state.quotas:
            return self._error(404, f"The resource 'projects/{project}/regions/{region}' was not found", "notFound")
        quotas = [{"metric": m, "limit": limit, "usage": usage}
                  for m, (limit, usage) in self.state.quotas[region].items()]
        self._send(200, {"kind": "compute#region", "name": region, "status": "UP", "quotas": quotas})

    def tpu_accelerator_type(self, project, zone, name):
        if name not in self.state.tpu_types.get(zone, set()):
            return self._error(404, f"Resource 'projects/{project}/locations/{zone}/acceleratorTypes/{name}' was "
                                    "not found", "notFound")
        self._send(200, {"name": f"projects/{project}/locations/{zone}/acceleratorTypes/{name}", "type": name,
                         "acceleratorConfigs": [{"type": name.split("-")[0].upper(), "topology": "4x4"}]})

    def tpu_runtime_version(self, project, zone, version):
        if version not in self.state.tpu_versions.get(zone, set()):
            return self._error(404, f"Resource 'projects/{project}/locations/{zone}/runtimeVersions/{version}' was "
                                    "not found", "notFound")
        self._send(200, {"name": f"projects/{project}/locations/{zone}/runtimeVersions/{version}", "version": version})

    def quota_info(self, project, quota_id):
        zones = self.state.tpu_quotas.get(quota_id)
        if zones is None:
            return self._error(404, f"QuotaInfo {quota_id} not found", "notFound")
        self._send(200, {"name": f"projects/{project}/locations/global/services/tpu.googleapis.com/quotaInfos/"
                                 f"{quota_id}", "quotaId": quota_id, "service": "tpu.googleapis.com",
                         "isPrecise": True, "containerType": "PROJECT",
                         "dimensionsInfos": [{"dimensions": {"zone": z}, "details": {"value": str(v)},
                                              "applicableLocations": [z]} for z, v in zones.items()]})

    def image_family(self, project, family):
        name = self.state.image_families.get((project, family))
        if not name:
            return self._error(404, f"The resource 'projects/{project}/global/images/family/{family}' was not found",
                               "notFound")
        self._send(200, {"kind": "compute#image", "name": name, "family": family, "status": "READY"})
