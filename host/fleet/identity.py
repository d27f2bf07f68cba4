"""Believe a device report only when its enrolled device key signed it.

The inventory is a plain mapping ``device_id → public key`` (a securesystemslib key, or the
``{"keyid", "key"}`` object a device prints at ``agent init``). A report is authentic when its
``device_id`` is enrolled, the topic it came on names the same device, its ``sig`` is by that
device's key, and the signature verifies over the report's canonical JSON
(``edgepack.agent.identity.report_payload``). Rollouts count authentic reports only.

:func:`enroll` and :func:`revoke` keep the fleet server's inventory (``store.inventory``):
the operator, not the device, says which groups an enrolled device is in.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.agent.identity import SIG_FIELD, report_payload
from edgepack.agent.trust.errors import Reason, ReportRefused

__all__ = ["VerifiedReport", "ReportVerifier", "public_key_from_enrollment", "enroll",
           "revoke", "read_enrollment", "enrollment_of_key", "inventory_keys",
           "DEFAULT_FLEET_DB"]

#: the fleet server's default database (``edgepack fleet serve``, ``fleet enroll``)
DEFAULT_FLEET_DB = "sqlite:///fleet.db"


@dataclass(frozen=True)
class VerifiedReport:
    """An authentic report: who sent it, with which key, and the report without ``sig``."""

    device_id: str
    key_id: str
    report: Mapping[str, Any]


def public_key_from_enrollment(doc: Mapping[str, Any]) -> Any:
    """The SSlibKey of an enrollment object ``{"keyid": …, "key": {…}}``."""
    from securesystemslib.signer import SSlibKey

    try:
        key = SSlibKey.from_dict(str(doc["keyid"]), dict(doc["key"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ReportRefused(f"not an enrollment record ({exc})", reason=Reason.MALFORMED) \
            from None
    return key


class ReportVerifier:
    """Check reports against an inventory of enrolled devices."""

    def __init__(self, inventory: Mapping[str, Any]) -> None:
        self.inventory = {dev: (public_key_from_enrollment(k) if isinstance(k, Mapping) else k)
                          for dev, k in inventory.items()}

    def verify(self, report: Mapping[str, Any] | bytes, *,
               topic_device: str | None = None) -> VerifiedReport:
        """A :class:`VerifiedReport`, or ReportRefused with ``reason`` (``malformed``,
        ``unsigned``, ``wrong_device``, ``not_enrolled``, ``unknown_key``,
        ``bad_signature``)."""
        from securesystemslib.exceptions import UnverifiedSignatureError
        from securesystemslib.signer import Signature

        if isinstance(report, (bytes, bytearray)):
            try:
                report = json.loads(report)
            except ValueError:
                raise ReportRefused("report is not JSON", reason=Reason.MALFORMED) from None
        if not isinstance(report, Mapping):
            raise ReportRefused("report is not a JSON object", reason=Reason.MALFORMED)
        dev = report.get("device_id")
        sig = report.get(SIG_FIELD)
        if topic_device is not None and dev != topic_device:
            raise ReportRefused(f"report on device {topic_device!r}'s topic claims to be from "
                                f"{dev!r}", reason=Reason.WRONG_DEVICE, device_id=topic_device)
        if not isinstance(sig, Mapping) or not isinstance(sig.get("keyid"), str) \
                or not isinstance(sig.get("sig"), str):
            raise ReportRefused(f"report from {dev!r} is not signed by a device key",
                                reason=Reason.UNSIGNED, device_id=dev)
        key = self.inventory.get(dev) if isinstance(dev, str) else None
        if key is None:
            raise ReportRefused(f"device {dev!r} is not enrolled in this fleet",
                                reason=Reason.NOT_ENROLLED, key_ids=[sig["keyid"]],
                                device_id=dev)
        if sig["keyid"] != key.keyid:
            raise ReportRefused(f"report from {dev!r} is signed by key {sig['keyid'][:16]}, "
                                f"not by its enrolled key {key.keyid[:16]}",
                                reason=Reason.UNKNOWN_KEY, key_ids=[sig["keyid"]],
                                device_id=dev)
        try:
            payload = report_payload(report)
            key.verify_signature(Signature(sig["keyid"], sig["sig"]), payload)
        except (UnverifiedSignatureError, ValueError):
            raise ReportRefused(f"report from {dev!r}: the signature does not verify",
                                reason=Reason.BAD_SIGNATURE, key_ids=[key.keyid],
                                device_id=dev) from None
        body = {k: v for k, v in report.items() if k != SIG_FIELD}
        return VerifiedReport(dev, key.keyid, body)


def inventory_keys(db_url: str | None, fleet: str, devices: Sequence[str]
                   ) -> dict[str, dict[str, Any]]:
    """The enrolled (not revoked) keys of ``devices`` in the fleet database ``db_url``, or in
    the default ``fleet.db`` when it exists here (none when it does not)."""
    from edgepack.host.fleet.storage import open_store

    if db_url is None:
        if not Path(DEFAULT_FLEET_DB.removeprefix("sqlite:///")).is_file():
            return {}
        db_url = DEFAULT_FLEET_DB
    elif db_url.startswith("sqlite:///") and not Path(db_url.removeprefix("sqlite:///")).is_file():
        from edgepack.agent.errors import DataError

        raise DataError(f"no fleet database at {db_url}: pass the one `edgepack fleet enroll` "
                        "wrote (`db=`)", field="db")
    with open_store(db_url) as store:
        records = {r.device_id: r for r in store.inventory.list(fleet)}
    return {d: records[d].enrollment() for d in devices
            if d in records and not records[d].revoked}


def read_enrollment(path: str | os.PathLike) -> dict[str, Any]:
    """The enrollment object a device wrote at ``agent init`` (``enrollment.json``)."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ReportRefused(f"cannot read the enrollment file {path}: {exc.strerror}",
                            reason=Reason.MALFORMED, path=str(path)) from None
    except ValueError as exc:
        raise ReportRefused(f"the enrollment file {path} is not JSON ({exc})",
                            reason=Reason.MALFORMED, path=str(path)) from None
    if not isinstance(doc, dict):
        raise ReportRefused(f"the enrollment file {path} is not a JSON object",
                            reason=Reason.MALFORMED, path=str(path))
    return doc


def enroll(store: Any, enrollment: Mapping[str, Any] | str | os.PathLike, *,
           fleet: str = "default", device: str | None = None,
           groups: Sequence[str] | None = None) -> Any:
    """Enroll a device's key in ``store`` (a Store or a database URL); returns its
    EnrollmentRecord.

    ``enrollment`` is ``{"device_id", "keyid", "key"[, "groups"]}`` or the file holding it
    (``agent init`` writes ``enrollment.json``); ``device`` and ``groups`` given here win over
    the file's. A device enrolled again
    gets the new key and groups. Its last state, if it verifies with the key, makes it a
    member of its groups at once; otherwise its next signed state does.
    """
    from edgepack.agent.protocol import check_id
    from edgepack.host.fleet.storage import ReportTrust, open_store

    if isinstance(store, str):
        with open_store(store) as opened:
            return enroll(opened, enrollment, fleet=fleet, device=device, groups=groups)
    if not isinstance(enrollment, Mapping):
        enrollment = read_enrollment(enrollment)
    dev = device or enrollment.get("device_id")
    if not isinstance(dev, str):
        raise ReportRefused("the enrollment names no device: pass `device=`",
                            reason=Reason.MALFORMED, field="device")
    check_id(dev)
    key = public_key_from_enrollment(enrollment)
    if _computed_keyid(key) != key.keyid:
        raise ReportRefused(f"the enrollment of {dev!r} names key id {key.keyid[:16]}, which "
                            "is not the id of its key", reason=Reason.MALFORMED, field="key")
    if groups is None:
        claimed = enrollment.get("groups") or []
        groups = [g for g in claimed if isinstance(g, str)] if isinstance(claimed, list) else []
    for g in groups:
        check_id(g, "group name")
    rec = store.inventory.enroll(fleet, dev, key.keyid, key.to_dict(), list(groups))
    known = store.devices.get(fleet, dev)
    if known is not None:
        try:
            ok = ReportVerifier({dev: key}).verify(known.state, topic_device=dev)
            store.devices.set_trust(fleet, dev, ReportTrust(ok.key_id, rec.groups))
        except ReportRefused:
            store.devices.set_trust(fleet, dev, ReportTrust(None))
    return rec


def revoke(store: Any, device: str, *, fleet: str = "default") -> Any:
    """Stop believing a device: its reports count for nothing and it leaves its groups.
    ``store`` is a Store or a database URL."""
    from edgepack.host.fleet.storage import ReportTrust, open_store

    if isinstance(store, str):
        with open_store(store) as opened:
            return revoke(opened, device, fleet=fleet)
    rec = store.inventory.revoke(fleet, device)
    store.devices.set_trust(fleet, device, ReportTrust(None))
    return rec


def _computed_keyid(key: Any) -> str:
    """The TUF key id of ``key``: sha256 of the canonical JSON of its public key object."""
    return _keyid_of(key.to_dict())


def _keyid_of(key: Mapping[str, Any]) -> str:
    import hashlib

    from securesystemslib.formats import encode_canonical

    try:
        return hashlib.sha256(encode_canonical(dict(key)).encode()).hexdigest()
    except Exception as exc:  # noqa: BLE001 - securesystemslib's FormatError and friends
        raise ReportRefused(f"not a public key object ({exc})", reason=Reason.MALFORMED,
                            field="key") from None


def enrollment_of_key(key: Mapping[str, Any]) -> dict[str, Any]:
    """The ``{"keyid", "key"}`` enrollment object of a bare TUF public key object."""
    return {"keyid": _keyid_of(key), "key": dict(key)}
