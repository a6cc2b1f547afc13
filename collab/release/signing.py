"""Release manifests signed with an ed25519 key: key files, canonical bytes, signatures and their check."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from forest_perception.collab.deploy.certs import write_private, write_public


class SignatureError(ValueError):
    """A manifest without a signature, or one the trusted key did not make."""


def canonical_bytes(manifest: dict[str, Any]) -> bytes:
    """The bytes a signature covers: sorted keys, no spaces, ASCII (the same on every machine)."""
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def make_signing_key(private_path: str | os.PathLike, public_path: str | os.PathLike) -> tuple[Path, Path]:
    """A new ed25519 key pair: PKCS#8 PEM private key (mode 0600) and SubjectPublicKeyInfo PEM public key."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return write_private(Path(private_path), private), write_public(Path(public_path), public)


def load_signing_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    """The ed25519 private key in ``path``; ``ValueError`` naming the file and what is wrong."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise ValueError(f"release signing key {path} does not exist (made by `forest-fl release create` on first "
                         "use)") from None
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"release signing key {path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"release signing key {path} is a {type(key).__name__}, not an ed25519 key")
    return key


def load_verify_key(path: str | os.PathLike) -> Ed25519PublicKey:
    """The ed25519 public key in ``path`` (PEM); ``ValueError`` naming the file and what is wrong."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except FileNotFoundError:
        raise ValueError(f"release public key {path} does not exist (copy release_signing.pub from the registry "
                         "folder to the rover)") from None
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"release public key {path} is not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"release public key {path} is a {type(key).__name__}, not an ed25519 key")
    return key


def key_id(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """A short name of a key pair: the first 16 hex digits of the SHA-256 of the raw public key."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign_manifest(manifest: dict[str, Any], key: Ed25519PrivateKey) -> str:
    """The base64 ed25519 signature of :func:`canonical_bytes` of ``manifest``."""
    return base64.b64encode(key.sign(canonical_bytes(manifest))).decode()


def verify_manifest(manifest: dict[str, Any], signature: str | None, key: Ed25519PublicKey) -> None:
    """Raise :class:`SignatureError` unless ``signature`` is ``key``'s signature of ``manifest``."""
    if not signature:
        raise SignatureError(f"release {manifest.get('release', '?')} is unsigned")
    try:
        raw = base64.b64decode(signature, validate=True)
    except (ValueError, TypeError):
        raise SignatureError(f"release {manifest.get('release', '?')}: the signature is not base64") from None
    try:
        key.verify(raw, canonical_bytes(manifest))
    except InvalidSignature:
        signer = manifest.get("key_id", "?")
        raise SignatureError(f"release {manifest.get('release', '?')}: bad signature (the manifest was changed after "
                             f"signing, or signed by key {signer}, not the trusted key {key_id(key)})") from None
