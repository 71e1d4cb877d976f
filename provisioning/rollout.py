"""Updating on-prem replicas behind HAProxy: which spec changes can be rolled one replica at a time, and
the balancer's admin socket reached over SSH.

A change rolls when every replica keeps its hosts and its shape (the model, engine, serving settings,
context limits may change): each replica is drained, updated, started and put back in turn while the
others answer. A change to the groups themselves (other hosts per replica, another tensor or pipeline
split, more or fewer replicas, another balancer) would leave old and new groups sharing hosts or ranks
mid-update, so herd refuses it before touching anything and says what changed.
"""
from __future__ import annotations

import shlex

from runtime.planning.plan_spec import replica_hosts


def group_shape(spec, plan) -> dict[str, object]:
    """What a rolling update must keep: the replica groups and how each is split."""
    lb = spec.onprem_section.load_balancer
    return {
        "replicas": spec.replicas,
        "hosts of each replica": [[h.address for h in group] for group in replica_hosts(spec, plan)],
        "tensor parallel": plan.tensor_parallel,
        "pipeline parallel": plan.pipeline_parallel,
        "load balancer": lb.address if lb else None,
    }


def unrollable_changes(previous: dict[str, object], current: dict[str, object]) -> list[str]:
    """One phrase per shape value that differs ("tensor parallel 1 -> 2"); empty when the change rolls."""
    return [f"{key} {previous.get(key)} -> {value}" for key, value in current.items() if previous.get(key) != value]


def remote_admin_script(socket_path: str, command: str) -> str:
    """A shell command that sends one command to HAProxy's admin socket on the balancer host and prints
    the answer (python3's socket module: Debian's HAProxy hosts have python3, and no socat is needed)."""
    program = ("import socket,sys\n"
               "s=socket.socket(socket.AF_UNIX,socket.SOCK_STREAM)\n"
               "s.settimeout(10)\n"
               "s.connect(sys.argv[1])\n"
               "s.sendall(sys.argv[2].encode()+b'\\n')\n"
               "out=b''\n"
               "while True:\n"
               "    chunk=s.recv(65536)\n"
               "    if not chunk: break\n"
               "    out+=chunk\n"
               "sys.stdout.write(out.decode())\n")
    return f"python3 -c {shlex.quote(program)} {shlex.quote(socket_path)} {shlex.quote(command)}"
