"""Ed25519 verification (device side) and the canonical JSON that signatures cover.

Signing lives in ``edgepack.host.keys``; the device only ever needs public keys.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgepack.agent.errors import SignatureError

__all__ = [
    "ALG",
    "canonical_json",
    "key_id",
    "load_public_key",
    "load_public_keys",
    "verify_detached",
]

ALG = "ed25519"


def canonical_json(obj: Any) -> bytes:
    """The bytes a signature over a JSON object covers: sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex digits of the sha256 of the raw 32-byte public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """Read an Ed25519 public key (PEM, as ``edgepack keys generate`` writes ``fleet.pub``)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SignatureError(f"cannot read public key {path}: {exc.strerror}. "
                             "Pass the fleet.pub written by 'edgepack keys generate'.") from None
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise SignatureError(f"{path} is not a PEM public key. Pass the fleet.pub written by "
                             "'edgepack keys generate' (not the private .key).") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path} is not an Ed25519 key; edgepack signs with Ed25519 only.")
    return key


def load_public_keys(paths: Iterable[str | Path]) -> dict[str, Ed25519PublicKey]:
    """Trusted keys by key id."""
    keys = {}
    for p in paths:
        k = load_public_key(p)
        keys[key_id(k)] = k
    return keys


def verify_detached(data: bytes, sig_doc: Any, keys: Mapping[str, Ed25519PublicKey],
                    what: str = "bundle") -> str:
    """Check ``sig_doc`` (``{"alg", "key_id", "sig"}``) over ``data``; return the key id.

    Raises SignatureError when the document is malformed, the key is not trusted or the
    signature does not verify.
    """
    if not isinstance(sig_doc, Mapping):
        raise SignatureError(f"{what} signature is not a JSON object")
    if sig_doc.get("alg") != ALG:
        raise SignatureError(f"{what} signature algorithm {sig_doc.get('alg')!r} is not supported "
                             f"(edgepack uses {ALG!r})")
    kid = sig_doc.get("key_id")
    if not isinstance(kid, str) or kid not in keys:
        known = ", ".join(sorted(keys)) or "none configured"
        raise SignatureError(
            f"{what} is signed by key {kid!r}, which is not trusted here (trusted: {known}). "
            "Sign with the fleet key or add its public key to the trusted keys.")
    sig = sig_doc.get("sig")
    try:
        raw = base64.b64decode(sig, validate=True) if isinstance(sig, str) else b""
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 64:
        raise SignatureError(f"{what} signature is not a base64 Ed25519 signature")
    try:
        keys[kid].verify(raw, data)
    except InvalidSignature:
        raise SignatureError(f"{what} signature does not verify with key {kid}: the content was "
                             "changed after signing. Do not install it; rebuild or re-publish.") from None
    return kid
