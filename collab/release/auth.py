"""Rover authentication on the release server: each request signed with the rover's SuperNode key.

The rover signs ``METHOD\\nPATH?QUERY\\nTIME\\nSHA256(body)`` with the EC private key ``forest-fl certs`` made for
its SuperNode (``rovers/<id>/auth.key``); the server checks it with the rover's public key from the same folder and
refuses a clock more than :data:`MAX_SKEW_S` away. TLS protects the channel; the manifest signature protects the
model itself, whatever the channel.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from collections.abc import Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from forest_perception.collab.deploy.certs import load_auth_public_key, load_deployment_certs

HEADER_ROVER = "X-Forest-Rover"
HEADER_TIME = "X-Forest-Time"
HEADER_SIGNATURE = "X-Forest-Signature"
MAX_SKEW_S = 300.0


class AuthError(PermissionError):
    """A request without a valid rover signature."""


def _signed_bytes(method: str, target: str, stamp: str, body: bytes) -> bytes:
    return f"{method.upper()}\n{target}\n{stamp}\n{hashlib.sha256(body).hexdigest()}".encode()


def sign_request(key: ec.EllipticCurvePrivateKey, rover_id: str, method: str, target: str, body: bytes = b"",
                 now: float | None = None) -> dict[str, str]:
    """The headers that authenticate one request (``target``: path and query string as sent)."""
    stamp = f"{time.time() if now is None else now:.3f}"
    signature = key.sign(_signed_bytes(method, target, stamp, body), ec.ECDSA(hashes.SHA384()))
    return {HEADER_ROVER: rover_id, HEADER_TIME: stamp, HEADER_SIGNATURE: base64.b64encode(signature).decode()}


def verify_request(keys: Mapping[str, ec.EllipticCurvePublicKey], headers: Mapping[str, str], method: str,
                   target: str, body: bytes = b"", now: float | None = None) -> str:
    """The rover id that signed the request; :class:`AuthError` saying why not."""
    lower = {k.lower(): v for k, v in headers.items()}
    rover = lower.get(HEADER_ROVER.lower(), "")
    stamp = lower.get(HEADER_TIME.lower(), "")
    signature = lower.get(HEADER_SIGNATURE.lower(), "")
    if not (rover and stamp and signature):
        raise AuthError(f"unsigned request: the {HEADER_ROVER}, {HEADER_TIME} and {HEADER_SIGNATURE} headers are "
                        "needed")
    if rover not in keys:
        raise AuthError(f"rover {rover!r} has no key on this server (make one with forest-fl certs --rover {rover})")
    try:
        skew = abs((time.time() if now is None else now) - float(stamp))
        raw = base64.b64decode(signature, validate=True)
    except ValueError:
        raise AuthError("malformed signature headers") from None
    if skew > MAX_SKEW_S:
        raise AuthError(f"request time is {skew:.0f} s off the server clock (at most {MAX_SKEW_S:.0f} s)")
    try:
        keys[rover].verify(raw, _signed_bytes(method, target, stamp, body), ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise AuthError(f"bad signature for rover {rover!r}") from None
    return rover


def load_rover_public_keys(certs_dir: str | os.PathLike) -> dict[str, ec.EllipticCurvePublicKey]:
    """Every rover's public key in a ``forest-fl certs`` folder."""
    certs = load_deployment_certs(certs_dir)
    return {rover: load_auth_public_key(keys.auth_pub) for rover, keys in certs.rovers.items()}
