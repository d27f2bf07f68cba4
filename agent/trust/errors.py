"""Errors of the trust layer: every refusal names its ``reason`` and the key ids involved.

::

    ProtocolError (edgepack.agent.errors)
    └── TrustError                 a control message, root or report was refused
        ├── ControlRefused         a control message (desired, downgrade, job, capture, freshness)
        ├── RootRefused            a new root metadata (rotation) was refused
        └── ReportRefused          a device report (fleet side) was refused
    BundleError (edgepack.agent.errors)
    └── FloorError                 a bundle below the rollback floor, without authorization
    SignatureError (edgepack.agent.errors)
    └── KeyFileError               a key file is missing, unreadable, malformed or not 0600

``reason`` is one of the :class:`Reason` strings; events carry it unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

from edgepack.agent.errors import BundleError, ProtocolError, SignatureError

__all__ = [
    "Reason",
    "TrustError",
    "ControlRefused",
    "RootRefused",
    "ReportRefused",
    "FloorError",
    "KeyFileError",
]


class Reason:
    """Machine-readable causes of a refusal (the ``reason`` of events and errors)."""

    UNSIGNED = "unsigned"                  # no signature at all (an empty or v1 message)
    MALFORMED = "malformed"                # not control metadata, wrong types, too large
    BAD_SIGNATURE = "bad_signature"        # a trusted key's signature does not verify
    UNKNOWN_KEY = "unknown_key"            # signed only by keys the root does not know
    WRONG_ROLE = "wrong_role"              # signed by known keys of a role not allowed here
    THRESHOLD_NOT_MET = "threshold_not_met"  # fewer valid signatures than the role's threshold
    WRONG_DEVICE = "wrong_device"          # names another device
    WRONG_GROUP = "wrong_group"            # names a group this device does not follow
    WRONG_FLEET = "wrong_fleet"            # names another fleet
    REPLAYED = "replayed"                  # version not above the highest seen
    EXPIRED = "expired"                    # past its expiry (beyond the clock-skew allowance)
    NOT_AUTHORIZED = "not_authorized"      # online assignment outside what a release key allowed
    BELOW_FLOOR = "below_floor"            # bundle version under the model's rollback floor
    ROOT_VERSION = "root_version"          # a root that is not exactly the next version
    NOT_ENROLLED = "not_enrolled"          # a report from a device the fleet does not know
    KEY_FILE = "key_file"                  # a key file is missing, malformed or too open


class TrustError(ProtocolError):
    """A signed message was refused; ``reason`` says why, ``key_ids`` which keys were seen."""

    def __init__(self, message: str, *, reason: str, key_ids: Iterable[str] = (),
                 **context: object) -> None:
        self.reason = reason
        self.key_ids = tuple(key_ids)
        super().__init__(message, reason=reason,
                         key_ids=",".join(self.key_ids) or None, **context)


class ControlRefused(TrustError):
    """A control message (desired state, downgrade, job, capture, freshness) was refused."""


class RootRefused(TrustError):
    """A new root metadata was refused: the device keeps trusting its current root."""


class ReportRefused(TrustError):
    """A device report (state, event, telemetry, result) failed authentication."""


class FloorError(BundleError):
    """A bundle is below the rollback floor of its model name and no downgrade allows it."""

    def __init__(self, message: str, *, name: str, version: str, floor: str,
                 **context: object) -> None:
        self.reason = Reason.BELOW_FLOOR
        self.name, self.version, self.floor = name, version, floor
        super().__init__(message, reason=self.reason, name=name, version=version, floor=floor,
                         **context)


class KeyFileError(SignatureError):
    """A key file is missing, unreadable, malformed or readable by others than its owner."""

    def __init__(self, message: str, *, path: object, **context: object) -> None:
        self.reason = Reason.KEY_FILE
        super().__init__(message, reason=self.reason, path=path, **context)
