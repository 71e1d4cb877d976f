"""`herd wait-healthy`: the gate `pulumi up` runs between replicas, as the real CLI against moto's
server (AWS target health) and the loopback Compute Engine API (GCP backend health)."""
import threading
import time

import boto3
import pytest

from tests.conftest import run_herd
from tests.infra.gce_fake import ComputeState, FakeCompute
from tests.provisioning.conftest import moto_s3  # noqa: F401  (moto's server process, shared fixture)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]   # a moto server and CLI runs: ~10 s here


@pytest.fixture
def target(moto_s3, monkeypatch):  # noqa: F811
    for key, value in moto_s3.items():
        monkeypatch.setenv(key, value)
    ec2, elb = boto3.client("ec2"), boto3.client("elbv2")
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    image = ec2.describe_images()["Images"][0]["ImageId"]
    instance = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    group = elb.create_target_group(Name=f"heads-{instance[-8:]}", Protocol="HTTP", Port=8000, VpcId=vpc,
                                    HealthCheckPath="/health/ready")["TargetGroups"][0]["TargetGroupArn"]
    return elb, group, instance


def aws_wait(group: str, instance: str, timeout: float, env: dict):
    return run_herd("wait-healthy", "aws", "--region", "us-east-1", "--target-group", group, "--target", instance,
                    "--port", "8000", "--replica", "replica-0", "--timeout", str(timeout), "--poll", "0.2",
                    env=env, timeout=90)


def test_aws_gate_waits_until_the_head_is_healthy_in_the_target_group(target, moto_s3):  # noqa: F811
    elb, group, instance = target
    # Not registered yet ("unused"): the gate refuses after its timeout, naming the replica and state.
    refused = aws_wait(group, instance, 1, moto_s3)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith(f"herd: error: replica-0 (instance {instance}): not "
                                                              "healthy within 1s (last state: unused")
    assert "Traceback" not in refused.stderr
    # Registered while the gate waits: it passes and prints what became healthy.
    registered_at = []

    def register():
        time.sleep(2)
        elb.register_targets(TargetGroupArn=group, Targets=[{"Id": instance, "Port": 8000}])
        registered_at.append(time.monotonic())
    threading.Thread(target=register).start()
    started = time.monotonic()
    passed = aws_wait(group, instance, 60, moto_s3)
    assert passed.returncode == 0, passed.stderr
    assert passed.stdout.strip() == instance and registered_at and time.monotonic() - started >= 2


def test_gcp_gate_waits_until_the_replica_group_is_healthy_in_the_backend_service():
    link = "https://www.googleapis.com/compute/v1/projects/p1/zones/us-central1-a/instanceGroups/x-lb-replica-0"
    state = ComputeState(backend_health={("x-lb-replicas", link): "UNHEALTHY"})
    with FakeCompute(state) as fake:
        env = {"HERD_GCE_ENDPOINT": fake.endpoint}
        argv = ("wait-healthy", "gcp", "--project", "p1", "--backend-service", "x-lb-replicas", "--group", link,
                "--replica", "replica-0", "--poll", "0.2")
        refused = run_herd(*argv, "--timeout", "1", env=env, timeout=90)
        assert refused.returncode == 2 and "replica-0 (group x-lb-replica-0): not healthy within 1s (last state: " \
            "UNHEALTHY)" in refused.stderr, refused.stderr

        def heal():
            time.sleep(2)
            state.backend_health[("x-lb-replicas", link)] = "HEALTHY"
        threading.Thread(target=heal).start()
        passed = run_herd(*argv, "--timeout", "60", env=env, timeout=90)
        assert passed.returncode == 0 and passed.stdout.strip() == link, passed.stderr
        assert any(r.endswith("/global/backendServices/x-lb-replicas/getHealth") for r in state.requests)
