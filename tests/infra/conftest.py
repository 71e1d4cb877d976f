"""Pulumi programs under `pulumi.runtime.set_mocks`: no engine, no cloud; every resource the program
registers is recorded with its inputs (camelCase, as on the wire) for the tests to read."""
from __future__ import annotations

import itertools
import shlex
from dataclasses import dataclass, field

import pulumi
import pytest

ZONES = ["us-east-1a", "us-east-1b", "us-east-1d"]


@dataclass
class Recorded:
    type: str
    name: str
    inputs: dict
    parent: str | None


@dataclass
class CloudMocks(pulumi.runtime.Mocks):
    """Plausible provider answers: ids, addresses and names a real provider would fill in."""
    offered_zones: list[str] = field(default_factory=lambda: list(ZONES))
    resources: list[Recorded] = field(default_factory=list)
    calls: list[tuple[str, dict]] = field(default_factory=list)

    def __post_init__(self):
        self._ips = itertools.count(10)
        self._public = itertools.count(10)     # reserved public addresses: their own range

    def new_resource(self, args: pulumi.runtime.MockResourceArgs):
        self.resources.append(Recorded(args.typ, args.name, dict(args.inputs), None))
        state = dict(args.inputs)
        rid = f"{args.name}-id"
        if args.typ == "aws:ec2/instance:Instance":
            n = next(self._ips)
            state.update(privateIp=f"10.42.0.{n}", primaryNetworkInterfaceId=f"eni-{n}")
        elif args.typ == "aws:ec2/eip:Eip":
            n = next(self._public)
            state.update(publicIp=f"198.51.100.{n}", allocationId=f"eipalloc-{n}",
                         publicDns=f"ec2-198-51-100-{n}.compute-1.amazonaws.com")
        elif args.typ == "gcp:compute/address:Address":
            state["address"] = f"203.0.113.{100 + next(self._public)}"
        elif args.typ == "aws:s3/bucket:Bucket":
            state.update(bucket=f"{args.name}-4f2a", arn=f"arn:aws:s3:::{args.name}-4f2a")
        elif args.typ == "aws:ec2/launchTemplate:LaunchTemplate":
            state["latestVersion"] = 1
        elif args.typ in ("aws:ec2/placementGroup:PlacementGroup", "aws:iam/role:Role"):
            state.setdefault("name", f"{args.name}-7c1d")
            state["arn"] = f"arn:aws:iam::123456789012:role/{args.name}"
        elif args.typ == "aws:kms/key:Key":
            state.update(arn=f"arn:aws:kms:us-east-1:123456789012:key/{args.name}-0c5e", keyId=f"{args.name}-0c5e")
        elif args.typ == "aws:iam/instanceProfile:InstanceProfile":
            state["arn"] = f"arn:aws:iam::123456789012:instance-profile/{args.name}"
        elif args.typ == "gcp:compute/instance:Instance":
            n = next(self._ips)
            nics = state.get("networkInterfaces", [{}])
            # A reserved address given as natIp stays; an ephemeral one is assigned.
            nat = (nics[0].get("accessConfigs") or [{}])[0].get("natIp") or f"203.0.113.{n}"
            state["networkInterfaces"] = [{**nics[0], "networkIp": f"10.42.0.{n}",
                                           "accessConfigs": [{"natIp": nat}]}]
        elif args.typ == "gcp:tpu/v2Vm:V2Vm":
            # The Cloud TPU API gives every host of the slice an endpoint, in worker order.
            hosts = int(state.get("labels", {}).get("herd-slice-hosts", "1"))
            endpoints = []
            for _ in range(hosts):
                n = next(self._ips)
                endpoints.append({"ipAddress": f"10.42.0.{n}", "port": 8470,
                                  "accessConfigs": [{"externalIp": f"203.0.113.{n}"}]})
            state["networkEndpoints"] = endpoints
        elif args.typ == "gcp:serviceaccount/account:Account":
            state["email"] = f"{state['accountId']}@my-project.iam.gserviceaccount.com"
        elif args.typ == "gcp:storage/bucket:Bucket":
            state["name"] = f"{args.name}-9e1b"
        elif args.typ == "command:local:Command":
            # A readiness gate (`herd wait-healthy ...`) prints what became healthy: its --target or --group.
            words = shlex.split(state.get("create") or "")
            flag = "--target" if "--target" in words else "--group"
            state["stdout"] = words[words.index(flag) + 1] + "\n" if flag in words else ""
        return [rid, state]

    def call(self, args: pulumi.runtime.MockCallArgs):
        self.calls.append((args.token, dict(args.args)))
        if args.token == "aws:ec2/getInstanceTypeOfferings:getInstanceTypeOfferings":
            return {"id": "offerings", "locations": self.offered_zones, "locationTypes": [],
                    "instanceTypes": []}
        if args.token == "aws:ec2/getAmi:getAmi":
            return {"id": "ami-0dla0123456789abc", "name": "Deep Learning OSS Nvidia Driver AMI GPU PyTorch 2.7"}
        if args.token == "aws:ec2/getSubnet:getSubnet":
            zone = {"subnet-0east1b": "us-east-1b", "subnet-0east1z": "us-east-1z"}[args.args["id"]]
            return {"id": args.args["id"], "vpcId": "vpc-0existing", "availabilityZone": zone,
                    "cidrBlock": "10.9.0.0/24"}
        if args.token == "aws:index/getCallerIdentity:getCallerIdentity":
            return {"accountId": "123456789012", "arn": "arn:aws:iam::123456789012:user/ci", "id": "x",
                    "userId": "x"}
        return {}

    def of_type(self, typ: str) -> list[Recorded]:
        return [r for r in self.resources if r.type == typ]

    def one(self, typ: str) -> Recorded:
        found = self.of_type(typ)
        assert len(found) == 1, f"expected one {typ}, got {[r.name for r in found]}"
        return found[0]


@pytest.fixture(autouse=True)
def deployment_state(tmp_path, monkeypatch):
    """The operator's state home (where the programs keep each deployment's CA), per test."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return tmp_path / "state" / "herd" / "deployments"


@pytest.fixture
def run_stack():
    """Run the Pulumi program for an environment file under mocks; returns (mocks, outputs)."""
    def run(env_path, config: dict | None = None, mocks: CloudMocks | None = None):
        from infra.stacks import stack_name
        mocks = mocks or CloudMocks()
        pulumi.runtime.set_mocks(mocks, project="herd", stack=stack_name(env_path), preview=False)
        pulumi.runtime.set_all_config({"herd:environment": str(env_path), **(config or {})})
        exported = {}

        @pulumi.runtime.test
        def program():
            from infra.program import main
            outputs = main()
            return pulumi.Output.all(**outputs).apply(exported.update)

        program()
        return mocks, exported
    return run


# How a secret input reaches the mocks (and the engine): wrapped with Pulumi's secret signature.
SECRET_SIG = ("4dabf18193072939515e22adb298388d", "1b47061264138c4ac30d75fd1eb44270")


def is_secret(value) -> bool:
    return isinstance(value, dict) and value.get(SECRET_SIG[0]) == SECRET_SIG[1]


def plain_text(value) -> str:
    """Everything a resource's inputs hold in the clear (secret-wrapped values left out)."""
    if is_secret(value):
        return ""
    if isinstance(value, dict):
        return " ".join(f"{k} {plain_text(v)}" for k, v in value.items())
    if isinstance(value, list):
        return " ".join(plain_text(v) for v in value)
    return str(value)


def write_env(tmp_path, name: str, base: dict, **sections) -> "Path":
    """A variant of a shipped environment, written where a stack can name it."""
    import copy

    import yaml
    data = copy.deepcopy(base)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    data["name"] = name
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
