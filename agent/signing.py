"""Ed25519 verification (device side) and the canonical JSON that signatures cover.

Signing lives in ``edgepack.host.keys``; the device only ever needs public keys.

The agent does not keep ``cryptography`` in memory: it costs ~7 MB of resident memory for two
checks per deployment. Public keys are parsed here (an Ed25519 SubjectPublicKeyInfo is a fixed
12-byte DER prefix and the 32-byte key), and a signature is checked by ``cryptography`` in a
short-lived child process (``python -m edgepack.agent.signing``, ~40 ms) — unless this process
already has ``cryptography`` loaded (the host, tests), which then checks in-process.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.agent.errors import SignatureError

__all__ = [
    "ALG",
    "PublicKey",
    "canonical_json",
    "key_id",
    "load_public_key",
    "load_public_keys",
    "verify_detached",
]

ALG = "ed25519"
_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")  # SEQ{SEQ{OID 1.3.101.112}, BITSTRING}
_CHILD_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class PublicKey:
    """A raw 32-byte Ed25519 public key."""

    raw: bytes

    @classmethod
    def from_pem(cls, data: bytes) -> PublicKey:
        text = data.decode("ascii", "replace")
        begin, end = "-----BEGIN PUBLIC KEY-----", "-----END PUBLIC KEY-----"
        if begin not in text or end not in text:
            raise ValueError("no PEM public key block")
        body = text.split(begin, 1)[1].split(end, 1)[0]
        der = base64.b64decode("".join(body.split()), validate=True)
        if len(der) != len(_SPKI_PREFIX) + 32 or not der.startswith(_SPKI_PREFIX):
            raise TypeError("not an Ed25519 SubjectPublicKeyInfo")
        return cls(der[len(_SPKI_PREFIX):])


def canonical_json(obj: Any) -> bytes:
    """The bytes a signature over a JSON object covers: sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _raw(public_key: Any) -> bytes:
    if isinstance(public_key, PublicKey):
        return public_key.raw
    from cryptography.hazmat.primitives import serialization  # a cryptography key (host side)

    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: Any) -> str:
    """First 16 hex digits of the sha256 of the raw 32-byte public key."""
    return hashlib.sha256(_raw(public_key)).hexdigest()[:16]


def load_public_key(path: str | Path) -> PublicKey:
    """Read an Ed25519 public key (PEM, as ``edgepack keys generate`` writes ``fleet.pub``)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SignatureError(f"cannot read public key {path}: {exc.strerror}. "
                             "Pass the fleet.pub written by 'edgepack keys generate'.") from None
    try:
        return PublicKey.from_pem(data)
    except (ValueError, binascii.Error):
        raise SignatureError(f"{path} is not a PEM public key. Pass the fleet.pub written by "
                             "'edgepack keys generate' (not the private .key).") from None
    except TypeError:
        raise SignatureError(f"{path} is not an Ed25519 key; edgepack signs with Ed25519 "
                             "only.") from None


def load_public_keys(paths: Iterable[str | Path]) -> dict[str, PublicKey]:
    """Trusted keys by key id."""
    keys = {}
    for p in paths:
        k = load_public_key(p)
        keys[key_id(k)] = k
    return keys


def _check(raw_key: bytes, sig: bytes, data: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(raw_key).verify(sig, data)
    except InvalidSignature:
        return False
    return True


def _check_in_child(raw_key: bytes, sig: bytes, data: bytes) -> bool:
    job = json.dumps({"key": raw_key.hex(), "sig": sig.hex(),
                      "data": base64.b64encode(data).decode()}).encode()
    try:
        r = subprocess.run([sys.executable, "-I", "-m", "edgepack.agent.signing"], input=job,
                           capture_output=True, timeout=_CHILD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SignatureError(f"could not run the signature check ({exc})") from None
    if r.returncode not in (0, 1):
        raise SignatureError("the signature check failed to run: "
                             f"{r.stderr.decode(errors='replace').strip()[-300:]}")
    return r.returncode == 0


def verify_detached(data: bytes, sig_doc: Any, keys: Mapping[str, Any],
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
    check = _check if "cryptography" in sys.modules else _check_in_child
    if not check(_raw(keys[kid]), raw, data):
        raise SignatureError(f"{what} signature does not verify with key {kid}: the content was "
                             "changed after signing. Do not install it; rebuild or re-publish.")
    return kid


def _main() -> int:
    """Child process: JSON ``{key, sig, data}`` on stdin; exit 0 valid, 1 invalid, 2 error."""
    try:
        job = json.loads(sys.stdin.buffer.read())
        ok = _check(bytes.fromhex(job["key"]), bytes.fromhex(job["sig"]),
                    base64.b64decode(job["data"]))
    except Exception as exc:  # noqa: BLE001 - reported to the parent through the exit code
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(_main())
