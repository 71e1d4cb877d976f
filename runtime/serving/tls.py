"""TLS for the endpoint: the deployment's own CA and server certificate, checks of named certificates,
and what clients trust.

Without a certificate named in the spec (`serving.tls`), herd makes one CA per deployment and signs the
server's certificate with it, as Elasticsearch 8 does on first start and kubeadm does for a cluster:
clients pin that one CA (`--ca-file`, or the deployment's state by default), not the public trust store.

Files, in the deployment's TLS directory (0700):
  ca.pem      the CA certificate: what clients trust (public; its SHA-256 fingerprint is printed)
  ca.key      the CA's private key, 0600: whoever holds it can impersonate the endpoint
  server.pem  the server certificate (SANs: the bind address, the node's names and addresses, localhost)
  server.key  its private key, 0600

The CA is kept across restarts (clients keep trusting it); the server certificate is issued again when
the names it must carry change or it nears its end. Keys are ECDSA P-256: small, fast to make, and
with an ECDSA certificate only forward-secret (ECDHE-ECDSA) suites can be negotiated at all.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import re
import socket
import ssl
import stat
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import UserError

CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.pem", "ca.key", "server.pem", "server.key"
CA_DAYS = 3650                 # as kubeadm's CA: clients pin it, so it should outlive the deployment
SERVER_DAYS = 397              # the CA/Browser Forum's ceiling for a server certificate
RENEW_BEFORE = dt.timedelta(days=30)
# TLS 1.2 suites the server offers (1.3's are fixed by OpenSSL and all forward-secret): ECDHE with
# AEAD only, as Mozilla's "intermediate" profile. uvicorn would otherwise set OpenSSL's "TLSv1" list.
SERVER_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
LOOPBACK_SANS = ("localhost", "127.0.0.1", "::1")
SECRET_PREFIXES = {"ssm:": "aws", "secretmanager:": "gcp"}
# httpx's `verify=` as herd's clients pass it: True (the system's trust store) or a context pinning a CA.
Verify = ssl.SSLContext | bool
_DNS = re.compile(r"^(?=.{1,253}$)(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                  r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?$")


@dataclass(frozen=True)
class ServerTls:
    """What the server loads, and the CA its clients should trust (None: the system's trust store)."""
    certfile: Path
    keyfile: Path
    ca_file: Path | None = None
    generated: bool = False

    def uvicorn_args(self) -> dict:
        return {"ssl_certfile": str(self.certfile), "ssl_keyfile": str(self.keyfile),
                "ssl_ciphers": SERVER_CIPHERS}


# ------------------------------------------------------------------ names
def is_secret_reference(value: str | None) -> bool:
    """ssm:NAME or secretmanager:NAME: the cloud's secret store holds it, the node's boot fetches it."""
    return bool(value) and value.startswith(tuple(SECRET_PREFIXES))


def check_san(value: str) -> str:
    """An IP address or a DNS name, as a certificate's subjectAltName can carry it; ValueError if not."""
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if not _DNS.match(value):
        raise ValueError(f"{value!r} is neither an IP address nor a DNS name")
    return value


def _wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def machine_names() -> list[str]:
    """This machine's hostname and interface addresses: what a client on the network may dial when the
    server listens on every interface. IPv6 link-local addresses are left out (they need a scope)."""
    import psutil
    names = [socket.gethostname()]
    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                ip = ipaddress.ip_address(a.address.split("%", 1)[0])
                if not ip.is_link_local:
                    names.append(str(ip))
    return names


def server_sans(bind_host: str, known: Sequence[str] = ()) -> list[str]:
    """The names a generated server certificate carries: the bind address (or, on a wildcard bind, this
    machine's names), the names the spec knows for the node, and the loopback names."""
    names = list(known)
    if _wildcard(bind_host):
        names += machine_names()
    else:
        names.append(bind_host)
    names += LOOPBACK_SANS
    out = []
    for name in names:
        name = str(ipaddress.ip_address(name)) if _is_ip(name) else name.lower().rstrip(".")
        if name and name not in out:
            out.append(name)
    return out


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return False


# ------------------------------------------------------------------ files
def fingerprint(cert: str | Path | bytes) -> str:
    """SHA-256 of the certificate's DER encoding, as `openssl x509 -fingerprint -sha256` prints it."""
    pem = cert if isinstance(cert, bytes) else Path(cert).read_bytes()
    der = ssl.PEM_cert_to_DER_cert(pem.decode())
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def _write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write atomically with `mode` from the first byte (umask cannot widen it; no reader ever sees a
    partial or a wider file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def check_key_file(path: Path, field: str) -> None:
    """Refuse a private key others may read, as OpenSSH and PostgreSQL do: it may have leaked already.
    Group read stays allowed (Debian's ssl-cert group: /etc/ssl/private is 0640 root:ssl-cert)."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o007:
        raise UserError(f"{field}: {str(path)!r}: mode {mode:04o} lets other users read the private key "
                        f"(allowed: 0600 or 0640; chmod 600 it, and replace it if others may have read it)")


def check_pair(certfile: str | Path, keyfile: str | Path, cert_field: str, key_field: str) -> None:
    """The certificate and key exist, are PEM, belong together, and the key is not readable by others:
    checked here, as one-line errors, rather than as a traceback from the server's start."""
    for value, field in ((certfile, cert_field), (keyfile, key_field)):
        path = Path(value)
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "no such file"
            raise UserError(f"{field}: {str(value)!r}: {what} (allowed: a readable PEM file)")
        if not os.access(path, os.R_OK):
            raise UserError(f"{field}: {str(value)!r}: not readable by this user (allowed: a readable PEM file)")
    check_key_file(Path(keyfile), key_field)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(str(certfile), str(keyfile))
    except ssl.SSLError as err:
        reason = err.reason or str(err)
        if "KEY_VALUES_MISMATCH" in str(err) or reason == "KEY_VALUES_MISMATCH":
            raise UserError(f"{key_field}: {str(keyfile)!r}: is not the key of the certificate in "
                            f"{str(certfile)!r}") from None
        raise UserError(f"{cert_field}: {str(certfile)!r}: not a PEM certificate and key pair "
                        f"({reason})") from None


@contextmanager
def _locked(directory: Path):
    """One process at a time makes or renews a directory's material (herd up, then herd serve)."""
    import fcntl
    with open(directory / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _names(sans: list[str]):
    from cryptography import x509
    return [x509.IPAddress(ipaddress.ip_address(s)) if _is_ip(s) else x509.DNSName(s) for s in sans]


def _load_ca(directory: Path, name: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if cert_path.exists() != key_path.exists():
        missing = key_path if cert_path.exists() else cert_path
        raise UserError(f"{missing}: missing while {cert_path if missing == key_path else key_path} exists "
                        "(restore it, or remove the directory to make a new CA that clients must trust again)")
    if cert_path.exists():
        check_key_file(key_path, "deployment CA key")
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if cert.not_valid_after_utc <= _now():
            raise UserError(f"{cert_path}: the deployment CA expired on {cert.not_valid_after_utc:%Y-%m-%d} "
                            f"(remove {directory} to make a new one; clients must then trust the new CA)")
        return cert, key, False
    return (*_new_ca(directory, name), True)


def _new_ca(directory: Path, name: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "herd"),
                         x509.NameAttribute(NameOID.COMMON_NAME, f"herd deployment CA {name}"[:64])])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CA_DAYS))
            # It signs server certificates only: no intermediate CA below it.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write_private(directory / CA_KEY, key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    _write_private(directory / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert, key


def _server_current(directory: Path, ca_cert, sans: list[str]) -> bool:
    """The server certificate there is signed by this CA, carries every wanted name, and is not near
    its end (then it is kept: restarts do not churn keys)."""
    from cryptography import x509
    cert_path, key_path = directory / SERVER_CERT, directory / SERVER_KEY
    if not (cert_path.exists() and key_path.exists()):
        return False
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    if cert.issuer != ca_cert.subject or cert.not_valid_after_utc - RENEW_BEFORE <= _now():
        return False
    try:
        cert.verify_directly_issued_by(ca_cert)
        have = set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except (ValueError, TypeError, x509.ExtensionNotFound):
        return False
    return set(_names(sans)) <= have


def _new_server(directory: Path, ca_cert, ca_key, sans: list[str]) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "herd"),
                                     x509.NameAttribute(NameOID.COMMON_NAME, sans[0][:64])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(min(now + dt.timedelta(days=SERVER_DAYS), ca_cert.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName(_names(sans)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            # ECDSA signs the handshake; there is no key to encipher (that is RSA key transport).
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(ca_key, hashes.SHA256()))
    # The key first: a certificate is never there without its key.
    _write_private(directory / SERVER_KEY, key.private_bytes(serialization.Encoding.PEM,
                                                             serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
    _write_private(directory / SERVER_CERT, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def ensure_ca(directory: str | Path, name: str = "") -> tuple[Path, bool]:
    """The deployment CA under `directory`, made if absent: (its certificate's path, whether it is new)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    with _locked(directory):
        _, _, new = _load_ca(directory, name or directory.parent.name)
    return directory / CA_CERT, new


def deployment_material(directory: str | Path, sans: list[str], name: str = "") -> tuple[ServerTls, bool]:
    """The deployment CA (made once) and a server certificate for `sans` (issued again when those names
    change or it nears its end), under `directory`. Returns the material and whether the CA is new."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)   # the directory may predate us with a wider mode: it holds keys
    with _locked(directory):
        ca_cert, ca_key, new_ca = _load_ca(directory, name or directory.parent.name)
        if new_ca or not _server_current(directory, ca_cert, sans):
            _new_server(directory, ca_cert, ca_key, sans)
    check_key_file(directory / SERVER_KEY, "deployment server key")
    return ServerTls(directory / SERVER_CERT, directory / SERVER_KEY, directory / CA_CERT, generated=True), new_ca


def announce(tls: ServerTls) -> str:
    """One line for people: where the CA is and its fingerprint, to check out of band and pin."""
    if tls.ca_file is None:
        return f"TLS: certificate {tls.certfile} (SHA-256 {fingerprint(tls.certfile)}), trusted through the system store"
    return (f"TLS: deployment CA {tls.ca_file} (SHA-256 fingerprint {fingerprint(tls.ca_file)}); "
            f"clients: --ca-file {tls.ca_file}")


# ------------------------------------------------------------------ where a deployment keeps it
def state_home() -> Path:
    """Where herd keeps per-deployment state on the operator's machine (XDG's state directory)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "herd" / "deployments"


def deployment_tls_dir(spec) -> Path:
    """The deployment's TLS directory: under the local target's state_dir (next to its pid and log),
    else under the operator's state home, by deployment name (the clouds' and racks' CA lives with the
    person who deploys, never on a node)."""
    if spec.target == "local":
        return Path(spec.target_section.state_dir).resolve() / "tls"
    return state_home() / spec.name / "tls"


def spec_sans(spec) -> list[str]:
    """Names the spec knows for the serving node: on-prem host addresses, serving.tls.sans."""
    names = list(spec.serving.tls.sans)
    if spec.target == "onprem":
        names += [h.address for h in spec.onprem_section.hosts]
        if spec.onprem_section.load_balancer is not None:   # HAProxy presents the same certificate
            names.append(spec.onprem_section.load_balancer.address)
    return names


def named_material(spec, where: str = "") -> ServerTls | None:
    """The certificate and key files the spec names, checked now (one line naming the field and value);
    None when it names none. Cloud secret names are the node's to read: refused on this machine."""
    tls, prefix = spec.serving.tls, f"{where}: " if where else ""
    if not tls.cert:
        return None
    for field in ("cert", "key"):
        if is_secret_reference(getattr(tls, field)):
            raise UserError(f"{prefix}serving.tls.{field}: {getattr(tls, field)!r}: the node's boot script reads "
                            "it from the cloud's secret store; here, give the files with --tls-certfile and "
                            "--tls-keyfile")
    cert, key = Path(tls.cert).expanduser(), Path(tls.key).expanduser()
    check_pair(cert, key, f"{prefix}serving.tls.cert", f"{prefix}serving.tls.key")
    ca = Path(tls.ca).expanduser() if tls.ca else None
    if ca is not None and not ca.is_file():
        raise UserError(f"{prefix}serving.tls.ca: {tls.ca!r}: no such file (allowed: a readable PEM file)")
    return ServerTls(cert, key, ca)


def client_ca(spec) -> Path | None:
    """The CA herd's clients trust for a deployment by default: the spec's serving.tls.ca when it names
    a certificate, else the deployment CA in its state (None: the system's trust store)."""
    tls = spec.serving.tls
    if tls.cert:
        return Path(tls.ca).expanduser() if tls.ca else None
    ca = deployment_tls_dir(spec) / CA_CERT
    return ca if ca.is_file() else None


def endpoint_for(spec) -> str | None:
    """The URL clients use for a deployment the spec alone locates (local, on-prem: its load balancer
    when it has one); None for the clouds, whose address only their stack knows. https:// whenever the
    deployment serves TLS."""
    scheme = "https" if spec.serving.tls_enabled else "http"
    if spec.target == "local":
        host = spec.serving.host
        host = "127.0.0.1" if host == "localhost" or _wildcard(host) else host
    elif spec.target == "onprem" and spec.onprem_section.load_balancer is not None:
        # Replicas: clients (smoke, generate, status) go through the balancer, which terminates TLS.
        lb = spec.onprem_section.load_balancer
        host = f"[{lb.address}]" if ":" in lb.address else lb.address
        return f"https://{host}:{lb.listen_port}"
    elif spec.target == "onprem":
        host = spec.onprem_section.hosts[0].address
    else:
        return None
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}:{spec.serving.port}"


# ------------------------------------------------------------------ clients
def client_verify(ca_file: str | Path | None, endpoint: str | None = None, field: str = "--ca-file") -> Verify:
    """httpx's `verify=`: a context trusting only `ca_file` (pinned: the system store is not consulted),
    else True (the system store). A CA for a plain-HTTP endpoint is refused: it would silently go unused."""
    if ca_file is None:
        return True
    path = Path(ca_file).expanduser()
    if endpoint is not None and not endpoint.lower().startswith("https://"):
        raise UserError(f"{field}: {str(ca_file)!r} given, but the endpoint {endpoint} is plain HTTP "
                        "(allowed: an https:// endpoint)")
    if not path.is_file():
        raise UserError(f"{field}: {str(ca_file)!r}: no such file (allowed: the deployment CA's PEM file, "
                        "printed by herd serve / herd up)")
    try:
        return ssl.create_default_context(cafile=str(path))
    except ssl.SSLError as err:
        raise UserError(f"{field}: {str(ca_file)!r}: not a PEM certificate ({err.reason or err})") from None


def verify_failure(err: BaseException) -> str | None:
    """The certificate check that failed under a transport error, if that is what it was: such a failure
    is permanent, so callers report it at once instead of retrying until their timeout."""
    seen = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ssl.SSLCertVerificationError):
            return cause.verify_message or str(cause)
        text = str(cause)
        if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
            return text
        cause = cause.__cause__ or cause.__context__
    return None
