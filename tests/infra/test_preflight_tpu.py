"""TPU preflight against a loopback stand-in of the Cloud TPU and Cloud Quotas REST APIs (no emulator
exists): the slice's type and software version in the zone, the zone's TPU quota in chips, each failure
one line naming the field, the zone and the numbers; `herd preflight` exits by them."""
import json

import pytest

from infra.preflight.gcp_tpu import QUOTAS_ENDPOINT_ENV, TPU_ENDPOINT_ENV, Rest, quota_id, tpu_findings
from runtime.errors import UserError
from runtime.planning.plan_spec import request_from_spec
from runtime.planning.planner import plan
from runtime.planning.spec import load_spec
from tests.conftest import ROOT, run_herd
from tests.infra.gce_fake import ComputeState, FakeCompute

ENV = ROOT / "environments" / "gcp-v6e-405b-int8.yaml"
QUOTA = "TPUV6EPerProjectPerZoneForTPUAPI"


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("HERD_API_KEY", "k")


def v6e_project(**overrides) -> ComputeState:
    state = ComputeState(tpu_types={"us-east5-b": {"v6e-16", "v6e-32"}},
                         tpu_versions={"us-east5-b": {"v2-alpha-tpuv6e"}},
                         tpu_quotas={QUOTA: {"us-east5-b": 32, "us-east5-a": 0}})
    for key, value in overrides.items():
        setattr(state, key, value)
    return state


def check(state, spec=None):
    spec = spec or load_spec(ENV)
    with FakeCompute(state) as fake:
        found = tpu_findings(spec, plan(request_from_spec(spec)), Rest(fake.endpoint), Rest(fake.endpoint))
    return {f.check: f for f in found}


def test_a_v6e_16_in_a_zone_with_the_type_the_software_and_quota_passes():
    state = v6e_project()
    found = check(state)
    assert {k: f.status for k, f in found.items()} == {"accelerator": "ok", "runtime": "ok", "quota": "ok"}
    assert found["quota"].message.startswith(f"{QUOTA} in us-east5-b: 16 chips needed, limit 32")
    assert "/v2/projects/my-project/locations/us-east5-b/acceleratorTypes/v6e-16" in state.requests


def test_failures_name_the_zone_the_field_and_the_numbers():
    state = v6e_project(tpu_types={"us-east5-b": {"v6e-8"}}, tpu_versions={"us-east5-b": set()},
                        tpu_quotas={QUOTA: {"us-east5-b": 8}})
    found = check(state)
    assert found["accelerator"].message == ("gcp.zone: 'us-east5-b': the TPU type v6e-16 is not offered there "
                                            "(gcp.machine_type: v6e-16)")
    assert found["runtime"].message == "gcp.tpu_runtime_version: 'v2-alpha-tpuv6e' is not available in zone us-east5-b"
    assert found["quota"].message == (f"{QUOTA} in us-east5-b: need 16 chips for v6e-16, limit 8: request a limit "
                                      "of at least 16")
    assert all(f.status == "fail" for f in found.values())


def test_spot_and_reserved_capacity_check_their_own_quota():
    assert quota_id("tpu-v6e", spot=True, reserved=False) == "TPUV6EPreemptiblePerProjectPerZoneForTPUAPI"
    assert quota_id("tpu-v5e", spot=False, reserved=True) == "TPUV5EReservedPerProjectPerZoneForTPUAPI"
    base = load_spec(ENV)
    spot = base.model_copy(update={"gcp": base.gcp.model_copy(update={"spot": True})})
    found = check(v6e_project(), spot)   # only on-demand quota granted: spot's is unknown, not a pass
    assert found["quota"].status == "unknown" and "TPUV6EPreemptiblePerProjectPerZoneForTPUAPI" in found["quota"].message


def test_a_forbidden_project_is_one_user_error():
    state = v6e_project(forbidden_projects={"my-project"})
    with pytest.raises(UserError, match=r"^gcp: GET /v2/projects/my-project/.*permission"):
        check(state)


def test_herd_preflight_of_the_tpu_environment_exits_by_its_checks():
    with FakeCompute(v6e_project()) as fake:
        env = {TPU_ENDPOINT_ENV: fake.endpoint, QUOTAS_ENDPOINT_ENV: fake.endpoint}
        done = run_herd("preflight", str(ENV), env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "1 x v6e-16 slice (4 hosts)" in done.stdout and f"{QUOTA} in us-east5-b" in done.stdout
    with FakeCompute(v6e_project(tpu_quotas={QUOTA: {"us-east5-b": 4}})) as fake:
        env = {TPU_ENDPOINT_ENV: fake.endpoint, QUOTAS_ENDPOINT_ENV: fake.endpoint}
        done = run_herd("preflight", str(ENV), "--json", env=env)
    report = json.loads(done.stdout)
    assert done.returncode == 1 and [f["check"] for f in report["findings"] if f["status"] == "fail"] == ["quota"]
