"""On-prem hosts in Pulumi state (pulumi-command, mocks): pinned host keys, the key on stdin, the steps."""
from __future__ import annotations

import paramiko
import pulumi
import pytest
import yaml
from cryptography import x509

from tests.conftest import ROOT
from tests.infra.conftest import is_secret, plain_text, write_env

API_KEY = "sk-herd-test-onprem-51"


@pytest.fixture
def racks(tmp_path, monkeypatch):
    """The shipped on-prem example, with a real key pair and known_hosts entries for both hosts."""
    monkeypatch.setenv("HERD_API_KEY", API_KEY)
    private = tmp_path / "id_rsa"
    rsa = paramiko.RSAKey.generate(2048)
    rsa.write_private_key_file(str(private))
    host_keys = {addr: paramiko.RSAKey.generate(1024) for addr in ("10.0.0.11", "10.0.0.12")}
    known = tmp_path / "known_hosts"
    known.write_text("".join(f"{addr} ssh-rsa {k.get_base64()}\n" for addr, k in host_keys.items()))
    base = yaml.safe_load((ROOT / "environments" / "onprem-example.yaml").read_text())
    base["serving"] = {**base["serving"], "api_key_env": "HERD_API_KEY"}
    base["serving"].pop("api_key_file")
    env = write_env(tmp_path, "racks", base, onprem={"ssh_key": str(private), "known_hosts": str(known)})
    return env, host_keys, rsa


def test_every_host_runs_the_steps_over_ssh_with_its_key_pinned(run_stack, racks):
    env, host_keys, _ = racks
    mocks, outputs = run_stack(env)
    installs = [r for r in mocks.of_type("command:remote:Command") if "-install-" in r.name]
    assert len(installs) == 1      # 70B BF16 fits one 8 x H100 host: the plan uses one
    # The connection holds the private key, so Pulumi keeps the whole connection secret in state.
    assert is_secret(installs[0].inputs["connection"])
    connection = installs[0].inputs["connection"]["value"]
    assert connection["host"] == "10.0.0.11" and connection["user"] == "ubuntu"
    assert connection["hostKey"] == f"ssh-rsa {host_keys['10.0.0.11'].get_base64()}"
    assert connection["privateKey"] == open(racks[0].parent / "id_rsa").read()
    script = installs[0].inputs["create"]
    assert "HERD_NODE_RANK=0" in script and "HERD_PIP_OFFLINE=1" in script and "run_step 50-venv" in script
    assert "run_step 30-efa" not in script
    key_writer = next(r for r in mocks.of_type("command:remote:Command") if "-api-key-" in r.name)
    assert is_secret(key_writer.inputs["stdin"]) and key_writer.inputs["stdin"]["value"] == API_KEY
    assert "umask 077" in key_writer.inputs["create"]
    for resource in mocks.resources:
        assert API_KEY not in plain_text(resource.inputs), resource.name
    # The install command only installs: it stops nothing (an update replaces it while serving).
    assert "delete" not in installs[0].inputs
    # The runtime is started and stopped as `herd up` / `herd down` do it, on the same connection.
    [runtime] = [r for r in mocks.of_type("command:remote:Command") if "-runtime-" in r.name]
    assert runtime.inputs["connection"]["value"]["host"] == "10.0.0.11"
    assert runtime.inputs["triggers"] == [script]   # a changed install restarts it
    start, stop = runtime.inputs["create"], runtime.inputs["delete"]
    assert 'systemctl "$verb" "$unit"' in start and "verb=start" in start   # the boot script restarted it
    assert "setpriv --reuid=\"$user\"" in start and "nohup" not in start     # else one process, as herd
    assert "action=ensure" in start and "--api-key-file /opt/herd/secrets/api-key" in start
    assert 'systemctl stop "$unit"' in stop and "action=stop" in stop and "pkill" not in stop
    assert "sudo -n bash" in start and "sudo -n bash" in stop               # a non-root SSH user
    copies = {r.inputs["remotePath"] for r in mocks.of_type("command:remote:CopyToRemote")}
    assert copies == {"/tmp/herd-node-bundle.tar.gz", "/opt/herd/wheels"}
    assert outputs["endpoint"] == "https://10.0.0.11:8000"


def test_the_head_gets_its_certificate_and_key_on_stdin_signed_for_the_hosts(run_stack, racks, deployment_state):
    env, _, _ = racks
    mocks, outputs = run_stack(env)
    writers = {r.name.rsplit("-", 1)[0].removeprefix("racks-"): r.inputs
               for r in mocks.of_type("command:remote:Command") if "-tls-" in r.name}
    assert set(writers) == {"tls-cert", "tls-key"}
    for file, writer in writers.items():
        assert is_secret(writer["stdin"]) and "umask 077" in writer["create"]
        assert writer["create"].endswith(f"cat > /opt/herd/secrets/{file})") and writer["logging"] == "none"
    cert = x509.load_pem_x509_certificate(writers["tls-cert"]["stdin"]["value"].encode())
    sans = {str(n.value) for n in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value}
    assert {"10.0.0.11", "10.0.0.12", "127.0.0.1"} <= sans
    ca_file = deployment_state / "racks" / "tls" / "ca.pem"
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_file.read_bytes()))
    assert outputs["ca_file"] == str(ca_file)
    assert outputs["smoke"] == f"herd smoke --endpoint https://10.0.0.11:8000 --ca-file {ca_file} " \
                               "--api-key-env HERD_API_KEY"
    install = next(r for r in mocks.of_type("command:remote:Command") if "-install-" in r.name)
    assert "--tls-certfile /opt/herd/secrets/tls-cert --tls-keyfile /opt/herd/secrets/tls-key" \
        in install.inputs["create"]
    for resource in mocks.resources:
        assert "PRIVATE KEY" not in plain_text(resource.inputs), resource.name


def test_a_host_without_a_recorded_key_is_refused(run_stack, racks, tmp_path):
    env, _, _ = racks
    data = yaml.safe_load(env.read_text())
    (tmp_path / "empty_known_hosts").write_text("")
    data["onprem"]["known_hosts"] = str(tmp_path / "empty_known_hosts")
    env.write_text(yaml.safe_dump(data))
    with pytest.raises(pulumi.RunError, match=r"onprem.hosts: '10.0.0.11': no host key in .*empty_known_hosts"):
        run_stack(env)
