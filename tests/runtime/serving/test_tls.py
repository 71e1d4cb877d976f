"""TLS on the endpoint: the deployment CA herd makes, named certificates, and real handshakes.

The handshakes are real: `herd serve` (uvicorn with the generated certificate) in a child process, and
the real `openai` client, `herd smoke`, `herd generate` and `herd status` trusting the generated CA, or
refusing the endpoint without it. OpenSSL's own command line checks what herd computes.
"""
from __future__ import annotations

import json
import os
import ssl
import stat
import subprocess
import textwrap
import time

import httpx
import pytest
from cryptography import x509

from runtime.serving import tls
from runtime.errors import UserError
from runtime.paths import model_dir_for
from runtime.planning.spec import load_spec
from tests.conftest import ROOT, run_herd

LOCAL = (ROOT / "environments" / "local.yaml").read_text()


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def openssl(*args: str) -> str:
    done = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def openssl_fingerprint(path) -> str:
    # OpenSSL 3 prints "sha256 Fingerprint=AB:CD:..." (1.1: "SHA256 Fingerprint=...").
    return openssl("x509", "-noout", "-fingerprint", "-sha256", "-in", str(path)).strip().split("=", 1)[1]


def sans_of(path) -> set[str]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(n.value) for n in names}


# ------------------------------------------------------------------ the deployment CA
def test_the_deployment_ca_signs_a_server_certificate_for_the_wanted_names_with_keys_0600(tmp_path):
    old = os.umask(0)   # even a wide-open umask must not widen the key files
    try:
        material, new = tls.deployment_material(tmp_path / "tls", tls.server_sans("10.1.2.3", ["herd.example"]))
    finally:
        os.umask(old)
    assert new and material.generated
    directory = tmp_path / "tls"
    assert mode(directory) == 0o700
    assert mode(directory / "ca.key") == 0o600 and mode(directory / "server.key") == 0o600
    assert mode(directory / "ca.pem") == 0o644
    assert sans_of(material.certfile) == {"10.1.2.3", "herd.example", "localhost", "127.0.0.1", "::1"}
    # OpenSSL agrees the chain holds, for a TLS server, and on the fingerprint herd prints.
    assert openssl("verify", "-purpose", "sslserver", "-CAfile", str(material.ca_file),
                   str(material.certfile)).strip().endswith("OK")
    assert tls.fingerprint(material.ca_file) == openssl_fingerprint(material.ca_file)
    ca = x509.load_pem_x509_certificate(material.ca_file.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert str(material.ca_file) in tls.announce(material)
    assert tls.fingerprint(material.ca_file) in tls.announce(material)


def test_the_ca_is_kept_and_the_server_certificate_reissued_only_when_its_names_change(tmp_path):
    first, _ = tls.deployment_material(tmp_path, tls.server_sans("10.1.2.3"))
    ca, server = first.ca_file.read_bytes(), first.certfile.read_bytes()
    again, new = tls.deployment_material(tmp_path, tls.server_sans("10.1.2.3"))
    assert not new and again.ca_file.read_bytes() == ca and again.certfile.read_bytes() == server
    moved, new = tls.deployment_material(tmp_path, tls.server_sans("10.9.9.9"))
    assert not new and moved.ca_file.read_bytes() == ca          # clients keep trusting the same CA
    assert moved.certfile.read_bytes() != server and "10.9.9.9" in sans_of(moved.certfile)


def test_a_wildcard_bind_names_this_machine_and_loopback():
    sans = tls.server_sans("0.0.0.0")
    import socket
    assert socket.gethostname().lower() in sans and "127.0.0.1" in sans and "0.0.0.0" not in sans


def test_a_ca_key_readable_by_others_is_refused(tmp_path):
    tls.deployment_material(tmp_path, tls.server_sans("127.0.0.1"))
    os.chmod(tmp_path / "ca.key", 0o644)
    with pytest.raises(UserError, match=r"ca.key'?: mode 0644 lets other users read the private key"):
        tls.deployment_material(tmp_path, tls.server_sans("127.0.0.1"))


# ------------------------------------------------------------------ the spec
def write_env(tmp_path, tls_yaml: str, name: str = "env.yaml", **replace) -> "Path":
    text = LOCAL.replace("  port: 8000\n", "  port: 8000\n" + textwrap.indent(textwrap.dedent(tls_yaml), "  "))
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / name
    path.write_text(text)
    return path


def one_line(fn) -> str:
    with pytest.raises(UserError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_the_embedded_local_environment_stays_plain_http_on_loopback():
    spec = load_spec(ROOT / "environments" / "local.yaml")
    assert not spec.serving.tls_enabled
    assert tls.endpoint_for(spec) == "http://127.0.0.1:8000"
    assert tls.named_material(spec) is None


def test_a_named_certificate_file_that_is_missing_is_one_line_naming_it(tmp_path):
    env = write_env(tmp_path, f"""\
        tls:
          cert: {tmp_path}/nope/server.pem
          key: {tmp_path}/nope/server.key
        """)
    spec = load_spec(env)
    assert spec.serving.tls_enabled and tls.endpoint_for(spec).startswith("https://")
    message = one_line(lambda: tls.named_material(spec, str(env)))
    assert message == f"{env}: serving.tls.cert: '{tmp_path}/nope/server.pem': no such file (allowed: a readable PEM file)"


def test_herd_serve_refuses_a_spec_whose_certificate_file_is_missing(tmp_path, tiny_model):
    env = write_env(tmp_path, f"""\
        tls: {{cert: {tmp_path}/missing.pem, key: {tmp_path}/missing.key}}
        """)
    done = run_herd("serve", str(env), "--model-dir", str(tiny_model), "--tp", "1", "--state-dir", str(tmp_path))
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "serving.tls.cert" in line and f"{tmp_path}/missing.pem" in line and "no such file" in line


def test_a_key_that_is_not_the_certificates_is_named(tmp_path):
    one, _ = tls.deployment_material(tmp_path / "a", ["a.example"])
    other, _ = tls.deployment_material(tmp_path / "b", ["b.example"])
    env = write_env(tmp_path, f"tls: {{cert: {one.certfile}, key: {other.keyfile}}}\n")
    message = one_line(lambda: tls.named_material(load_spec(env), str(env)))
    assert "serving.tls.key" in message and "is not the key of the certificate" in message


@pytest.mark.parametrize("tls_yaml, expected", [
    ("tls: {cert: /x.pem}\n", "serving.tls.cert needs serving.tls.key too"),
    ("tls: {cert: 'ssm:/herd/cert', key: 'ssm:/herd/key'}\n", "ssm:NAME is the aws target's secret store"),
    ("tls: {sans: ['not a name']}\n", "neither an IP address nor a DNS name"),
    ("tls: {mode: always}\n", "serving.tls.mode"),
    ("tls: {ca: /ca.pem}\n", "serving.tls.ca applies only with serving.tls.cert"),
])
def test_bad_tls_fields_are_one_line(tmp_path, tls_yaml, expected):
    env = write_env(tmp_path, tls_yaml)
    message = one_line(lambda: load_spec(env))
    assert message.startswith(str(env)) and expected in message, message


def test_a_ca_for_a_plain_http_endpoint_is_refused(tmp_path):
    material, _ = tls.deployment_material(tmp_path, ["127.0.0.1"])
    message = one_line(lambda: tls.client_verify(material.ca_file, "http://127.0.0.1:8000"))
    assert "--ca-file" in message and "plain HTTP" in message


def test_a_local_deployment_off_loopback_is_https_with_its_ca_in_its_state(tmp_path, monkeypatch):
    from provisioning.local import endpoint, server_tls
    monkeypatch.setenv("K", "sk-local")
    env = write_env(tmp_path, "", **{"host: 127.0.0.1": "host: 0.0.0.0\n  api_key_env: K",
                                     "state_dir: .herd": f"state_dir: {tmp_path / 'state'}"})
    spec = load_spec(env)
    assert endpoint(spec) == "https://127.0.0.1:8000"        # a wildcard bind is reached on loopback
    material = server_tls(spec, str(env), tmp_path / "state")
    assert material.ca_file == tmp_path / "state" / "tls" / "ca.pem" == tls.client_ca(spec)
    assert {"127.0.0.1", "localhost"} <= sans_of(material.certfile)
    assert mode(material.keyfile) == 0o600


def test_client_commands_without_an_endpoint_or_environment_are_one_line(tmp_path):
    done = run_herd("smoke", "--json")
    assert done.returncode == 2 and done.stderr.strip() == \
        "herd: error: --endpoint: required (or give the environment file)"
    missing = run_herd("generate", "--endpoint", "https://127.0.0.1:9", "--ca-file", str(tmp_path / "no.pem"),
                       "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"))
    assert missing.returncode == 2 and f"--ca-file: '{tmp_path}/no.pem': no such file" in missing.stderr


# ------------------------------------------------------------------ real handshakes
def wait_https(server, ca_file, timeout: float = 120) -> None:
    url = f"https://127.0.0.1:{server.port}/health/ready"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.proc.poll() is None, f"herd serve exited: {server.log_text()}"
        if ca_file.exists():
            try:
                verify = ssl.create_default_context(cafile=str(ca_file))
                if httpx.get(url, timeout=2, verify=verify).status_code == 200:
                    return
            except httpx.TransportError:
                pass
        time.sleep(0.2)
    raise AssertionError(f"not ready over https in {timeout}s: {server.log_text()}")


def printed_fingerprint(server) -> str:
    line = next(l for l in server.log_text().splitlines() if "SHA-256 fingerprint" in l)
    return line.split("SHA-256 fingerprint ", 1)[1].split(")", 1)[0]


@pytest.mark.slow
@pytest.mark.timeout(300)   # a real server (and SmolLM2 for smoke): up to ~160 s under load
def test_the_openai_client_trusts_the_generated_ca_and_refuses_without_it(serve, tiny_model, tmp_path):
    import openai
    server = serve("--model-dir", str(tiny_model), "--tp", "1", "--tls")   # bound to 127.0.0.1
    ca_file = server.state_dir / "tls" / "ca.pem"
    wait_https(server, ca_file)
    assert mode(server.state_dir / "tls" / "ca.key") == 0o600
    assert mode(server.state_dir / "tls" / "server.key") == 0o600
    assert "127.0.0.1" in sans_of(server.state_dir / "tls" / "server.pem")
    assert printed_fingerprint(server) == openssl_fingerprint(ca_file)
    base = f"https://127.0.0.1:{server.port}/v1"

    trusted = httpx.Client(verify=ssl.create_default_context(cafile=str(ca_file)))
    client = openai.OpenAI(base_url=base, api_key="unused", http_client=trusted, max_retries=0)
    model = client.models.list().data[0].id
    answer = client.chat.completions.create(model=model, max_tokens=4, temperature=0,
                                            messages=[{"role": "user", "content": "Hello"}])
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.usage.completion_tokens >= 1

    # Without the CA (the system's trust store) the handshake fails on the certificate, not later.
    untrusting = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
    with pytest.raises(openai.APIConnectionError) as refused:
        untrusting.models.list()
    assert tls.verify_failure(refused.value) is not None
    assert "certificate verify failed" in repr(refused.value.__cause__) or \
        "CERTIFICATE_VERIFY_FAILED" in repr(refused.value.__cause__)
    # And plain HTTP gets no HTTP answer from the TLS port.
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{server.port}/health/ready", timeout=5)

    # herd generate: --ca-file trusts it; without it, refused before anything is sent (exit 2).
    prompts, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    prompts.write_text("".join(json.dumps({"id": str(i), "prompt": "Hello"}) + "\n" for i in range(2)))
    done = run_herd("generate", "--endpoint", f"https://127.0.0.1:{server.port}", "--ca-file", str(ca_file),
                    "--input", str(prompts), "--output", str(out), "--max-tokens", "2", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["succeeded"] == 2
    refused = run_herd("generate", "--endpoint", f"https://127.0.0.1:{server.port}", "--input", str(prompts),
                       "--output", str(tmp_path / "other.jsonl"))
    assert refused.returncode == 2 and "certificate is not trusted" in refused.stderr, refused.stderr

    # herd status ENV: the local deployment's CA is read from its state by default.
    env = write_env(tmp_path, "tls: {mode: 'on'}\n", **{"port: 8000": f"port: {server.port}",
                                                        "state_dir: .herd": f"state_dir: {server.state_dir}"})
    (server.state_dir / "serve.pid").write_text(str(server.proc.pid))
    status = run_herd("status", str(env), "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    info = json.loads(status.stdout)
    assert info["endpoint"] == f"https://127.0.0.1:{server.port}" and info["health"]["status"] == "ready"
    assert info["ca_file"] == str(ca_file)


@pytest.mark.slow
@pytest.mark.timeout(300)   # a real server (and SmolLM2 for smoke): up to ~160 s under load
def test_serving_off_loopback_without_a_certificate_makes_the_deployment_ca(serve, tiny_model):
    server = serve("--model-dir", str(tiny_model), "--tp", "1", "--host", "0.0.0.0", "--api-key-env", "K",
                   env={"K": "sk-tls-test"})
    ca_file = server.state_dir / "tls" / "ca.pem"
    wait_https(server, ca_file)
    assert printed_fingerprint(server) == tls.fingerprint(ca_file)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{server.port}/health/ready", timeout=5)


@pytest.mark.slow
@pytest.mark.timeout(300)   # a real server (and SmolLM2 for smoke): up to ~160 s under load
def test_herd_smoke_passes_over_tls_with_the_ca_file_and_fails_fast_without(serve):
    smollm = model_dir_for("smollm2-135m-instruct")
    if not (smollm / "config.json").is_file():
        pytest.skip(f"SmolLM2 is not on disk at {smollm} (herd up environments/local.yaml puts it there)")
    server = serve("--model-dir", str(smollm), "--tp", "1", "--tls")
    ca_file = server.state_dir / "tls" / "ca.pem"
    wait_https(server, ca_file, timeout=300)
    url = f"https://127.0.0.1:{server.port}"
    done = run_herd("smoke", "--endpoint", url, "--ca-file", str(ca_file), "--json", timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["passed"] and {c["name"] for c in report["checks"]} >= {"ready", "factual", "stream"}
    started = time.monotonic()
    refused = run_herd("smoke", "--endpoint", url, "--json", "--timeout", "120", timeout=300)
    assert refused.returncode == 1
    ready = json.loads(refused.stdout)["checks"][0]
    assert not ready["passed"] and "certificate is not trusted" in ready["detail"]
    assert time.monotonic() - started < 60      # no waiting out the readiness timeout
