"""Ed25519 signing keys: generate a fleet key pair, load it, sign bytes.

The private key never leaves the build machine; devices get ``fleet.pub`` only.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgepack.agent.errors import SignatureError
from edgepack.agent.signing import ALG, key_id

__all__ = ["generate_keys", "load_private_key", "sign_bytes", "signer"]


def generate_keys(out_dir: str | os.PathLike, name: str = "fleet", *,
                  overwrite: bool = False) -> tuple[Path, Path, str]:
    """Write ``NAME.key`` (PKCS#8 PEM, mode 0600) and ``NAME.pub``; return paths and key id."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out / f"{name}.key", out / f"{name}.pub"
    if not overwrite and (priv_path.exists() or pub_path.exists()):
        raise SignatureError(f"{priv_path} already exists; refusing to overwrite a signing key "
                             "(pass `overwrite=` to replace it — devices will reject the old "
                             "key's successors until they trust the new fleet.pub)",
                             field="overwrite")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv_path, pub_path, key_id(key.public_key())


def load_private_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    """Read the PEM private key written by :func:`generate_keys`."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SignatureError(f"cannot read signing key {path}: {exc.strerror}. Create one with "
                             "'edgepack keys generate --out keys/'.") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise SignatureError(f"{path} is not an unencrypted PEM private key (did you pass the "
                             ".pub file?)") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an Ed25519 key; edgepack signs with Ed25519 only")
    return key


def sign_bytes(data: bytes, key: Ed25519PrivateKey) -> dict:
    """The detached signature document stored as ``signature.json`` / ``table_sig``."""
    return {"alg": ALG, "key_id": key_id(key.public_key()),
            "sig": base64.b64encode(key.sign(data)).decode()}


def signer(key_path: str | os.PathLike | None) -> tuple[Any, str | None]:
    """``(sign, key_id)`` for ``write_bundle`` / ``table_sig``: ``sign(bytes) -> signature
    document`` with the key at ``key_path``; ``(None, None)`` when there is no key."""
    if key_path is None:
        return None, None
    key = load_private_key(key_path)

    def sign(data: bytes) -> dict:
        return sign_bytes(data, key)

    return sign, key_id(key.public_key())
