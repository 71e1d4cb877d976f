"""The runtime's systemd unit and the step that installs it, checked by Debian's systemd itself:
`systemd-analyze verify` on the rendered unit, and systemd's own parse of it (`systemd --test`, which
loads units and dumps what it understood) for hostile values: nothing is expanded, nothing injected.
The step runs for real (useradd, usermod, chown) in a mount namespace over a copy of /etc."""
from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from provisioning.steps import STEPS_DIR, plan_host, profiles_for, service_unit
from runtime.errors import UserError
from runtime.planning.plan_spec import request_from_spec
from runtime.planning.planner import plan
from runtime.planning.spec import load_spec
from tests.conftest import ROOT

ONPREM = ROOT / "environments" / "onprem-example.yaml"
SYSTEMD = Path("/lib/systemd/systemd")
HOSTILE = "opt %h $HOME;dir"          # a specifier, a variable, a space and a command separator

HARDENING = {
    "User": "herd", "Group": "herd", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
    "PrivateTmp": "yes", "ProtectHome": "yes", "CapabilityBoundingSet": "", "AmbientCapabilities": "",
    "RestrictSUIDSGID": "yes", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes", "ProtectControlGroups": "yes", "LockPersonality": "yes",
    "RestrictNamespaces": "yes", "RestrictRealtime": "yes", "LimitMEMLOCK": "infinity",
    "Restart": "on-failure", "RestartSec": "15", "StartLimitIntervalSec": "3600", "StartLimitBurst": "5",
}


def directives(unit: str) -> dict[str, str]:
    """Key=value lines of a unit (comments and sections left out; a repeated key keeps the last)."""
    return dict(line.split("=", 1) for line in unit.splitlines() if line and line[0] not in "#;[")


def onprem_host(install_dir: str, gpus: int = 8, spec_file: Path = ONPREM):
    spec = load_spec(spec_file)
    spec = spec.model_copy(update={"onprem": spec.onprem.model_copy(update={"install_dir": install_dir,
                                                                           "gpus_per_host": gpus})})
    result = plan(request_from_spec(spec))
    profile = profiles_for(spec, result)[0]
    home = profile.home
    return plan_host(spec, result, profile, profile.address, f"{home}/models/{spec.model.id}", None,
                     f"{home}/environment.yaml")


@pytest.fixture
def world_readable_dir():
    """A directory the unprivileged user running `systemd --test` can read (pytest's is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="herd-unit-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def verify(unit_path: Path) -> subprocess.CompletedProcess:
    assert shutil.which("systemd-analyze"), "systemd-analyze comes from Debian's systemd (make system)"
    return subprocess.run(["systemd-analyze", "verify", "--man=no", "--generators=no", str(unit_path)],
                          capture_output=True, text=True, timeout=60)


def systemd_parse(unit_dir: Path, name: str) -> str:
    """systemd's own reading of the unit: `systemd --test` (refused as root, so as nobody) loads it
    from unit_dir and dumps every setting as parsed, specifiers resolved."""
    if os.geteuid() != 0 or not shutil.which("runuser"):
        pytest.skip("needs root to run systemd --test as an unprivileged user")
    done = subprocess.run(["runuser", "-u", "nobody", "--", "env", f"SYSTEMD_UNIT_PATH={unit_dir}:",
                           str(SYSTEMD), "--test", "--system", f"--unit={name}", "--no-pager"],
                          capture_output=True, text=True, timeout=120)
    start = done.stdout.find(f"\t-> Unit {name}:")
    assert start >= 0, done.stdout[-2000:] + done.stderr
    end = re.compile(r"^\t-> Unit ", re.M).search(done.stdout, start + 5)
    return done.stdout[start:end.start() if end else None]


def parsed(dump: str, key: str) -> list[str]:
    return [m.group(1) for m in re.finditer(rf"^\t+{key}: (.*)$", dump, re.M)]


def test_the_unit_runs_as_herd_sandboxed_with_gpus_and_efa_still_usable():
    unit = onprem_host("/opt/herd").env["HERD_SERVICE_UNIT"]
    found = directives(unit)
    for key, value in HARDENING.items():
        assert found.get(key) == value, (key, found.get(key))
    assert found["ReadWritePaths"] == '"/opt/herd/state/serve" "/opt/herd/state/home"'
    # What would break CUDA, NCCL or EFA is absent as a directive (only named in a comment).
    for key in ("PrivateDevices", "MemoryDenyWriteExecute", "PrivateIPC", "DeviceAllow", "DevicePolicy",
                "SystemCallFilter", "ProcSubset", "PrivateUsers", "DynamicUser"):
        assert key not in found, key
    assert "AF_NETLINK" in found["RestrictAddressFamilies"]           # rdma-core enumerates EFA devices
    assert found["ExecStartPre"].startswith("+/bin/sh -c ")            # device nodes made as root, then drop
    assert found["ExecStart"].startswith('"/opt/herd/venv/bin/herd" "serve" "/opt/herd/environment.yaml"')
    assert '"--api-key-file" "/opt/herd/secrets/api-key"' in found["ExecStart"]
    cpu = directives(onprem_host("/opt/herd", gpus=0).env["HERD_SERVICE_UNIT"])
    assert "ExecStartPre" not in cpu and cpu["User"] == "herd"


def test_hostile_values_reach_herd_serve_unexpanded_and_systemd_verifies_the_unit(world_readable_dir):
    home = f"{world_readable_dir}/{HOSTILE}"
    host = onprem_host(home)
    unit = host.env["HERD_SERVICE_UNIT"]
    assert "%%h" in unit and "$$HOME" in unit and "%h" not in unit.replace("%%h", "")
    # verify needs the executable to exist: a real one, at the hostile path itself.
    exe = Path(home, "venv", "bin", "herd")
    exe.parent.mkdir(parents=True)
    exe.symlink_to("/usr/bin/env")
    for sub in ("state/serve", "state/home"):
        Path(home, sub).mkdir(parents=True)
    unit_dir = world_readable_dir / "units"
    unit_dir.mkdir()
    (unit_dir / "herd.service").write_text(unit)
    done = verify(unit_dir / "herd.service")
    assert done.returncode == 0 and done.stderr == "", done.stderr

    dump = systemd_parse(unit_dir, "herd.service")
    # The command systemd will run, as it prints it: quoted for a shell, so bash reads it back. In the
    # arguments "$$" is a literal "$" that reaches the process as one "$" (the exec-time expansion
    # turns "$$" into "$" and, with every "$" doubled, substitutes nothing); the program's path is
    # never expanded, so its "$" is written once.
    (main,) = [line for line in parsed(dump, "Command Line") if "venv/bin/herd" in line]
    words = subprocess.run(["bash", "-c", f"printf '%s\\0' {main}"], capture_output=True, text=True,
                           check=True).stdout.split("\0")[:-1]
    path, args = words[0], [word.replace("$$", "$") for word in words[1:]]
    assert path == str(exe) and Path(path).resolve() == Path("/usr/bin/env").resolve()
    assert args == ["serve", *shlex.split(host.env["HERD_SERVE_ARGS"])]
    assert f"{home}/environment.yaml" in args and f"{home}/state/serve" in args
    assert parsed(dump, "Environment") == [f"HOME={home}/state/home"]
    assert parsed(dump, "ReadWritePaths") == [f"{home}/state/serve {home}/state/home"]
    assert parsed(dump, "User") == ["herd"] and parsed(dump, "Group") == ["herd"]
    assert parsed(dump, "EnvironmentFile") == [f"-{home}/nccl.env"]
    # The sandbox as systemd will apply it (NoNewPrivileges= is not in this dump: checked on the file).
    for key, value in {"ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
                       "PrivateDevices": "no", "MemoryDenyWriteExecute": "no", "RestrictSUIDSGID": "yes",
                       "ProtectKernelModules": "yes", "ProtectKernelTunables": "yes",
                       "ProtectControlGroups": "yes", "ProtectProc": "invisible", "LockPersonality": "yes",
                       "SystemCallArchitectures": "native", "UMask": "0027", "CapabilityBoundingSet": "",
                       "Restart": "on-failure", "RestartSec": "15s", "KillMode": "control-group",
                       "LimitMEMLOCK": "18446744073709551615"}.items():
        assert parsed(dump, key) == [value], (key, parsed(dump, key))
    # No device list: every device (/dev/nvidia*, /dev/infiniband/uverbs*) stays reachable.
    assert parsed(dump, "DevicePolicy") == ["auto"] and parsed(dump, "DeviceAllow") == []


@pytest.mark.parametrize("field,update,message", [
    ("onprem.install_dir", {"install_dir": "/opt/herd\nExecStartPre=+/bin/sh -c id"}, "contains a newline"),
    ("onprem.install_dir", {"install_dir": "/opt/herd\r"}, "contains a newline"),
    ("onprem.install_dir", {"install_dir": "/opt/herd\tx"}, "the control character '\\t'"),
    ("onprem.install_dir", {"install_dir": '/opt/"herd"'}, "systemd refuses '\"' in the path"),
    ("onprem.install_dir", {"install_dir": "opt/herd"}, "must be an absolute path"),
])
def test_a_value_that_could_inject_directives_is_refused_naming_the_field(field, update, message):
    with pytest.raises(UserError) as err:
        onprem_host(update["install_dir"])
    text = str(err.value)
    assert text.startswith(f"{field}: ") and message in text and "\n" not in text, text


def test_a_newline_in_the_model_id_is_refused_before_anything_is_rendered():
    spec = load_spec(ONPREM)
    result = plan(request_from_spec(spec))
    bad = spec.model_copy(update={"model": spec.model.model_copy(update={"id": "llama\nUser=root"})})
    profile = profiles_for(spec, result)[0]
    with pytest.raises(UserError, match=r"^model\.id: 'llama\\nUser=root': contains a newline"):
        plan_host(bad, result, profile, profile.address, "/opt/herd/models/m", None, "/opt/herd/env.yaml")
    with pytest.raises(UserError, match=r"^herd serve argument 3: .*contains a newline"):
        service_unit("/opt/herd", ["/e.yaml", "--model-dir", "/m\n[Service]"], gpu=False)


def test_the_step_in_dry_run_names_the_user_it_creates_and_the_unit(tmp_path):
    host = onprem_host("/opt/herd")
    env = {**os.environ, **host.env, "HERD_HOME": str(tmp_path / "home"), "HERD_SYSTEMD": "1"}
    done = subprocess.run(["bash", str(STEPS_DIR / "70-service.sh"), "--dry-run"], env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    if not _user_exists("herd"):
        useradd = next(line for line in done.stdout.splitlines() if "would run: useradd --system" in line)
        assert f"--no-create-home --no-log-init --home-dir {tmp_path}/home/state/home --shell /usr/sbin/nologin" \
            in useradd
    assert f"would run: install -d -o herd -g herd -m 0750 {tmp_path}/home/state/serve" in done.stdout
    assert "would write /etc/systemd/system/herd.service" in done.stdout
    assert host.env["HERD_SERVICE_UNIT"].strip() in done.stdout
    assert not (tmp_path / "home").exists()                           # a dry run changes nothing


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


# --------------------------------------------------------------------------- the step, for real
@pytest.fixture
def private_etc(tmp_path):
    """A copy of /etc that the step will see as /etc (in its own mount namespace), and a systemctl
    that records its calls: users, groups and units change in the copy, never on this machine."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root for a mount namespace")
    etc = tmp_path / "etc"
    subprocess.run(["cp", "-a", "/etc", str(etc)], check=True)
    (etc / "systemd" / "system").mkdir(parents=True, exist_ok=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "systemctl").write_text(f'#!/bin/sh\necho "$*" >> {tmp_path}/systemctl.log\n')
    (bin_dir / "systemctl").chmod(0o755)
    return etc, bin_dir, tmp_path / "systemctl.log"


def run_step_in(etc: Path, bin_dir: Path, env: dict) -> subprocess.CompletedProcess:
    script = f'mount --bind {shlex.quote(str(etc))} /etc && exec bash {shlex.quote(str(STEPS_DIR / "70-service.sh"))}'
    full = {**os.environ, **env, "HERD_SYSTEMD": "1", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", script], env=full,
                          capture_output=True, text=True, timeout=60)


def entry(path: Path, name: str) -> list[str] | None:
    for line in path.read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return fields
    return None


def test_the_step_creates_the_user_once_gives_it_its_files_and_installs_the_unit(private_etc, tmp_path):
    etc, bin_dir, calls = private_etc
    home = tmp_path / "opt herd"
    for sub in ("state/steps", "state/serve", "secrets", "venv/bin"):
        (home / sub).mkdir(parents=True)
    (home / "state/serve/serve.log").write_text("from a run as root\n")
    (home / "secrets/api-key").write_text("sk-service-test")
    (home / "secrets/hf-token").write_text("hf_x")
    (home / "secrets/api-key").chmod(0o644)                           # as loose as a careless copy
    (home / "secrets/hf-token").chmod(0o600)
    (home / "venv/bin/herd").symlink_to("/usr/bin/env")
    host = onprem_host(str(home))
    env = {**host.env, "HERD_HOME": str(home)}
    had_render = entry(etc / "group", "render") is not None
    host_passwd = Path("/etc/passwd").read_bytes()

    first = run_step_in(etc, bin_dir, env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "unit installed" in first.stdout

    user = entry(etc / "passwd", "herd")
    assert user is not None and Path("/etc/passwd").read_bytes() == host_passwd   # this machine untouched
    uid, gid = int(user[2]), int(user[3])
    assert uid < 1000 and user[5] == f"{home}/state/home" and user[6] == "/usr/sbin/nologin"
    assert entry(etc / "shadow", "herd")[1] in ("!", "*", "!*")     # no password: nobody logs in as herd
    assert entry(etc / "group", "herd")[2] == str(gid)
    assert "herd" in entry(etc / "group", "video")[3].split(",")      # the GPU device group the host has
    assert (entry(etc / "group", "render") is not None) == had_render  # no group invented
    if had_render:
        assert "herd" in entry(etc / "group", "render")[3].split(",")

    def owner_mode(path):
        st = path.stat()
        return st.st_uid, stat.S_IMODE(st.st_mode)

    assert owner_mode(home / "secrets") == (uid, 0o700)
    assert owner_mode(home / "secrets/api-key") == (uid, 0o600)
    assert owner_mode(home / "secrets/hf-token") == (0, 0o600)        # not the service's: left to root
    assert owner_mode(home / "state/serve") == (uid, 0o750)
    assert (home / "state/serve/serve.log").stat().st_uid == uid
    assert owner_mode(home / "state/home") == (uid, 0o750)
    assert (home / "state/steps").stat().st_uid == 0                  # the stamps stay root's
    installed = etc / "systemd/system/herd.service"
    assert installed.read_text() == host.env["HERD_SERVICE_UNIT"]
    assert calls.read_text().splitlines() == ["daemon-reload", "enable herd.service"]
    done = verify(installed)
    assert done.returncode == 0 and done.stderr == "", done.stderr

    passwd, group = (etc / "passwd").read_bytes(), (etc / "group").read_bytes()
    again = run_step_in(etc, bin_dir, env)
    assert again.returncode == 0 and "unit up to date" in again.stdout, again.stdout + again.stderr
    assert (etc / "passwd").read_bytes() == passwd and (etc / "group").read_bytes() == group
    assert calls.read_text().splitlines() == ["daemon-reload", "enable herd.service"]   # nothing redone


def test_without_systemd_the_step_keeps_the_unit_for_reference_and_leaves_users_alone(tmp_path):
    """Containers and the test hosts: the installer runs the runtime as a managed process."""
    host = onprem_host(str(tmp_path / "home"))
    passwd = Path("/etc/passwd").read_bytes()
    env = {**os.environ, **host.env, "HERD_HOME": str(tmp_path / "home"), "HERD_SYSTEMD": "0"}
    done = subprocess.run(["bash", str(STEPS_DIR / "70-service.sh")], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "skip: no systemd on this host" in done.stdout, done.stderr
    assert (tmp_path / "home" / "herd.service").read_text() == host.env["HERD_SERVICE_UNIT"]
    assert Path("/etc/passwd").read_bytes() == passwd
