"""The device's trust anchor: TUF root metadata on disk, checked and rotated like a TUF client.

The root names every key a device trusts and, per role, how many of them must sign
(``root``: k of n offline keys; ``release``: the keys that sign bundles and assignments;
``online``: the fleet server's key). A new root N+1 is accepted only when a threshold of root
N's root keys **and** a threshold of its own root keys signed it (python-tuf's
``Root.get_root_verification_result``), and only one version at a time: a device several
rotations behind walks N → N+1 → … as a TUF client does. Nothing is touched by hand.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.agent.trust.control import ROLE_NAMES, tuf_role
from edgepack.agent.trust.errors import ControlRefused, Reason, RootRefused
from edgepack.agent.trust.privatefile import write_private

__all__ = ["RoleCheck", "RootUpdate", "RootChain", "TrustedRoot", "check_signatures",
           "refuse_unverified", "ROOT_TOPIC"]

# Root versions travel retained on ``edgepack/v1/{fleet}/root/{N}`` (one topic per version, so a
# device several rotations behind finds every version it must walk); devices subscribe ``root/+``.
ROOT_TOPIC = "root/{version}"


@dataclass(frozen=True)
class RoleCheck:
    """Which keys of a role signed: enough of them (``verified``) or not."""

    role: str
    threshold: int
    signed: tuple[str, ...]     # key ids of the role whose signature verified
    failed: tuple[str, ...]     # key ids of the role whose signature did not verify
    foreign: tuple[str, ...]    # key ids present but not keys of the role

    @property
    def verified(self) -> bool:
        return len(self.signed) >= self.threshold


@dataclass(frozen=True)
class RootUpdate:
    """One accepted root rotation: versions and the roles whose keys or threshold changed."""

    from_version: int
    to_version: int
    changed_roles: tuple[str, ...]
    key_ids: tuple[str, ...]   # root keys whose signatures were accepted


def _edgepack_role(tuf_name: str) -> str:
    if tuf_name == "snapshot":  # held by the online keys, with timestamp
        return "online"
    return {v: k for k, v in ROLE_NAMES.items()}.get(tuf_name, tuf_name)


def check_signatures(root: Any, role: str, payload: bytes,
                     signatures: Mapping[str, Any]) -> RoleCheck:
    """Check ``signatures`` over ``payload`` against ``role``'s keys in the TUF ``root``."""
    res = root.get_verification_result(tuf_role(role), payload, dict(signatures))
    failed = tuple(sorted(k for k in res.unsigned if k in signatures))
    foreign = tuple(sorted(k for k in signatures if k not in res.signed and k not in failed))
    return RoleCheck(role, res.threshold, tuple(sorted(res.signed)), failed, foreign)


def refuse_unverified(root: Any, check: RoleCheck, what: str,
                      error: type = ControlRefused, **ctx: object) -> None:
    """Raise ``error`` with the most precise reason when ``check`` did not reach its threshold."""
    if check.verified:
        return
    seen = check.signed + check.failed + check.foreign
    if check.failed and not check.signed:
        reason = Reason.BAD_SIGNATURE
        msg = (f"{what}: the signature of {check.role} key {check.failed[0][:16]} does not "
               "verify (the content changed after signing)")
    elif check.signed:
        reason = Reason.THRESHOLD_NOT_MET
        msg = (f"{what}: {len(check.signed)} of the {check.threshold} {check.role} signatures "
               "it needs")
    elif any(k in root.keys for k in check.foreign):
        reason = Reason.WRONG_ROLE
        msg = f"{what}: signed by known keys that do not hold the {check.role} role"
    else:
        reason = Reason.UNKNOWN_KEY
        msg = (f"{what}: signed by key(s) {', '.join(k[:16] for k in check.foreign)} that the "
               "trusted root does not know")
    raise error(msg, reason=reason, key_ids=seen, role=check.role, **ctx)


class TrustedRoot:
    """Root metadata a device trusts, persisted at ``path`` (0600)."""

    def __init__(self, path: str | os.PathLike, metadata: Any) -> None:
        self.path = Path(path)
        self.metadata = metadata

    @property
    def signed(self) -> Any:
        """The python-tuf :class:`~tuf.api.metadata.Root`."""
        return self.metadata.signed

    @property
    def version(self) -> int:
        return self.signed.version

    @property
    def expires(self) -> int:
        return int(self.signed.expires.timestamp())

    def role_keys(self, role: str) -> tuple[str, ...]:
        """Key ids holding ``role`` (edgepack role name)."""
        return tuple(self.signed.roles[tuf_role(role)].keyids)

    @staticmethod
    def check(data: bytes) -> Any:
        """Root metadata that verifies with its own root threshold (the python-tuf Metadata);
        RootRefused otherwise."""
        md = _parse_root(data)
        check = check_signatures(md.signed, "root", md.signed_bytes, md.signatures)
        refuse_unverified(md.signed, check, "root metadata", RootRefused)
        return md

    @classmethod
    def install(cls, path: str | os.PathLike, data: bytes) -> TrustedRoot:
        """First trust (``agent init``): a root that verifies with its own root threshold."""
        md = cls.check(data)
        write_private(path, data)
        return cls(path, md)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrustedRoot:
        """Read the trusted root from disk (written by :meth:`install` or :meth:`update`)."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise RootRefused(f"no trusted root at {path} ({exc.strerror}): copy the fleet's "
                              "root.json to the device at init", reason=Reason.MALFORMED,
                              path=path) from None
        return cls(path, _parse_root(data))

    def update(self, data: bytes) -> RootUpdate:
        """Accept root version N+1 signed by both root N's and its own root threshold."""
        new = _parse_root(data)
        old = self.signed
        nv = new.signed.version
        if nv <= old.version:
            raise RootRefused(f"root version {nv} is not newer than the trusted {old.version}",
                              reason=Reason.REPLAYED, version=nv)
        if nv != old.version + 1:
            raise RootRefused(f"root version {nv} skips versions: apply {old.version + 1} "
                              "first (roots are walked one version at a time)",
                              reason=Reason.ROOT_VERSION, version=nv)
        payload = new.signed_bytes
        res = new.signed.get_root_verification_result(old, payload, new.signatures)
        for delegator, part in ((old, res.first), (new.signed, res.second)):
            failed = tuple(sorted(k for k in part.unsigned if k in new.signatures))
            foreign = tuple(sorted(k for k in new.signatures
                                   if k not in part.signed and k not in failed))
            check = RoleCheck("root", part.threshold, tuple(sorted(part.signed)), failed,
                              foreign)
            which = "current" if delegator is old else "new"
            refuse_unverified(delegator, check, f"root v{nv} (checked with the {which} root)",
                              RootRefused, version=nv)
        changed = tuple(sorted({
            _edgepack_role(name) for name, role in new.signed.roles.items()
            if _role_keys(old, name) != _role_keys(new.signed, name)
            or old.roles[name].threshold != role.threshold}))
        write_private(self.path, data)
        self.metadata = new
        return RootUpdate(old.version, nv, changed, tuple(sorted(res.signed)))

    def update_chain(self, chain: Iterable[bytes]) -> tuple[RootUpdate, ...]:
        """Walk several rotations in order (versions N+1, N+2, …); stop at the first refusal."""
        return tuple(self.update(data) for data in chain)

    def v1_keys(self, role: str = "release") -> dict[str, Any]:
        """``role``'s Ed25519 keys in v1's form (16-hex key id → PublicKey), for checking
        bundle ``signature.json`` and ``table_sig`` with keys that rotate with the root."""
        from edgepack.agent.signing import PublicKey, key_id

        out = {}
        for kid in self.role_keys(role):
            key = self.signed.keys[kid]
            if key.keytype == "ed25519":
                pub = PublicKey(bytes.fromhex(key.keyval["public"]))
                out[key_id(pub)] = pub
        return out

    def removed_keys(self, before: Any, role: str) -> set[str]:
        """Keys that held ``role`` in root ``before`` and no longer do."""
        name = tuf_role(role)
        return set(before.roles[name].keyids) - set(self.signed.roles[name].keyids)


class RootChain:
    """Root versions as they arrive (retained, in any order), applied one version at a time.

    ``offer`` keeps versions above the trusted one and applies every consecutive one it can
    with ``update`` (normally :meth:`ControlVerifier.update_root`); versions at or below the
    trusted one are old news (every connect redelivers them) and ignored.
    """

    def __init__(self, root: TrustedRoot, update: Any) -> None:
        self.root = root
        self._update = update
        self.pending: dict[int, bytes] = {}

    def offer(self, payload: bytes) -> tuple[tuple[RootUpdate, ...], RootRefused | None]:
        """Apply what ``payload`` makes possible: the updates applied, and the refusal that
        stopped the walk (that version is dropped; the device keeps the root it reached)."""
        if not payload:
            return (), None
        try:
            version = _version_of(payload)
        except RootRefused as exc:
            return (), exc
        if version <= self.root.version:
            return (), None
        self.pending[version] = payload
        done = []
        while (data := self.pending.pop(self.root.version + 1, None)) is not None:
            try:
                done.append(self._update(data))
            except RootRefused as exc:
                return tuple(done), exc
        return tuple(done), None


def _version_of(payload: bytes) -> int:
    import json

    try:
        v = json.loads(payload)["signed"]["version"]
    except (ValueError, KeyError, TypeError):
        v = None
    if not isinstance(v, int) or isinstance(v, bool):
        raise RootRefused("not root metadata (no integer signed.version)",
                          reason=Reason.MALFORMED)
    return v


def _role_keys(root: Any, name: str) -> set[tuple[str, str]]:
    return {(k, str(root.keys[k].keyval)) for k in root.roles[name].keyids if k in root.keys}


def _parse_root(data: bytes) -> Any:
    from tuf.api.metadata import Metadata, Root

    try:
        md = Metadata.from_bytes(data)
    except Exception as exc:  # noqa: BLE001 - python-tuf wraps parse errors differently
        raise RootRefused(f"not root metadata ({type(exc.__cause__ or exc).__name__})",
                          reason=Reason.MALFORMED) from None
    if not isinstance(md.signed, Root):
        raise RootRefused(f"expected root metadata, got _type {md.signed.type!r}",
                          reason=Reason.MALFORMED)
    return md
