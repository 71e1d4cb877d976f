"""Which spec changes roll one replica at a time behind the on-prem balancer, where clients are sent,
and the balancer's admin socket reached by the command the installer runs over SSH."""
import json
import socket
import subprocess
import threading

from provisioning.rollout import group_shape, remote_admin_script, unrollable_changes
from runtime.planning.plan_spec import request_from_spec
from runtime.planning.planner import plan
from runtime.planning.spec import parse_spec
from runtime.serving.tls import endpoint_for, spec_sans
from tests.provisioning.test_haproxy import ONPREM


def spec_with(**changes):
    data = json.loads(json.dumps(ONPREM))
    data["onprem"]["hosts"] = [{"address": f"10.0.0.{11 + i}"} for i in range(4)]
    data["onprem"]["load_balancer"] = {"address": "10.0.0.5", "listen_port": 8443}
    data["parallelism"]["nodes"] = 2
    data["replicas"] = 2
    for path, value in changes.items():
        section, _, key = path.partition(".")
        if key:
            data[section][key] = value
        else:
            data[section] = value
    return parse_spec(data, "rollout")


def shape(spec):
    return group_shape(spec, plan(request_from_spec(spec), suggest=False))


def test_serving_and_context_changes_roll():
    before = shape(spec_with())
    assert before["hosts of each replica"] == [["10.0.0.11", "10.0.0.12"], ["10.0.0.13", "10.0.0.14"]]
    for change in ({"context.max_model_len": 4096}, {"serving.port": 9000}, {"context.concurrency": 8}):
        assert unrollable_changes(before, shape(spec_with(**change))) == [], change


def test_changes_to_the_groups_are_named_and_refused():
    before = shape(spec_with())
    assert unrollable_changes(before, shape(spec_with(replicas=1))) == [
        "replicas 2 -> 1", "hosts of each replica [['10.0.0.11', '10.0.0.12'], ['10.0.0.13', '10.0.0.14']] -> "
        "[['10.0.0.11', '10.0.0.12']]"]
    one_host_each = shape(spec_with(**{"parallelism.nodes": 1}))
    changes = unrollable_changes(before, one_host_each)
    assert changes[0].startswith("hosts of each replica") and any(c.startswith("pipeline parallel") or
                                                                 c.startswith("tensor parallel") for c in changes)
    moved = spec_with()
    moved_lb = shape(spec_with(**{"onprem.load_balancer": {"address": "10.0.0.6"}}))
    assert unrollable_changes(shape(moved), moved_lb) == ["load balancer 10.0.0.5 -> 10.0.0.6"]


def test_clients_go_through_the_balancer_which_presents_the_deployment_certificate():
    spec = spec_with()
    assert endpoint_for(spec) == "https://10.0.0.5:8443"
    assert "10.0.0.5" in spec_sans(spec)


def test_the_admin_command_reaches_a_unix_socket_and_returns_its_whole_answer(tmp_path):
    path = str(tmp_path / "admin.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    received = []

    def answer():
        conn, _ = server.accept()
        received.append(conn.recv(1024))
        conn.sendall(b"# pxname,svname,status\n" + b"x" * 200_000)   # more than one read
        conn.close()
    threading.Thread(target=answer, daemon=True).start()
    done = subprocess.run(["bash", "-c", remote_admin_script(path, "show stat")], capture_output=True,
                          text=True, timeout=30)
    server.close()
    assert done.returncode == 0, done.stderr
    assert received == [b"show stat\n"] and done.stdout.startswith("# pxname") and len(done.stdout) == 23 + 200_000
