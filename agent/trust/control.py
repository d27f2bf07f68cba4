"""Control messages of protocol v2: what they look like and how they are read (not yet trusted).

A control message is TUF ``targets`` metadata (python-tuf's :class:`tuf.api.metadata.Metadata`
holding :class:`~tuf.api.metadata.Targets`): TUF already gives exactly what a message that
changes a device needs — a ``version`` that only goes up, an ``expires``, the target's sha256
and length (:class:`~tuf.api.metadata.TargetFile`), threshold signatures over OLPC canonical
JSON — and python-tuf parses, serializes and verifies it. What TUF's model lacks is *who* the
message is for and *what* it asks: a TUF repository describes files for every client alike,
while a desired state addresses one device or one group and a downgrade is an authorization,
not a file. Those go in one extra member of ``signed``, ``edgepack`` (TUF keeps unknown fields
and signs them like the rest)::

    {"signed": {"_type": "targets", "spec_version": "1.0.31", "version": 1767225600,
                "expires": "2026-01-08T00:00:00Z",
                "targets": {"bundles/<sha256>": {"length": 13195,
                                                 "hashes": {"sha256": "<sha256>"},
                                                 "custom": {"name": "digits",
                                                            "version": "1.2.0"}}},
                "edgepack": {"kind": "desired", "fleet": "demo", "for": {"device": "pi-1"},
                             "issued": 1767225600, "deployment_id": "d-1"}},
     "signatures": [{"keyid": "<64 hex>", "sig": "<128 hex>"}]}

``_type`` is ``targets`` for every kind because every kind names bundles (or none); the role
that must sign is decided by ``edgepack.kind`` and ``edgepack.for`` (see ``SIGNERS``), never by
``_type``. The edgepack roles map onto the four TUF role names a TUF root must hold:
``release`` is TUF ``targets``, ``online`` is TUF ``timestamp`` (and ``snapshot``, unused).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgepack.agent.trust.errors import ControlRefused, Reason

__all__ = [
    "MAX_CONTROL_BYTES",
    "ROLE_NAMES",
    "KINDS",
    "SIGNERS",
    "Target",
    "ControlMessage",
    "parse_control",
    "target_path",
    "tuf_role",
]

MAX_CONTROL_BYTES = 1 << 20  # the v1 payload limit; a profile job's eval npz fits (512 KiB)

# edgepack role -> the TUF top-level role name that carries its keys in root metadata
ROLE_NAMES = {"root": "root", "release": "targets", "online": "timestamp"}

KINDS = ("desired", "downgrade", "job", "capture", "freshness")

# (kind, scope) -> roles whose threshold of signatures is accepted. Device-level desired states
# may come from the online key, but then only with an embedded release authorization (below).
SIGNERS: dict[tuple[str, str], tuple[str, ...]] = {
    ("desired", "group"): ("release",),
    ("desired", "device"): ("release", "online"),
    ("downgrade", "device"): ("release",),
    ("job", "device"): ("online", "release"),
    ("capture", "device"): ("release",),
    ("freshness", "device"): ("online",),
    ("freshness", "group"): ("online",),
    ("freshness", "fleet"): ("online",),
}

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def tuf_role(role: str) -> str:
    """The TUF role name under which ``role``'s keys and threshold live in root metadata."""
    return ROLE_NAMES[role]


def target_path(bundle_id: str) -> str:
    """The TUF target path of a bundle: ``bundles/<sha256>`` (its topic, too)."""
    return f"bundles/{bundle_id}"


@dataclass(frozen=True)
class Target:
    """A bundle a control message names: its id (sha256), length, model name and version."""

    bundle_id: str
    length: int
    name: str | None = None
    version: str | None = None


@dataclass(frozen=True)
class ControlMessage:
    """A parsed, *unverified* control message; :class:`ControlVerifier` decides trust."""

    kind: str
    fleet: str
    scope: str                 # "device", "group" or "fleet"
    subject: str               # the device id, group name or fleet name
    version: int
    expires: int               # unix seconds
    issued: int                # unix seconds, when the signer made it
    targets: tuple[Target, ...]
    fields: Mapping[str, Any]  # the rest of ``edgepack``: deployment_id, job, versions, ...
    key_ids: tuple[str, ...]   # key ids of the signatures present (not yet checked)
    payload: bytes = field(repr=False)  # the canonical JSON of ``signed``: what was signed
    metadata: Any = field(repr=False, compare=False)  # the python-tuf Metadata[Targets]

    @property
    def key(self) -> str:
        """The name under which a device keeps this message's highest version."""
        return f"{self.kind}/{self.scope}/{self.subject}"

    @property
    def target(self) -> Target | None:
        """The one bundle of a desired state or downgrade (None: a cleared desired state)."""
        return self.targets[0] if self.targets else None


def _refuse(msg: str, reason: str = Reason.MALFORMED, **ctx: object) -> ControlRefused:
    return ControlRefused(msg, reason=reason, **ctx)


def _load(data: bytes) -> Any:
    from tuf.api.metadata import Metadata, Targets

    if not data:
        raise _refuse("empty control message: v2 devices act only on signed messages; "
                      "publish a signed one (clearing a desired state is a signed message too)",
                      Reason.UNSIGNED)
    if len(data) > MAX_CONTROL_BYTES:
        raise _refuse(f"control message of {len(data)} bytes exceeds {MAX_CONTROL_BYTES}")
    try:
        md = Metadata.from_bytes(data)
    except Exception as exc:  # noqa: BLE001 - python-tuf raises DeserializationError and more
        cause = exc.__cause__ or exc
        reason = Reason.UNSIGNED if b'"signatures"' not in data else Reason.MALFORMED
        raise _refuse(f"not signed control metadata ({type(cause).__name__}: "
                      f"{str(cause)[:200]})", reason) from None
    if not isinstance(md.signed, Targets):
        raise _refuse(f"control metadata must be of _type 'targets', not {md.signed.type!r}")
    if not md.signatures:
        raise _refuse("control message carries no signature", Reason.UNSIGNED)
    try:
        payload = md.signed_bytes
    except Exception:  # noqa: BLE001 - SerializationError: a float or another non-canonical value
        raise _refuse("control message holds a value canonical JSON cannot encode (a float?): "
                      "signed fields are strings, integers, booleans, null, arrays, objects")\
            from None
    return md, payload


def _targets(signed: Any) -> tuple[Target, ...]:
    out = []
    for path, tf in sorted(signed.targets.items()):
        digest = tf.hashes.get("sha256")
        if not isinstance(digest, str) or not _SHA256.match(digest) \
                or path != target_path(digest):
            raise _refuse(f"target {path!r} must be 'bundles/<sha256>' with that sha256")
        custom = tf.unrecognized_fields.get("custom") or {}
        if not isinstance(custom, Mapping):
            raise _refuse(f"target {path!r}: custom must be an object")
        name, version = custom.get("name"), custom.get("version")
        if not all(v is None or isinstance(v, str) for v in (name, version)):
            raise _refuse(f"target {path!r}: name and version must be strings")
        out.append(Target(digest, int(tf.length), name, version))
    return tuple(out)


def parse_control(data: bytes) -> ControlMessage:
    """Read a control message; ControlRefused (``malformed``/``unsigned``) when it is not one.

    Nothing here is trusted yet: the caller checks the signatures, expiry and version.
    """
    md, payload = _load(data)
    signed = md.signed
    ep = signed.unrecognized_fields.get("edgepack")
    if not isinstance(ep, Mapping):
        raise _refuse("control metadata lacks its 'edgepack' object")
    kind, fleet, scope_doc = ep.get("kind"), ep.get("fleet"), ep.get("for")
    if kind not in KINDS:
        raise _refuse(f"unknown control kind {kind!r} (known: {', '.join(KINDS)})")
    if not isinstance(fleet, str) or not _ID.match(fleet):
        raise _refuse("control message names no valid fleet")
    if not isinstance(scope_doc, Mapping) or len(scope_doc) != 1:
        raise _refuse("'for' must name exactly one device, group or fleet")
    (scope, subject), = scope_doc.items()
    if (kind, scope) not in SIGNERS or not isinstance(subject, str) or not _ID.match(subject):
        raise _refuse(f"a {kind} message cannot be for {scope!r} {subject!r}", kind=kind)
    issued = ep.get("issued")
    if not isinstance(issued, int) or isinstance(issued, bool):
        raise _refuse("'issued' must be an integer (unix seconds)", kind=kind)
    targets = _targets(signed)
    if kind == "downgrade" and (len(targets) != 1 or not targets[0].name
                                or not targets[0].version):
        raise _refuse("a downgrade names exactly one bundle with its name and version",
                      kind=kind)
    if kind == "desired" and (len(targets) > 1 or (targets and not targets[0].version)):
        raise _refuse("a desired state names one bundle (with name and version) or none",
                      kind=kind)
    fields = {k: v for k, v in ep.items() if k not in ("kind", "fleet", "for", "issued")}
    return ControlMessage(
        kind=kind, fleet=fleet, scope=scope, subject=subject, version=signed.version,
        expires=int(signed.expires.timestamp()), issued=issued, targets=targets,
        fields=fields, key_ids=tuple(sorted(md.signatures)), payload=payload, metadata=md)
