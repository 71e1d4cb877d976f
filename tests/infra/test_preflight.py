"""Preflight against moto's EC2 (in process), botocore's Stubber for Service Quotas and capacity
reservations (moto implements neither), and a loopback Compute Engine API for the real GCP client."""
from __future__ import annotations

import boto3
import pytest
import yaml
from botocore.stub import Stubber
from moto import mock_aws

from infra.preflight.aws import ON_DEMAND_P, SPOT_P, AwsClients, aws_findings
from infra.preflight.gcp import ENDPOINT_ENV, clients_for, gcp_findings
from runtime.errors import UserError
from runtime.planning.plan_spec import request_from_spec
from runtime.planning.planner import plan
from runtime.planning.spec import load_spec, parse_spec
from tests.conftest import ROOT, run_herd
from tests.infra.gce_fake import ComputeState, FakeCompute

ENVS = ROOT / "environments"
DLAMI = "Deep Learning OSS Nvidia Driver AMI GPU PyTorch 2.7 (Ubuntu 22.04) 20251104"


def spec_from(name: str, **changes):
    data = yaml.safe_load((ENVS / name).read_text())
    for section, values in changes.items():
        data[section] = {**data.get(section, {}), **values}
    return parse_spec(data, name)


def by_check(findings):
    return {f.check: f for f in findings}


# ------------------------------------------------------------------ AWS
@pytest.fixture
def ec2():
    with mock_aws():
        client = boto3.client("ec2", region_name="us-east-1")
        # A DLAMI-like image of our own (moto's register_image drops the architecture; an image made from
        # an instance keeps it), then the builder instance is gone.
        base = client.describe_images(Owners=["amazon"], Filters=[{"Name": "architecture", "Values": ["x86_64"]}])
        builder = client.run_instances(ImageId=base["Images"][0]["ImageId"], InstanceType="t3.micro", MinCount=1,
                                       MaxCount=1)["Instances"][0]["InstanceId"]
        client.create_image(InstanceId=builder, Name=DLAMI)
        client.terminate_instances(InstanceIds=[builder])
        yield client


def quotas_client(code: str, value: float):
    client = boto3.client("service-quotas", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    stub = Stubber(client)
    stub.add_response("get_service_quota", {"Quota": {"QuotaCode": code, "Value": value, "ServiceCode": "ec2"}},
                      {"ServiceCode": "ec2", "QuotaCode": code})
    stub.activate()
    return client


def aws_check(spec, quota_value=192.0, code=ON_DEMAND_P, ec2_client=None, reservations=None):
    result = plan(request_from_spec(spec))
    return by_check(aws_findings(spec, result, AwsClients(ec2_client, quotas_client(code, quota_value),
                                                          reservations or ec2_client)))


def test_a_p5_with_quota_offering_efa_and_an_image_passes(ec2):
    spec = spec_from("aws-p5-405b-fp8.yaml", aws={"ami_owners": ["self"]})
    found = aws_check(spec, ec2_client=ec2)
    assert {k: f.status for k, f in found.items()} == {"offering": "ok", "efa": "ok", "quota": "ok", "ami": "ok"}
    assert "32 interfaces" in found["efa"].message
    assert DLAMI in found["ami"].message


def test_a_short_quota_names_its_code_the_need_and_the_request_to_make(ec2):
    spec = spec_from("aws-p4de-405b-bf16-2node.yaml", aws={"ami_owners": ["self"]})
    found = aws_check(spec, quota_value=96, ec2_client=ec2)["quota"]
    assert found.status == "fail"
    assert found.message == (f"{ON_DEMAND_P} (On-Demand P instances, vCPUs): need 192 for 2 x p4de.24xlarge, "
                             "quota 96, in use 0: request at least 192 in Service Quotas (us-east-1)")


def test_running_p_instances_count_against_the_quota(ec2):
    image = ec2.describe_images(Owners=["self"])["Images"][0]["ImageId"]
    ec2.run_instances(ImageId=image, InstanceType="p4d.24xlarge", MinCount=1, MaxCount=1)
    spec = spec_from("aws-p5-405b-fp8.yaml", aws={"ami_owners": ["self"]})
    found = aws_check(spec, quota_value=192, ec2_client=ec2)["quota"]
    assert found.status == "fail" and "quota 192, in use 96" in found.message and "at least 288" in found.message


def test_spot_checks_the_spot_quota(ec2):
    spec = spec_from("aws-p5-405b-fp8.yaml", aws={"ami_owners": ["self"], "spot": True})
    found = aws_check(spec, code=SPOT_P, quota_value=384, ec2_client=ec2)["quota"]
    assert found.status == "ok" and found.message.startswith(SPOT_P)


def test_zones_that_do_not_offer_the_type_and_a_missing_image_fail_by_name(ec2):
    spec = spec_from("aws-p5-405b-fp8.yaml", aws={"availability_zones": ["us-east-1z"]})
    found = aws_check(spec, ec2_client=ec2)
    assert found["offering"].status == "fail"
    assert found["offering"].message.startswith("aws.availability_zones: ['us-east-1z']: p5.48xlarge is offered only "
                                                "in ['us-east-1a'")
    assert found["ami"].status == "fail"
    assert "no available image owned by amazon matches in us-east-1" in found["ami"].message


def reservation_client(**reservation):
    client = boto3.client("ec2", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    stub = Stubber(client)
    row = {"CapacityReservationId": "cr-0abc", "InstanceType": "p5.48xlarge", "AvailabilityZone": "us-east-1a",
           "State": "active", "AvailableInstanceCount": 1, "TotalInstanceCount": 1, **reservation}
    stub.add_response("describe_capacity_reservations", {"CapacityReservations": [row]},
                      {"CapacityReservationIds": ["cr-0abc"]})
    stub.activate()
    return client


def test_a_capacity_reservation_must_be_active_of_the_type_with_room_for_every_node(ec2):
    spec = spec_from("aws-p5-405b-fp8.yaml", aws={"ami_owners": ["self"], "capacity_reservation_id": "cr-0abc"})
    good = aws_check(spec, ec2_client=ec2, reservations=reservation_client())["reservation"]
    assert good.status == "ok" and "active, 1 x p5.48xlarge in us-east-1a" in good.message
    bad = aws_check(spec, ec2_client=ec2, reservations=reservation_client(
        State="expired", InstanceType="p4d.24xlarge", AvailableInstanceCount=0))["reservation"]
    assert bad.status == "fail"
    assert bad.message == ("aws.capacity_reservation_id: 'cr-0abc': state is expired; it reserves p4d.24xlarge, the "
                           "spec asks for p5.48xlarge; 0 instances available, 1 needed")


@pytest.fixture
def no_aws_credentials(tmp_path, monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    return {"AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
            "AWS_EC2_METADATA_DISABLED": "true"}


def test_no_aws_credentials_is_one_line_naming_what_to_set(no_aws_credentials):
    done = run_herd("preflight", "environments/aws-p5-405b-fp8.yaml", env=no_aws_credentials)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "herd: error: aws: no credentials found: set AWS_PROFILE (or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY) "
        "for an account that may describe EC2 and read Service Quotas"]
    done = run_herd("preflight", "environments/aws-p5-405b-fp8.yaml", env={**no_aws_credentials, "AWS_PROFILE": "nope"})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "herd: error: AWS_PROFILE: 'nope': no such profile in the AWS config files (allowed: a profile listed by "
        "`aws configure list-profiles`)"]


# ------------------------------------------------------------------ GCP
def a3_project(**overrides) -> ComputeState:
    state = ComputeState(
        machine_types={"us-central1-a": {"a3-highgpu-8g", "a2-ultragpu-8g"}},
        accelerator_types={"us-central1-a": {"nvidia-h100-80gb", "nvidia-a100-80gb"}},
        quotas={"us-central1": {"NVIDIA_H100_GPUS": (16, 0), "PREEMPTIBLE_NVIDIA_H100_GPUS": (8, 8)}},
        image_families={("deeplearning-platform-release", "common-cu128-ubuntu-2204-nvidia-570"):
                        "common-cu128-ubuntu-2204-nvidia-570-v20251101"})
    for key, value in overrides.items():
        setattr(state, key, value)
    return state


def gcp_check(spec, state):
    with FakeCompute(state) as fake:
        return by_check(gcp_findings(spec, plan(request_from_spec(spec)), clients_for(fake.endpoint)))


def test_an_a3_in_a_zone_that_has_it_with_quota_and_an_image_passes():
    state = a3_project()
    found = gcp_check(load_spec(ENVS / "gcp-a3-405b-fp8.yaml"), state)
    assert {k: f.status for k, f in found.items()} == {"offering": "ok", "accelerator": "ok", "quota": "ok",
                                                       "image": "ok"}
    assert found["quota"].message == "NVIDIA_H100_GPUS in us-central1: 8 needed, 16 free of 16"
    assert "/compute/v1/projects/my-project/regions/us-central1" in state.requests


def test_gcp_failures_name_the_zone_the_quota_metric_and_the_numbers():
    state = a3_project(machine_types={"us-central1-a": set()}, accelerator_types={"us-central1-a": set()},
                       quotas={"us-central1": {"NVIDIA_H100_GPUS": (8, 4)}}, image_families={})
    found = gcp_check(load_spec(ENVS / "gcp-a3-405b-fp8.yaml"), state)
    assert found["offering"].message == "gcp.machine_type: 'a3-highgpu-8g' is not offered in zone us-central1-a"
    assert found["accelerator"].message == ("gcp.zone: 'us-central1-a': accelerator type nvidia-h100-80gb is not "
                                            "available there")
    assert found["quota"].message == ("NVIDIA_H100_GPUS in us-central1: need 8 GPUs for 1 x a3-highgpu-8g, limit 8, "
                                      "in use 4: request a limit of at least 12")
    assert found["image"].message.startswith("gcp.image_family: 'common-cu128-ubuntu-2204-nvidia-570': no image")
    assert all(f.status == "fail" for f in found.values())


def test_spot_vms_check_the_preemptible_quota():
    found = gcp_check(spec_from("gcp-a3-405b-fp8.yaml", gcp={"spot": True}), a3_project())
    assert found["quota"].status == "fail" and found["quota"].message.startswith("PREEMPTIBLE_NVIDIA_H100_GPUS")


def test_a_project_without_permission_is_one_user_error():
    with pytest.raises(UserError, match=r"gcp.project: 'my-project': Required 'compute.regions.get' permission"):
        gcp_check(load_spec(ENVS / "gcp-a3-405b-fp8.yaml"), a3_project(forbidden_projects={"my-project"}))


def test_herd_preflight_prints_the_plan_and_the_checks_and_exits_by_them(monkeypatch):
    with FakeCompute(a3_project()) as fake:
        done = run_herd("preflight", "environments/gcp-a3-405b-fp8.yaml", env={"HERD_GCE_ENDPOINT": fake.endpoint})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "$/h" in done.stdout or "per hour" in done.stdout or "cost" in done.stdout
    assert "NVIDIA_H100_GPUS in us-central1" in done.stdout
    with FakeCompute(a3_project(quotas={"us-central1": {"NVIDIA_H100_GPUS": (0, 0)}})) as fake:
        done = run_herd("preflight", "environments/gcp-a3-405b-fp8.yaml", "--json",
                        env={"HERD_GCE_ENDPOINT": fake.endpoint})
    assert done.returncode == 1
    report = __import__("json").loads(done.stdout)
    assert report["ok"] is False and report["plan"]["cost_usd_per_hour"] > 0
    assert [f["check"] for f in report["findings"] if f["status"] == "fail"] == ["quota"]


def test_no_gcp_credentials_is_one_line_naming_what_to_set(monkeypatch, tmp_path):
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.delenv(ENDPOINT_ENV, raising=False)
    done = run_herd("preflight", "environments/gcp-a3-405b-fp8.yaml",
                    env={"CLOUDSDK_CONFIG": str(tmp_path / "gcloud"), "NO_GCE_CHECK": "True"})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "herd: error: gcp: no credentials found: set GOOGLE_APPLICATION_CREDENTIALS or run "
        "`gcloud auth application-default login`"]
