"""Believe a device report only when its enrolled device key signed it.

The inventory is a plain mapping ``device_id → public key`` (a securesystemslib key, or the
``{"keyid", "key"}`` object a device prints at ``agent init``). A report is authentic when its
``device_id`` is enrolled, the topic it came on names the same device, its ``sig`` is by that
device's key, and the signature verifies over the report's canonical JSON
(``edgepack.agent.identity.report_payload``). Rollouts count authentic reports only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edgepack.agent.identity import SIG_FIELD, report_payload
from edgepack.agent.trust.errors import Reason, ReportRefused

__all__ = ["VerifiedReport", "ReportVerifier", "public_key_from_enrollment"]


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
