"""Preflight counts every replica: quotas and capacity reservations are for all groups, not one."""
from __future__ import annotations

import pytest

from infra.preflight.aws import ON_DEMAND_P
from tests.infra.test_preflight import (ENVS, a3_project, aws_check, ec2, gcp_check,  # noqa: F401 (fixture)
                                        reservation_client, spec_from)
from runtime.planning.spec import load_spec


def with_replicas(name: str, replicas: int, **changes):
    spec = spec_from(name, **changes)
    return spec.model_copy(update={"replicas": replicas})


def test_the_p_instance_quota_counts_every_replica(ec2):  # noqa: F811
    spec = with_replicas("aws-p4de-405b-bf16-2node.yaml", 2, aws={"ami_owners": ["self"]})
    found = aws_check(spec, quota_value=192, ec2_client=ec2)["quota"]
    assert found.status == "fail"
    assert found.message == (f"{ON_DEMAND_P} (On-Demand P instances, vCPUs): need 384 for 4 (2 replicas x 2) x "
                             "p4de.24xlarge, quota 192, in use 0: request at least 384 in Service Quotas (us-east-1)")
    assert aws_check(spec, quota_value=384, ec2_client=ec2)["quota"].status == "ok"


def test_a_capacity_reservation_must_hold_every_replica(ec2):  # noqa: F811
    spec = with_replicas("aws-p5-405b-fp8.yaml", 3, aws={"ami_owners": ["self"], "capacity_reservation_id": "cr-0abc"})
    short = aws_check(spec, ec2_client=ec2, reservations=reservation_client(AvailableInstanceCount=2))["reservation"]
    assert short.status == "fail" and "2 instances available, 3 (3 replicas x 1) needed" in short.message
    enough = aws_check(spec, ec2_client=ec2, reservations=reservation_client(AvailableInstanceCount=3))["reservation"]
    assert enough.status == "ok"


def test_the_gcp_gpu_quota_counts_every_replica():
    spec = load_spec(ENVS / "gcp-a3-405b-fp8.yaml").model_copy(update={"replicas": 3})
    found = gcp_check(spec, a3_project())["quota"]     # 16 H100s free, 3 groups of 8 need 24
    assert found.status == "fail"
    assert found.message == ("NVIDIA_H100_GPUS in us-central1: need 24 GPUs for 3 (3 replicas x 1) x a3-highgpu-8g, "
                             "limit 16, in use 0: request a limit of at least 24")
    two = gcp_check(load_spec(ENVS / "gcp-a3-405b-fp8.yaml").model_copy(update={"replicas": 2}), a3_project())
    assert two["quota"].message == "NVIDIA_H100_GPUS in us-central1: 16 needed, 16 free of 16"


@pytest.mark.parametrize("replicas", [1, 2])
def test_the_fit_finding_names_the_replicas(replicas):
    from infra.preflight.checks import findings_for
    from runtime.planning.plan_spec import request_from_spec
    from runtime.planning.planner import plan
    spec = load_spec(ENVS / "onprem-example.yaml")
    if replicas > 1:
        data = spec.model_dump()
        data["onprem"]["load_balancer"] = {"address": "10.0.0.5"}
        data["replicas"] = replicas
        from runtime.planning.spec import parse_spec
        spec = parse_spec(data, "onprem-example")
    (fit,) = findings_for(spec, plan(request_from_spec(spec)))
    prefix = "fits: 2 replicas x 1 x h100-80gb" if replicas > 1 else "fits: 1 x h100-80gb"
    assert fit.status == "ok" and fit.message.startswith(prefix), fit.message
