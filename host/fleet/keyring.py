"""Keys and root metadata of a fleet: generate keys (0600), create the root, rotate it.

Roles (docs/security.md): ``root`` — offline keys, k of n must sign a new root; ``release`` —
sign bundles and assignments (TUF ``targets``); ``online`` — the fleet server's key, signs
freshness and per-device assignments within what release keys allowed (TUF ``timestamp`` and
``snapshot``). Keys are Ed25519 via securesystemslib's :class:`CryptoSigner`; root metadata is
python-tuf's :class:`~tuf.api.metadata.Root`, signed with :meth:`Metadata.sign`.

A key on disk is two files: ``NAME.key`` (PKCS#8 PEM, mode 0600, refused when wider) and
``NAME.pub.json`` (``{"keyid": …, "key": <TUF key object>}``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from edgepack.agent.trust.control import ROLE_NAMES
from edgepack.agent.trust.errors import KeyFileError
from edgepack.agent.trust.privatefile import read_signer, write_private

__all__ = [
    "KeyInfo",
    "generate_key",
    "load_signer",
    "load_public_key",
    "signer_from_seed",
    "create_root",
    "rotate_root",
    "add_signature",
    "DEFAULT_ROOT_DAYS",
    "FleetKeys",
    "init_fleet_keys",
    "RoleInfo",
    "RootInfo",
    "describe_root",
    "Rotation",
    "rotate_keys",
    "root_history",
]

DEFAULT_ROOT_DAYS = 365


@dataclass(frozen=True)
class KeyInfo:
    """A key written by :func:`generate_key`."""

    name: str
    key_id: str
    private_path: Path
    public_path: Path


def signer_from_seed(seed: bytes) -> Any:
    """A CryptoSigner for the Ed25519 key with this 32-byte seed (test vectors only)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from securesystemslib.signer import CryptoSigner, SSlibKey

    priv = Ed25519PrivateKey.from_private_bytes(seed)
    return CryptoSigner(priv, SSlibKey.from_crypto(priv.public_key()))


def _write_key(signer: Any, out: Path, name: str, overwrite: bool) -> KeyInfo:
    priv_path, pub_path = out / f"{name}.key", out / f"{name}.pub.json"
    if not overwrite and (priv_path.exists() or pub_path.exists()):
        raise KeyFileError(f"{priv_path} already exists; refusing to overwrite a signing key "
                           "(pass `overwrite=True` to replace it)", path=priv_path,
                           field="overwrite")
    write_private(priv_path, signer.private_bytes)
    key = signer.public_key
    pub_path.write_bytes(json.dumps({"keyid": key.keyid, "key": key.to_dict()}, indent=1,
                                    sort_keys=True).encode() + b"\n")
    return KeyInfo(name, key.keyid, priv_path, pub_path)


def generate_key(out_dir: str | os.PathLike, name: str, *, overwrite: bool = False,
                 seed: bytes | None = None) -> KeyInfo:
    """Make an Ed25519 key: ``NAME.key`` (0600) and ``NAME.pub.json``.

    ``seed`` (32 bytes) makes a fixed key: for test vectors, never for a real fleet.
    """
    from securesystemslib.signer import CryptoSigner

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    signer = signer_from_seed(seed) if seed is not None else CryptoSigner.generate_ed25519()
    return _write_key(signer, out, name, overwrite)


def load_signer(path: str | os.PathLike) -> Any:
    """Read ``NAME.key`` (must be 0600) as a securesystemslib CryptoSigner."""
    return read_signer(path, "signing key")


def load_public_key(path: str | os.PathLike) -> Any:
    """Read ``NAME.pub.json`` as a securesystemslib SSlibKey."""
    from securesystemslib.signer import SSlibKey

    try:
        doc = json.loads(Path(path).read_bytes())
        return SSlibKey.from_dict(doc["keyid"], dict(doc["key"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise KeyFileError(f"{path} is not a public key written by generate_key ({exc})",
                           path=path) from None


def _expiry(expires: datetime | None, days: int) -> datetime:
    if expires is not None:
        return expires
    return datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=days)


def _set_role(root: Any, role: str, keys: Iterable[Any], threshold: int) -> None:
    names = [ROLE_NAMES[role]] + (["snapshot"] if role == "online" else [])
    keys = list(keys)
    if not 1 <= threshold <= len(keys):
        raise KeyFileError(f"{role} threshold {threshold} needs between 1 and {len(keys)} "
                           "keys", path=None, field=f"{role}_threshold")
    for name in names:
        for kid in list(root.roles[name].keyids):
            root.revoke_key(kid, name)
        for k in keys:
            root.add_key(k, name)
        root.roles[name].threshold = threshold


def _sign_all(md: Any, signers: Sequence[Any]) -> bytes:
    md.signatures.clear()
    for s in signers:
        md.sign(s, append=True)
    return md.to_bytes()


def create_root(*, root_signers: Sequence[Any], root_threshold: int,
                release_keys: Sequence[Any], online_keys: Sequence[Any],
                release_threshold: int = 1, online_threshold: int = 1,
                root_keys: Sequence[Any] | None = None,
                expires: datetime | None = None) -> bytes:
    """Root metadata v1 signed by ``root_signers``; the root role holds ``root_keys`` (public
    keys; default: the signers' own). A threshold of them must sign before devices accept it:
    with keys on separate machines, sign with one here and :func:`add_signature` elsewhere."""
    from tuf.api.metadata import Metadata, Root

    root = Root(expires=_expiry(expires, DEFAULT_ROOT_DAYS), consistent_snapshot=False)
    _set_role(root, "root", root_keys or [s.public_key for s in root_signers], root_threshold)
    _set_role(root, "release", release_keys, release_threshold)
    _set_role(root, "online", online_keys, online_threshold)
    return _sign_all(Metadata(root), root_signers)


def rotate_root(current: bytes, *, signers: Sequence[Any],
                roles: Mapping[str, tuple[Sequence[Any], int]],
                expires: datetime | None = None) -> bytes:
    """The next root version: ``roles`` maps a role (``root``, ``release``, ``online``) to its
    new ``(public keys, threshold)``; roles not named keep theirs.

    ``signers`` must include a threshold of the current root keys *and* a threshold of the new
    ones (devices check both); only the new root needs publishing — devices walk to it.
    """
    from tuf.api.metadata import Metadata

    md = Metadata.from_bytes(current)
    root = md.signed
    root.version += 1
    root.expires = _expiry(expires, DEFAULT_ROOT_DAYS)
    for role, (keys, threshold) in roles.items():
        _set_role(root, role, keys, threshold)
    return _sign_all(md, signers)


def add_signature(metadata: bytes, signer: Any) -> bytes:
    """Add one signature to root metadata signed elsewhere (offline ceremonies: each root key
    holder signs the same bytes on their own machine; the signatures accumulate)."""
    from tuf.api.metadata import Metadata

    md = Metadata.from_bytes(metadata)
    md.sign(signer, append=True)
    return md.to_bytes()


@dataclass(frozen=True)
class FleetKeys:
    """What :func:`init_fleet_keys` wrote: the root metadata and every key by role."""

    root: Path
    root_keys: tuple[KeyInfo, ...]
    root_threshold: int
    release: KeyInfo
    release_pem: Path      # release.pub: the PEM devices list in trusted_keys (bundles)
    online: KeyInfo

    def to_json(self) -> dict[str, Any]:
        def info(k: KeyInfo) -> dict[str, str]:
            return {"name": k.name, "key_id": k.key_id, "private": str(k.private_path),
                    "public": str(k.public_path)}

        return {"root": str(self.root), "root_threshold": self.root_threshold,
                "root_keys": [info(k) for k in self.root_keys], "release": info(self.release),
                "release_pem": str(self.release_pem), "online": info(self.online)}


def init_fleet_keys(out_dir: str | os.PathLike, *, root_keys: int = 1, root_threshold: int = 1,
                    overwrite: bool = False, expires: datetime | None = None) -> FleetKeys:
    """Make a fleet's keys and its root v1 (protocol v2): ``root-1..N.key`` (offline; keep
    them apart), ``release.key`` (signs bundles and desired states; ``release.pub`` is its PEM
    for devices' ``trusted_keys``), ``online.key`` (the fleet server's) and ``root.json``,
    signed by every root key (a threshold of ``root_threshold`` of them verifies it)."""

    out = Path(out_dir)
    if not 1 <= root_threshold <= root_keys:
        raise KeyFileError(f"root threshold {root_threshold} needs between 1 and {root_keys} "
                           "root keys: pass `root_threshold=` at most `root_keys=`",
                           path=out, field="root_threshold")
    roots = [generate_key(out, f"root-{i + 1}", overwrite=overwrite) for i in range(root_keys)]
    release = generate_key(out, "release", overwrite=overwrite)
    online = generate_key(out, "online", overwrite=overwrite)
    signers = [load_signer(k.private_path) for k in roots]
    data = create_root(root_signers=signers, root_threshold=root_threshold,
                       release_keys=[load_public_key(release.public_path)],
                       online_keys=[load_public_key(online.public_path)], expires=expires)
    root_path = _write_root(out, data)
    pem = _write_pem(release)
    return FleetKeys(root_path, tuple(roots), root_threshold, release, pem, online)


def _write_pem(info: KeyInfo) -> Path:
    """``NAME.pub``: the PEM (SubjectPublicKeyInfo) form devices list in ``trusted_keys``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    pem = info.public_path.with_name(f"{info.name}.pub")
    raw = bytes.fromhex(load_public_key(info.public_path).keyval["public"])
    pem.write_bytes(Ed25519PublicKey.from_public_bytes(raw).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return pem


def _write_root(out: Path, data: bytes) -> Path:
    """``root.json`` (the newest) and ``{N}.root.json`` (every version, the chain devices walk)."""
    version = json.loads(data)["signed"]["version"]
    (out / f"{version}.root.json").write_bytes(data)
    tmp = out / "root.json.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, out / "root.json")
    return out / "root.json"


def root_history(keys_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(version, path)`` of every root version kept in ``keys_dir`` (``{N}.root.json``), oldest
    first; a ``root.json`` without its numbered copy (made before numbered copies existed)
    counts as its own version."""
    out = Path(keys_dir)
    found = {}
    for p in out.glob("*.root.json"):
        head = p.name.split(".", 1)[0]
        if head.isdigit():
            found[int(head)] = p
    current = out / "root.json"
    if current.exists():
        found.setdefault(_root_doc(current)["signed"]["version"], current)
    return sorted(found.items())


def _root_doc(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_bytes())
        doc["signed"]["version"] + 0
        return doc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise KeyFileError(f"{path} is not root metadata ({exc}); `keys init` writes one",
                           path=path) from None


@dataclass(frozen=True)
class RoleInfo:
    """One role of a root: how many of which keys must sign."""

    role: str                    # root, release, online
    threshold: int
    key_ids: tuple[str, ...]
    names: tuple[str, ...]       # the key files in the keys folder holding them ("" unknown)


@dataclass(frozen=True)
class RootInfo:
    """What :func:`describe_root` reads from root metadata."""

    path: Path
    version: int
    expires: str                 # ISO-8601 UTC
    roles: tuple[RoleInfo, ...]
    signed_by: tuple[str, ...]   # key ids of the signatures it carries
    history: tuple[int, ...]     # root versions kept next to it (the chain devices walk)

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "version": self.version, "expires": self.expires,
                "roles": {r.role: {"threshold": r.threshold, "key_ids": list(r.key_ids),
                                   "names": list(r.names)} for r in self.roles},
                "signed_by": list(self.signed_by), "history": list(self.history)}


def _key_names(folder: Path) -> dict[str, str]:
    names = {}
    for p in folder.glob("*.pub.json"):
        try:
            names[json.loads(p.read_bytes())["keyid"]] = p.name[:-len(".pub.json")]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return names


def describe_root(path: str | os.PathLike) -> RootInfo:
    """Roles, key ids, thresholds and expiry of root metadata (a ``root.json``, or a keys
    folder holding one); key ids are named after the key files next to it."""
    path = Path(path)
    if path.is_dir():
        path = path / "root.json"
    doc = _root_doc(path)
    signed = doc["signed"]
    names = _key_names(path.parent)
    roles = []
    for role, tuf_name in ROLE_NAMES.items():
        r = signed["roles"][tuf_name]
        roles.append(RoleInfo(role, r["threshold"], tuple(r["keyids"]),
                              tuple(names.get(k, "") for k in r["keyids"])))
    return RootInfo(path, signed["version"], signed["expires"], tuple(roles),
                    tuple(s["keyid"] for s in doc["signatures"]),
                    tuple(v for v, _ in root_history(path.parent)))


@dataclass(frozen=True)
class Rotation:
    """What :func:`rotate_keys` did: root ``from_version`` → ``to_version`` with new keys for
    ``role`` (written next to the root), the key ids it removed, and who signed."""

    role: str
    root: Path
    from_version: int
    to_version: int
    threshold: int
    new_keys: tuple[KeyInfo, ...]
    removed_key_ids: tuple[str, ...]
    signed_by: tuple[str, ...]
    pem: Path | None             # release rotations: the new key's PEM (build --key's pair)

    def to_json(self) -> dict[str, Any]:
        return {"role": self.role, "root": str(self.root), "from_version": self.from_version,
                "to_version": self.to_version, "threshold": self.threshold,
                "new_keys": [{"name": k.name, "key_id": k.key_id, "private": str(k.private_path),
                              "public": str(k.public_path)} for k in self.new_keys],
                "removed_key_ids": list(self.removed_key_ids),
                "signed_by": list(self.signed_by), "pem": str(self.pem) if self.pem else None}


def _next_names(folder: Path, role: str, count: int) -> list[str]:
    taken = {p.name.split(".", 1)[0] for p in folder.glob(f"{role}*")}
    names, i = [], 1
    while len(names) < count:
        i += 1
        if f"{role}-{i}" not in taken:
            names.append(f"{role}-{i}")
    return names


def _current_root_signers(folder: Path, root_keys: Sequence[str | os.PathLike],
                          signed: dict[str, Any]) -> list[Any]:
    """The current root's signing keys: ``root_keys`` given, else every ``*.key`` in the
    folder that holds the root role; refused when fewer than its threshold."""
    role = signed["roles"]["root"]
    paths = [Path(p) for p in root_keys] or sorted(folder.glob("*.key"))
    signers = []
    for p in paths:
        try:
            signer = load_signer(p)
        except KeyFileError:
            if root_keys:
                raise
            continue  # another kind of file in the keys folder
        if signer.public_key.keyid in role["keyids"]:
            signers.append(signer)
        elif root_keys:
            raise KeyFileError(f"{p} is not a root key of root v{signed['version']}",
                               path=p, field="root_keys")
    if len(signers) < role["threshold"]:
        raise KeyFileError(
            f"root v{signed['version']} needs {role['threshold']} of its root keys to sign the "
            f"next version; {len(signers)} found in {folder}: pass them with `root_keys=`",
            path=folder, field="root_keys")
    return signers


def rotate_keys(keys_dir: str | os.PathLike, role: str, *, count: int = 1,
                threshold: int = 1, root_keys: Sequence[str | os.PathLike] = (),
                expires: datetime | None = None) -> Rotation:
    """Replace ``role``'s keys (``root``, ``release`` or ``online``) with ``count`` new ones
    (``threshold`` of them must sign) and write root version N+1 next to root N in
    ``keys_dir`` (``root.json`` and ``{N+1}.root.json``).

    Root N+1 is signed by a threshold of root N's root keys (``root_keys``, else the root keys
    found in ``keys_dir``) and, for a root rotation, by the new root keys too: devices accept
    it only with both (docs/security.md). Nothing on the devices changes by hand: publish the
    chain (:func:`edgepack.host.fleet.root_publish.publish_root`) and they walk it.
    """
    from tuf.api.metadata import Metadata

    if role not in ROLE_NAMES:
        raise KeyFileError(f"unknown role {role!r}: rotate one of {', '.join(ROLE_NAMES)}",
                           path=None, field="role")
    if not 1 <= threshold <= count:
        raise KeyFileError(f"{role} threshold {threshold} needs between 1 and {count} new "
                           "keys: pass `threshold=` at most `count=`", path=None,
                           field="threshold")
    folder = Path(keys_dir)
    current_path = folder / "root.json"
    current = current_path.read_bytes() if current_path.exists() else None
    if current is None:
        raise KeyFileError(f"no root.json in {folder}: make the fleet's keys with `keys init` "
                           "first", path=current_path)
    old = _root_doc(current_path)["signed"]
    if not (folder / f"{old['version']}.root.json").exists():  # keep the chain complete
        (folder / f"{old['version']}.root.json").write_bytes(current)
    signers = _current_root_signers(folder, root_keys, old)
    new = [generate_key(folder, n) for n in _next_names(folder, role, count)]
    if role == "root":
        signers += [load_signer(k.private_path) for k in new]
    data = rotate_root(current, signers=signers, expires=expires,
                       roles={role: ([load_public_key(k.public_path) for k in new], threshold)})
    md = Metadata.from_bytes(data)
    check = md.signed.get_root_verification_result(Metadata.from_bytes(current).signed,
                                                   md.signed_bytes, md.signatures)
    if not check.verified:  # pragma: no cover - the signers above always satisfy both
        raise KeyFileError(f"root v{md.signed.version} would not verify on devices",
                           path=folder)
    tuf_name = ROLE_NAMES[role]
    removed = tuple(k for k in old["roles"][tuf_name]["keyids"]
                    if k not in md.signed.roles[tuf_name].keyids)
    path = _write_root(folder, data)
    return Rotation(role, path, old["version"], md.signed.version, threshold, tuple(new),
                    removed, tuple(sorted(md.signatures)),
                    _write_pem(new[0]) if role == "release" else None)
