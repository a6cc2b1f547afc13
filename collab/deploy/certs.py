"""Certificates and keys of a Flower deployment: a CA, the SuperLink's TLS certificate, one key set per rover.

Made with the ``cryptography`` package (no ``openssl`` or ``ssh-keygen``), in the roles Flower's own
examples give them. Files, roles and what uses each: ``docs/federated.md`` ("Certificates and keys").
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS: tuple[str, ...] = ("127.0.0.1", "localhost")
"""Subject alternative names of the TLS certificates: the loopback deployment."""
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
ROVER_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_TLS_CURVE = ec.SECP256R1  # the most widely supported TLS curve
_AUTH_CURVE = ec.SECP384R1  # Flower's examples: `ssh-keygen -t ecdsa -b 384`
_CLOCK_SKEW = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class RoverKeys:
    """One rover's files: SuperNode authentication key pair and Runtime API TLS certificate."""

    rover_id: str
    auth_key: Path
    auth_pub: Path
    runtime_cert: Path
    runtime_key: Path

    @property
    def fingerprint(self) -> str:
        """SHA256 fingerprint of the public key (``ssh-keygen -l`` style)."""
        return public_key_fingerprint(self.auth_pub)


@dataclass(frozen=True)
class DeploymentCerts:
    """Every file of a deployment's certificate folder."""

    root: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    hosts: tuple[str, ...] = DEFAULT_HOSTS
    rovers: dict[str, RoverKeys] = field(default_factory=dict)

    def rover(self, rover_id: str) -> RoverKeys:
        """The key set of ``rover_id``."""
        try:
            return self.rovers[rover_id]
        except KeyError:
            raise ValueError(f"{self.root}: no keys for rover {rover_id!r} (have {sorted(self.rovers)}); "
                             f"make them with `forest-fl certs --out {self.root} --rover {rover_id}`") from None


# ---------------------------------------------------------------------------------------------- primitives


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def write_private(path: Path, data: bytes) -> Path:
    """Write a secret (a private key) readable by its owner only (0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return path


def write_public(path: Path, data: bytes) -> Path:
    """Write a public file (a certificate, a public key)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _san_entry(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_certificate(path: str | Path) -> x509.Certificate:
    """A PEM certificate; the error names the file."""
    path = Path(path)
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise FileNotFoundError(f"certificate {path} does not exist") from None
    except ValueError as exc:
        raise ValueError(f"{path} is not a PEM certificate: {exc}") from None


def load_private_key(path: str | Path) -> ec.EllipticCurvePrivateKey:
    """A PEM (PKCS8) or OpenSSH EC private key without passphrase; the error names the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"private key {path} does not exist") from None
    try:
        if data.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----"):
            key = serialization.load_ssh_private_key(data, None)
        else:
            key = serialization.load_pem_private_key(data, None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"{path} is not an unencrypted private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path} holds a {type(key).__name__}, expected an EC private key")
    return key


def load_auth_public_key(path: str | Path) -> ec.EllipticCurvePublicKey:
    """A SuperNode public key (OpenSSH ``ecdsa-sha2-nistp*`` line), as ``flwr supernode register`` reads it."""
    path = Path(path)
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except FileNotFoundError:
        raise FileNotFoundError(f"public key {path} does not exist") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"{path} is not an OpenSSH public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(f"{path} holds a {type(key).__name__}, Flower needs an EC (NIST curve) key")
    return key


def public_key_fingerprint(path: str | Path) -> str:
    """``SHA256:<base64>`` of an OpenSSH public key's blob, as ``ssh-keygen -l`` prints it."""
    key = load_auth_public_key(path)
    blob = base64.b64decode(key.public_bytes(serialization.Encoding.OpenSSH,
                                             serialization.PublicFormat.OpenSSH).split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def make_ca(cert_path: str | Path, key_path: str | Path, common_name: str = "forest-fl deployment CA",
            days: int = 3650) -> tuple[Path, Path]:
    """A self-signed CA certificate (may sign end-entity certificates only) and its key."""
    key = ec.generate_private_key(_TLS_CURVE())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "forest_perception"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private(Path(key_path), _pem_key(key))
    return write_public(Path(cert_path), cert.public_bytes(serialization.Encoding.PEM)), Path(key_path)


def make_tls_cert(
    ca_cert_path: str | Path,
    ca_key_path: str | Path,
    cert_path: str | Path,
    key_path: str | Path,
    common_name: str,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    days: int = 365,
) -> tuple[Path, Path]:
    """A TLS server certificate for ``hosts`` (IP addresses or DNS names) signed by the CA, and its key."""
    if not hosts:
        raise ValueError(f"TLS certificate {cert_path}: at least one host name or address is needed")
    ca_cert, ca_key = load_certificate(ca_cert_path), load_private_key(ca_key_path)
    key = ec.generate_private_key(_TLS_CURVE())
    now = _now()
    if ca_cert.not_valid_after_utc < now + datetime.timedelta(days=days):
        days = max(1, (ca_cert.not_valid_after_utc - now).days)  # never outlive the CA
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "forest_perception"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([_san_entry(h) for h in hosts]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    write_private(Path(key_path), _pem_key(key))
    return write_public(Path(cert_path), cert.public_bytes(serialization.Encoding.PEM)), Path(key_path)


def make_auth_keys(private_path: str | Path, public_path: str | Path, comment: str = "") -> tuple[Path, Path]:
    """A SuperNode authentication key pair: EC P-384, OpenSSH private key and ``ecdsa-sha2-nistp384`` public line."""
    key = ec.generate_private_key(_AUTH_CURVE())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    write_private(Path(private_path), private)
    line = public + (b" " + comment.encode() if comment else b"") + b"\n"
    return Path(private_path), write_public(Path(public_path), line)


# ---------------------------------------------------------------------------------------------- a deployment


def _check_rover_id(rover_id: str) -> str:
    if not ROVER_ID_PATTERN.match(rover_id):
        raise ValueError(f"rover id {rover_id!r} must be 1-64 letters, digits, '_', '.' or '-' "
                         "(it names the rover's key folder)")
    return rover_id


def _rover_keys(root: Path, rover_id: str) -> RoverKeys:
    folder = root / "rovers" / rover_id
    return RoverKeys(rover_id, folder / "auth.key", folder / "auth.pub", folder / "runtime.crt",
                     folder / "runtime.key")


def make_rover_keys(certs: DeploymentCerts, rover_id: str, hosts: Sequence[str] | None = None) -> RoverKeys:
    """A rover's authentication key pair and Runtime API certificate in ``certs.root/rovers/<rover_id>``."""
    keys = _rover_keys(certs.root, _check_rover_id(rover_id))
    make_auth_keys(keys.auth_key, keys.auth_pub, comment=rover_id)
    make_tls_cert(certs.ca_cert, certs.ca_key, keys.runtime_cert, keys.runtime_key,
                  f"{rover_id} supernode runtime", hosts or certs.hosts)
    return keys


def _save_manifest(certs: DeploymentCerts) -> Path:
    manifest = {
        "version": MANIFEST_VERSION,
        "hosts": list(certs.hosts),
        "ca_subject": load_certificate(certs.ca_cert).subject.rfc4514_string(),
        "server_not_after": load_certificate(certs.server_cert).not_valid_after_utc.isoformat(),
        "rovers": {rid: {"fingerprint": keys.fingerprint} for rid, keys in sorted(certs.rovers.items())},
    }
    path = certs.root / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def make_deployment_certs(
    out_dir: str | Path,
    rover_ids: Iterable[str],
    hosts: Sequence[str] = DEFAULT_HOSTS,
    days: int = 365,
    overwrite: bool = False,
) -> DeploymentCerts:
    """Make (or extend) a deployment's certificate folder.

    A folder that already holds a CA and SuperLink certificate keeps them (and every rover key
    it has) unless ``overwrite``; rovers not there yet get new keys, so adding a rover does not
    invalidate the others' registrations. A SuperLink certificate whose names differ from
    ``hosts`` is remade.
    """
    root = Path(out_dir)
    rover_ids = [_check_rover_id(r) for r in rover_ids]
    if len(set(rover_ids)) != len(rover_ids):
        raise ValueError(f"rover ids are repeated: {rover_ids}")
    hosts = tuple(hosts)
    root.mkdir(parents=True, exist_ok=True)
    certs = DeploymentCerts(root, root / "ca.crt", root / "ca.key", root / "superlink.crt", root / "superlink.key",
                            hosts)
    if overwrite or not (certs.ca_cert.is_file() and certs.ca_key.is_file()):
        make_ca(certs.ca_cert, certs.ca_key)
        overwrite = True  # a new CA invalidates everything it signed
    if overwrite or not certs.server_cert.is_file() or certificate_hosts(certs.server_cert) != set(hosts):
        make_tls_cert(certs.ca_cert, certs.ca_key, certs.server_cert, certs.server_key, "forest-fl superlink",
                      hosts, days)
    existing = {} if overwrite else _existing_rovers(root)
    rovers = dict(existing)
    for rover_id in rover_ids:
        if rover_id not in rovers:
            rovers[rover_id] = make_rover_keys(certs, rover_id)
    certs = DeploymentCerts(certs.root, certs.ca_cert, certs.ca_key, certs.server_cert, certs.server_key, hosts,
                            rovers)
    _save_manifest(certs)
    return certs


def _existing_rovers(root: Path) -> dict[str, RoverKeys]:
    folder = root / "rovers"
    if not folder.is_dir():
        return {}
    out = {}
    for sub in sorted(folder.iterdir()):
        keys = _rover_keys(root, sub.name)
        if all(p.is_file() for p in (keys.auth_key, keys.auth_pub, keys.runtime_cert, keys.runtime_key)):
            out[sub.name] = keys
    return out


def load_deployment_certs(out_dir: str | Path) -> DeploymentCerts:
    """The certificate folder written by :func:`make_deployment_certs` (every file checked to exist)."""
    root = Path(out_dir)
    manifest_path = root / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        hosts = tuple(str(h) for h in manifest["hosts"])
        rover_ids = [str(r) for r in manifest["rovers"]]
    except FileNotFoundError:
        raise FileNotFoundError(f"{manifest_path} does not exist; make the certificates with "
                                f"`forest-fl certs --out {root} --rovers N`") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{manifest_path} is malformed: {exc}") from None
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{manifest_path}: version {manifest.get('version')!r}, expected {MANIFEST_VERSION}")
    certs = DeploymentCerts(root, root / "ca.crt", root / "ca.key", root / "superlink.crt", root / "superlink.key",
                            hosts, {r: _rover_keys(root, _check_rover_id(r)) for r in rover_ids})
    required = [certs.ca_cert, certs.server_cert, certs.server_key]
    for keys in certs.rovers.values():
        required += [keys.auth_key, keys.auth_pub, keys.runtime_cert, keys.runtime_key]
    missing = [str(p) for p in required if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"certificate folder {root} lacks {', '.join(missing)}")
    return certs


# ---------------------------------------------------------------------------------------------- checks


def certificate_hosts(path: str | Path) -> set[str]:
    """The subject alternative names (IP addresses and DNS names) of a certificate."""
    cert = load_certificate(path)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} | set(san.get_values_for_type(x509.DNSName))


def check_signed_by(cert_path: str | Path, ca_path: str | Path) -> None:
    """Raise ``ValueError`` unless the certificate was issued and signed by the CA and is valid now."""
    cert, ca = load_certificate(cert_path), load_certificate(ca_path)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise ValueError(f"{cert_path} is not signed by the CA {ca_path}: {exc or type(exc).__name__}") from None
    now = _now()
    for path, c in ((cert_path, cert), (ca_path, ca)):
        if not c.not_valid_before_utc <= now <= c.not_valid_after_utc:
            raise ValueError(f"{path} is valid from {c.not_valid_before_utc} to {c.not_valid_after_utc}, not now")


def check_key_matches(cert_path: str | Path, key_path: str | Path) -> None:
    """Raise ``ValueError`` unless the private key belongs to the certificate."""
    cert_key = load_certificate(cert_path).public_key()
    key = load_private_key(key_path)
    if cert_key.public_numbers() != key.public_key().public_numbers():
        raise ValueError(f"private key {key_path} does not belong to certificate {cert_path}")


def check_auth_pair(private_path: str | Path, public_path: str | Path) -> None:
    """Raise ``ValueError`` unless the OpenSSH key pair matches and uses a NIST curve (as Flower requires)."""
    private, public = load_private_key(private_path), load_auth_public_key(public_path)
    if private.public_key().public_numbers() != public.public_numbers():
        raise ValueError(f"SuperNode key {private_path} does not match public key {public_path}")
    if not isinstance(public.curve, ec.SECP256R1 | ec.SECP384R1 | ec.SECP521R1):
        raise ValueError(f"{public_path}: curve {public.curve.name} is not a NIST curve Flower accepts")


def check_deployment_certs(certs: DeploymentCerts, hosts: Sequence[str] | None = None) -> None:
    """Raise ``ValueError`` naming the first problem: signatures, validity, key pairs, addresses."""
    check_signed_by(certs.server_cert, certs.ca_cert)
    check_key_matches(certs.server_cert, certs.server_key)
    wanted = set(hosts or certs.hosts)
    names = certificate_hosts(certs.server_cert)
    if not wanted <= names:
        raise ValueError(f"{certs.server_cert} is for {sorted(names)}, not {sorted(wanted - names)}; remake it "
                         f"with `forest-fl certs --out {certs.root} --host ...`")
    for keys in certs.rovers.values():
        check_auth_pair(keys.auth_key, keys.auth_pub)
        check_signed_by(keys.runtime_cert, certs.ca_cert)
        check_key_matches(keys.runtime_cert, keys.runtime_key)
