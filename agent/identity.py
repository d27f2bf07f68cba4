"""The device's own identity key: made once at ``agent init``, signs everything it reports.

State, events, telemetry and profile results stay the JSON objects of docs/protocol.md, with
one more member, ``sig`` = ``{"keyid": K, "sig": S}``: an Ed25519 signature (S, 128 hex digits)
by the device key (K, its TUF key id) over the report's canonical JSON **without** ``sig``.
Readers of protocol v1 ignore the extra member, so the collector and dashboard keep working
while they learn to check it (``edgepack.host.fleet.identity``).

Canonical JSON here is the one of v1's chunk table (keys sorted, no whitespace, UTF-8, strings
with ``"``, ``\\`` and control characters escaped as JSON requires, non-ASCII as is), extended
to the numbers reports carry: integers in decimal; floats as the shortest decimal that reads
back to the same double, positional (``0.25``, ``12.0``) when the decimal exponent is in
``[-4, 16)``, else ``d.ddde±XX`` (``1e-05``, ``1.5e+16``); NaN and infinities are refused.
(TUF's OLPC canonical JSON has no floats at all, and telemetry is made of floats.)

The private key is ``identity.key`` (PKCS#8 PEM, mode 0600) next to the agent's state.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.agent.trust.errors import KeyFileError
from edgepack.agent.trust.privatefile import read_signer, write_private

__all__ = ["IDENTITY_FILE", "SIG_FIELD", "DeviceIdentity", "report_payload", "plain_report"]

IDENTITY_FILE = "identity.key"
SIG_FIELD = "sig"


def report_payload(report: Mapping[str, Any]) -> bytes:
    """The bytes a device signature covers: canonical JSON of ``report`` without ``sig``."""
    body = {k: v for k, v in report.items() if k != SIG_FIELD}
    try:
        return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode()
    except ValueError as exc:
        raise ValueError(f"a signed report cannot carry NaN or infinity ({exc})") from None


def plain_report(report: Mapping[str, Any]) -> dict[str, Any]:
    """``report`` as the JSON it will be read back as: values JSON cannot carry become strings
    (paths) or ``null`` (NaN and infinities), so the signature covers exactly what is sent."""

    def finite(v: Any) -> Any:
        if isinstance(v, float):
            return v if v - v == 0.0 else None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, list):
            return [finite(x) for x in v]
        return v

    return finite(json.loads(json.dumps(dict(report), default=str)))


@dataclass(frozen=True)
class DeviceIdentity:
    """A device's Ed25519 key (a securesystemslib CryptoSigner) and where it lives."""

    path: Path
    signer: Any

    @property
    def key_id(self) -> str:
        """The TUF key id (sha256 of the canonical JSON of the public key object)."""
        return self.signer.public_key.keyid

    def enrollment(self, device_id: str | None = None) -> dict[str, Any]:
        """What the fleet server enrolls: ``{"device_id": …, "keyid": …, "key": <TUF public
        key object>}`` (``device_id`` only when given)."""
        out = {"device_id": device_id} if device_id is not None else {}
        return {**out, "keyid": self.key_id, "key": self.signer.public_key.to_dict()}

    @classmethod
    def create(cls, data_dir: str | os.PathLike, *, overwrite: bool = False) -> DeviceIdentity:
        """Make the device key (``agent init``); refuses to replace one unless ``overwrite``."""
        from securesystemslib.signer import CryptoSigner

        path = Path(data_dir) / IDENTITY_FILE
        if path.exists() and not overwrite:
            raise KeyFileError(f"{path} already exists: this device has an identity. Replacing "
                               "it means enrolling the device again (`overwrite=True`)",
                               path=path, field="overwrite")
        signer = CryptoSigner.generate_ed25519()
        write_private(path, signer.private_bytes)
        return cls(path, signer)

    @classmethod
    def ephemeral(cls) -> DeviceIdentity:
        """A key that lives in memory only (simulated devices)."""
        from securesystemslib.signer import CryptoSigner

        return cls(Path("<memory>"), CryptoSigner.generate_ed25519())

    @classmethod
    def load(cls, data_dir: str | os.PathLike) -> DeviceIdentity:
        """Read the device key (must be 0600)."""
        path = Path(data_dir) / IDENTITY_FILE
        return cls(path, read_signer(path, "device identity key"))

    @classmethod
    def load_or_create(cls, data_dir: str | os.PathLike) -> DeviceIdentity:
        """The device key, made on first use."""
        if (Path(data_dir) / IDENTITY_FILE).exists():
            return cls.load(data_dir)
        return cls.create(data_dir)

    def sign(self, report: Mapping[str, Any]) -> dict[str, Any]:
        """``report`` with its ``sig`` member (an existing ``sig`` is replaced)."""
        sig = self.signer.sign(report_payload(report))
        return {**{k: v for k, v in report.items() if k != SIG_FIELD},
                SIG_FIELD: {"keyid": sig.keyid, "sig": sig.signature}}

    def encode(self, report: Mapping[str, Any]) -> bytes:
        """The report as the bytes a device publishes: made plain (:func:`plain_report`),
        signed, compact JSON with keys sorted."""
        return json.dumps(self.sign(plain_report(report)), separators=(",", ":"),
                          sort_keys=True, allow_nan=False).encode()
