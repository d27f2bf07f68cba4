"""The device's judge of control messages, rollback floors and freshness.

``ControlVerifier.verify`` is the one door every control message passes before the agent acts
on it. In order: the message is control metadata (size, shape) → it is for this fleet and for
this device or one of its groups → the trusted root has not expired → a threshold of keys of a
role allowed for its kind signed it → it has not expired (with a clock-skew allowance) → its
version is above the highest seen for its key, or is that very message again (a redelivery) →
kind-specific rules (an online-signed device assignment must carry a release-signed assignment
of the same bundle to this device or one of its groups). Only then is the version persisted.

Any refusal raises :class:`ControlRefused` with a ``reason`` and the key ids, and changes
nothing: the device keeps running what it runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.agent.bundle import parse_version
from edgepack.agent.trust.control import SIGNERS, ControlMessage, Target, parse_control
from edgepack.agent.trust.errors import ControlRefused, FloorError, Reason
from edgepack.agent.trust.ledger import FreshnessRecord, Ledger, Seen
from edgepack.agent.trust.root import (
    RoleCheck,
    RootUpdate,
    TrustedRoot,
    check_signatures,
    refuse_unverified,
)

__all__ = [
    "DEFAULT_SKEW_S",
    "Verified",
    "FloorDecision",
    "FreshnessStatus",
    "ControlVerifier",
]

DEFAULT_SKEW_S = 300.0  # devices without a battery-backed clock drift; NTP fixes the rest


@dataclass(frozen=True)
class Verified:
    """A control message the device may act on."""

    kind: str
    scope: str
    subject: str
    role: str                    # the edgepack role whose threshold signed it
    version: int
    expires: int
    issued: int
    targets: tuple[Target, ...]
    fields: Mapping[str, Any]
    key_ids: tuple[str, ...]     # keys whose signatures verified
    new: bool                    # False: a redelivery of the message already accepted
    authorization: Verified | None = None  # the release assignment behind an online one

    @property
    def target(self) -> Target | None:
        """The bundle of a desired state or downgrade (None: desired state cleared)."""
        return self.targets[0] if self.targets else None

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.scope}/{self.subject}"


@dataclass(frozen=True)
class FloorDecision:
    """A bundle passed the rollback floor: as an upgrade, or as an authorized downgrade."""

    name: str
    version: str
    floor: str | None
    downgrade: bool
    key_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class FreshnessStatus:
    """How recent the fleet server's last freshness signature is (``fresh``/``stale``/
    ``missing``), and the message keys it says are newer than what the device holds."""

    status: str
    bound_s: float
    age_s: float | None
    version: int | None
    key_ids: tuple[str, ...]
    behind: tuple[str, ...]


class ControlVerifier:
    """Verify control messages for one device against its trusted root and ledger.

    ``trust_dir`` holds ``root.json`` (installed at ``agent init``) and ``ledger.json``.
    """

    def __init__(self, trust_dir: str | os.PathLike, *, device_id: str, fleet: str,
                 groups: Iterable[str] = (), skew_s: float = DEFAULT_SKEW_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.dir = Path(trust_dir)
        self.device_id, self.fleet, self.groups = device_id, fleet, tuple(groups)
        self.skew_s, self.clock = skew_s, clock
        self.root = TrustedRoot.load(self.dir / "root.json")
        self.ledger = Ledger(self.dir / "ledger.json")

    # -- control messages ------------------------------------------------------------------

    def verify(self, data: bytes, *, kind: str | None = None) -> Verified:
        """Verify one control message (the raw MQTT payload); see the module docstring.

        ``kind`` is the kind the topic carries (``desired`` on ``…/desired``): another kind
        there is refused ``malformed``.
        """
        msg = parse_control(data)
        if kind is not None and msg.kind != kind:
            raise ControlRefused(f"a {msg.kind} message where a {kind} message belongs",
                                 reason=Reason.MALFORMED, kind=msg.kind)
        verified = self._check(msg, self.clock())
        if verified.new:
            self.ledger.record(msg.key, Seen(msg.version, _digest(msg), verified.role,
                                             verified.key_ids, msg.expires))
            last = self.ledger.freshness
            if msg.kind == "freshness" and (last is None or msg.issued >= last.issued):
                self.ledger.record_freshness(FreshnessRecord(
                    msg.version, msg.issued, msg.expires, verified.key_ids,
                    dict(msg.fields["versions"])))
        return verified

    def _check(self, msg: ControlMessage, now: float, *, nested: bool = False) -> Verified:
        ctx = {"kind": msg.kind, "version": msg.version}
        self._check_addressee(msg, ctx)
        if now - self.skew_s >= self.root.expires:
            raise ControlRefused(f"the trusted root v{self.root.version} expired: install the "
                                 "fleet's newer root", reason=Reason.EXPIRED, role="root", **ctx)
        role, check = self._signers(msg)
        what = f"{msg.kind} v{msg.version} for {msg.scope} {msg.subject}"
        refuse_unverified(self.root.signed, check, what, **ctx)
        if now - self.skew_s >= msg.expires:
            raise ControlRefused(f"{what} expired at {msg.expires} (now {int(now)})",
                                 reason=Reason.EXPIRED, key_ids=check.signed, **ctx)
        new = True
        seen = self.ledger.seen(msg.key)
        if seen is not None and not nested:
            same = msg.version == seen.version and _digest(msg) == seen.digest
            if msg.version < seen.version or (msg.version == seen.version and not same):
                raise ControlRefused(f"{what} is not newer than v{seen.version} already "
                                     "accepted (a replay)", reason=Reason.REPLAYED,
                                     key_ids=check.signed, **ctx)
            new = not same
        fields = dict(msg.fields)
        auth = None
        if msg.kind == "desired":
            dep = fields.get("deployment_id")
            if msg.target is not None and not isinstance(dep, str):
                raise ControlRefused(f"{what} names no deployment_id", reason=Reason.MALFORMED,
                                     **ctx)
            if role == "online" and msg.target is not None:
                auth = self._authorization(msg, fields.pop("authorization", None), now,
                                           {**ctx, "key_ids": check.signed})
        elif msg.kind == "freshness":
            versions = fields.get("versions")
            if not isinstance(versions, Mapping) or not all(
                    isinstance(k, str) and isinstance(v, int) for k, v in versions.items()):
                raise ControlRefused("freshness 'versions' must map message keys to integers",
                                     reason=Reason.MALFORMED, **ctx)
        return Verified(msg.kind, msg.scope, msg.subject, role, msg.version, msg.expires,
                        msg.issued, msg.targets, fields, check.signed, new, auth)

    def _check_addressee(self, msg: ControlMessage, ctx: dict) -> None:
        if msg.fleet != self.fleet:
            raise ControlRefused(f"message for fleet {msg.fleet!r}, this device is in "
                                 f"{self.fleet!r}", reason=Reason.WRONG_FLEET, **ctx)
        if msg.scope == "device" and msg.subject != self.device_id:
            raise ControlRefused(f"message for device {msg.subject!r}, this is "
                                 f"{self.device_id!r}", reason=Reason.WRONG_DEVICE, **ctx)
        if msg.scope == "group" and msg.subject not in self.groups:
            raise ControlRefused(f"message for group {msg.subject!r}, which this device does "
                                 "not follow", reason=Reason.WRONG_GROUP, **ctx)
        if msg.scope == "fleet" and msg.subject != self.fleet:
            raise ControlRefused(f"message for fleet {msg.subject!r}",
                                 reason=Reason.WRONG_FLEET, **ctx)

    def _signers(self, msg: ControlMessage) -> tuple[str, RoleCheck]:
        sigs = msg.metadata.signatures
        checks = [check_signatures(self.root.signed, role, msg.payload, sigs)
                  for role in SIGNERS[(msg.kind, msg.scope)]]
        for c in checks:
            if c.verified:
                return c.role, c
        # Report the role the signatures came closest to (some of its keys signed).
        best = max(checks, key=lambda c: (len(c.signed), len(c.failed)))
        return best.role, best

    def _authorization(self, msg: ControlMessage, doc: Any, now: float,
                       ctx: dict) -> Verified:
        """The release-signed assignment an online-signed device assignment stands on."""
        if not isinstance(doc, Mapping):
            raise ControlRefused(
                "an online-signed assignment must carry the release-signed desired state it "
                "applies ('authorization')", reason=Reason.NOT_AUTHORIZED, **ctx)
        inner = parse_control(json.dumps(doc).encode())
        if inner.kind != "desired":
            raise ControlRefused("the authorization is not a desired state",
                                 reason=Reason.NOT_AUTHORIZED, **ctx)
        ctx = {k: v for k, v in ctx.items() if k != "key_ids"}  # the inner keys from here on
        auth = self._check(inner, now, nested=True)
        if auth.role != "release":
            raise ControlRefused("the authorization is not signed by release keys",
                                 reason=Reason.NOT_AUTHORIZED, key_ids=auth.key_ids, **ctx)
        if auth.target != msg.target:
            raise ControlRefused(
                f"the online key assigned bundle {msg.target.bundle_id[:12]}…, which the "
                "release authorization does not name", reason=Reason.NOT_AUTHORIZED,
                key_ids=auth.key_ids, **ctx)
        seen = self.ledger.seen(inner.key)
        if seen is not None and inner.version < seen.version:
            raise ControlRefused(f"the authorization ({inner.key} v{inner.version}) was "
                                 f"superseded by v{seen.version}", reason=Reason.REPLAYED,
                                 key_ids=auth.key_ids, **ctx)
        return auth

    # -- root rotation ---------------------------------------------------------------------

    def update_root(self, data: bytes) -> RootUpdate:
        """Accept the next root version; forget versions signed only by keys it removed."""
        before = self.root.signed
        update = self.root.update(data)
        for role in ("release", "online"):
            removed = self.root.removed_keys(before, role)
            if removed:
                self.ledger.forget_signed_by(role, removed)
        return update

    # -- rollback floor --------------------------------------------------------------------

    def check_floor(self, name: str, version: str, bundle_id: str,
                    authorization: Verified | None = None) -> FloorDecision:
        """Refuse a bundle below the floor of ``name`` unless ``authorization`` (a verified
        downgrade for this device) names exactly this name, version and bundle.

        ``name`` and ``version`` come from the verified bundle manifest, never from the
        message that asked for it.
        """
        floor = self.ledger.floors.get(name)
        if floor is None or parse_version(version) >= parse_version(floor):
            return FloorDecision(name, version, floor, False)
        t = authorization.target if authorization is not None else None
        if (authorization is not None and authorization.kind == "downgrade"
                and authorization.subject == self.device_id and t is not None
                and (t.name, t.version, t.bundle_id) == (name, version, bundle_id)
                and self.clock() - self.skew_s < authorization.expires):
            return FloorDecision(name, version, floor, True, authorization.key_ids)
        why = ("no downgrade authorization" if authorization is None
               else "the downgrade authorization names another device, bundle or version, "
                    "or expired")
        raise FloorError(f"{name} {version} is below this device's rollback floor {floor} "
                         f"({why}); a downgrade needs a release-signed authorization for this "
                         "device and version", name=name, version=version, floor=floor,
                         bundle_id=bundle_id)

    def record_install(self, name: str, version: str, *, downgrade: bool = False) -> str:
        """After a commit: raise the floor of ``name`` to ``version`` (or set it there after an
        authorized downgrade). Returns the new floor."""
        floor = self.ledger.floors.get(name)
        if downgrade or floor is None or parse_version(version) > parse_version(floor):
            self.ledger.set_floor(name, version)
            return version
        return floor

    # -- freshness -------------------------------------------------------------------------

    def freshness(self, bound_s: float) -> FreshnessStatus:
        """``stale`` when the last freshness signature is older than ``bound_s`` (or expired),
        ``missing`` when none was ever accepted; ``behind`` lists this device's message keys
        for which the fleet server vouches for a newer version than the device holds
        (a withheld message)."""
        rec = self.ledger.freshness
        if rec is None:
            return FreshnessStatus("missing", bound_s, None, None, (), ())
        now = self.clock()
        age = now - rec.issued
        stale = age > bound_s or now - self.skew_s >= rec.expires
        mine = {f"desired/device/{self.device_id}",
                *(f"desired/group/{g}" for g in self.groups)}
        behind = tuple(sorted(
            k for k, v in rec.versions.items()
            if k in mine and (self.ledger.seen(k) is None or self.ledger.seen(k).version < v)))
        return FreshnessStatus("stale" if stale else "fresh", bound_s, age, rec.version,
                               rec.key_ids, behind)


def _digest(msg: ControlMessage) -> str:
    return hashlib.sha256(msg.payload).hexdigest()
