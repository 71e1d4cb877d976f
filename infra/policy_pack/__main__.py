"""CrossGuard entry point: the rules of infra/policy.py, mandatory."""
from pulumi_policy import PolicyPack

from infra.policy import crossguard_policies

PolicyPack(name="herd", policies=crossguard_policies())
