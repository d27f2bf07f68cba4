"""Bundle v1 (``*.edgepack``): read, check and verify — the device side of the contract.

A bundle is a zip archive holding ``manifest.json``, the model, ``golden.npz``, ``report.json``
and ``signature.json``. The manifest names the sha256 of every other member and the signature
covers the exact bytes of the manifest, so one signature protects the whole bundle.

Reading never extracts a member the manifest does not name, never writes outside the target
directory, bounds every size (zip bombs), and checks every hash. The writer lives in
``edgepack.host.build.package``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepack.agent.errors import BundleError, SignatureError
from edgepack.agent.signing import verify_detached

__all__ = [
    "SCHEMA",
    "MANIFEST",
    "SIGNATURE",
    "Limits",
    "Bundle",
    "read_bundle",
    "validate_manifest",
    "sha256_file",
    "parse_version",
]

SCHEMA = "edgepack.bundle/1"
MANIFEST = "manifest.json"
SIGNATURE = "signature.json"
FORMATS = ("onnx", "tflite", "tflm")

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}(/[A-Za-z0-9_][A-Za-z0-9._-]{0,127})?$")
_SHA = re.compile(r"^[0-9a-f]{64}$")
_VERSION = re.compile(r"^(\d+)\.(\d+)\.(\d+)(?:[-+.]?([0-9A-Za-z.-]+))?$")


@dataclass(frozen=True)
class Limits:
    """Upper bounds a reader enforces before it trusts anything inside the archive."""

    max_bundle_bytes: int = 2 * 1024**3
    max_member_bytes: int = 2 * 1024**3
    max_manifest_bytes: int = 1024**2
    max_members: int = 64
    max_ratio: float = 200.0  # uncompressed / compressed: beyond this it is a zip bomb


def sha256_file(path: str | os.PathLike, bufsize: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in blocks; also the id of a bundle file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(bufsize):
            h.update(block)
    return h.hexdigest()


def parse_version(v: str) -> tuple:
    """Order versions like ``1.2.10 > 1.2.9``; a pre-release sorts before its release."""
    m = _VERSION.match(v or "")
    if not m:
        raise BundleError(f"version {v!r} is not MAJOR.MINOR.PATCH[-suffix]")
    major, minor, patch, pre = m.groups()
    return (int(major), int(minor), int(patch), 0 if pre else 1, pre or "")


def _require(d: Mapping, key: str, typ: type | tuple, where: str) -> Any:
    if key not in d:
        raise BundleError(f"manifest is missing '{where}{key}'")
    v = d[key]
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise BundleError(f"manifest field '{where}{key}' has the wrong type "
                          f"({type(v).__name__})")
    return v


def _check_tensors(specs: Any, where: str) -> None:
    if not isinstance(specs, list) or not specs:
        raise BundleError(f"manifest field '{where}' must be a non-empty list of tensors")
    for i, t in enumerate(specs):
        if not isinstance(t, Mapping):
            raise BundleError(f"manifest field '{where}[{i}]' must be an object")
        _require(t, "name", str, f"{where}[{i}].")
        _require(t, "dtype", str, f"{where}[{i}].")
        shape = _require(t, "shape", list, f"{where}[{i}].")
        if not all(isinstance(s, (int, str)) or s is None for s in shape):
            raise BundleError(f"manifest field '{where}[{i}].shape' must hold ints")


def validate_manifest(m: Any) -> dict:
    """Check the structure of a v1 manifest; return it. Raises BundleError naming the field."""
    if not isinstance(m, dict):
        raise BundleError("manifest is not a JSON object")
    schema = m.get("schema")
    if schema != SCHEMA:
        raise BundleError(f"bundle schema {schema!r} is not supported by this agent (it reads "
                          f"{SCHEMA!r}); upgrade edgepack on the device or rebuild the bundle")
    _require(m, "name", str, "")
    parse_version(_require(m, "version", str, ""))
    _require(m, "target", str, "")
    model = _require(m, "model", dict, "")
    f = _require(model, "file", str, "model.")
    if not _NAME.match(f) or f in (MANIFEST, SIGNATURE):
        raise BundleError(f"manifest names an unsafe model file {f!r}")
    if _require(model, "format", str, "model.") not in FORMATS:
        raise BundleError(f"model format {model['format']!r} is not one of {', '.join(FORMATS)}")
    if not _SHA.match(_require(model, "sha256", str, "model.")):
        raise BundleError("manifest field 'model.sha256' is not a sha256 hex digest")
    if _require(model, "bytes", int, "model.") < 0:
        raise BundleError("manifest field 'model.bytes' is negative")
    _check_tensors(model.get("inputs"), "model.inputs")
    _check_tensors(model.get("outputs"), "model.outputs")
    _require(_require(m, "runtime", dict, ""), "name", str, "runtime.")
    health = _require(m, "health", dict, "")
    _require(health, "golden", str, "health.")
    _require(m, "budgets", dict, "")
    files = _require(m, "files", dict, "")
    for name, digest in files.items():
        if not _NAME.match(name) or name in (MANIFEST, SIGNATURE, f):
            raise BundleError(f"manifest lists an unsafe or reserved file name {name!r}")
        if not isinstance(digest, str) or not _SHA.match(digest):
            raise BundleError(f"manifest hash for {name!r} is not a sha256 hex digest")
    if health["golden"] not in files:
        raise BundleError(f"health.golden {health['golden']!r} is not among the bundle's files")
    return m


@dataclass(frozen=True)
class Bundle:
    """A bundle whose structure and hashes have been checked (not yet its signature)."""

    path: Path
    bundle_id: str
    manifest: dict
    manifest_bytes: bytes
    signature: dict | None
    size: int
    _members: dict[str, zipfile.ZipInfo] = field(repr=False, default_factory=dict)

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def target(self) -> str:
        return self.manifest["target"]

    @property
    def model_file(self) -> str:
        return self.manifest["model"]["file"]

    def member_names(self) -> list[str]:
        return [self.model_file, *sorted(self.manifest["files"])]

    def verify(self, keys: Mapping[str, Any], *, allow_unsigned: bool = False) -> str | None:
        """Check the signature against trusted keys; return the key id (None if unsigned+allowed)."""
        if self.signature is None:
            if allow_unsigned:
                return None
            raise SignatureError(
                f"bundle {self.bundle_id[:12]} is not signed. Build it with --key, or set "
                "allow_unsigned = true (development only).", bundle_id=self.bundle_id)
        return verify_detached(self.manifest_bytes, self.signature, keys, what="bundle")

    def read_member(self, name: str, limits: Limits = Limits()) -> bytes:
        """Bytes of a member named by the manifest, checked against its hash."""
        expected = self._expected_hash(name)
        with zipfile.ZipFile(self.path) as zf:
            data = _read_bounded(zf, self._members[name], limits)
        if hashlib.sha256(data).hexdigest() != expected:
            raise BundleError(f"bundle member {name} does not match its hash in the manifest: the "
                              "bundle was modified or corrupted", bundle_id=self.bundle_id)
        return data

    def extract(self, dest: str | os.PathLike, limits: Limits = Limits()) -> Path:
        """Write the manifest, signature and every listed member into ``dest`` (fsynced)."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        root = dest.resolve()
        outputs = {MANIFEST: self.manifest_bytes}
        if self.signature is not None:
            outputs[SIGNATURE] = json.dumps(self.signature).encode()
        for name in self.member_names():
            outputs[name] = self.read_member(name, limits)
        for name, data in outputs.items():
            target = (dest / name).resolve()
            if root not in target.parents:
                raise BundleError(f"bundle member {name!r} would be written outside {dest}")
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        return dest

    def _expected_hash(self, name: str) -> str:
        if name == self.model_file:
            return self.manifest["model"]["sha256"]
        if name in self.manifest["files"]:
            return self.manifest["files"][name]
        raise BundleError(f"{name!r} is not a member named by the manifest")


def _read_bounded(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limits: Limits) -> bytes:
    cap = min(info.file_size, limits.max_member_bytes)
    buf = io.BytesIO()
    try:
        with zf.open(info) as f:
            while block := f.read(1 << 20):
                buf.write(block)
                if buf.tell() > cap:
                    raise BundleError(f"bundle member {info.filename} is larger than it declares "
                                      f"or than the {limits.max_member_bytes} byte limit")
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError,
            NotImplementedError) as exc:  # encrypted members, unknown compression
        raise BundleError(f"bundle member {info.filename} is corrupt ({exc}); the file is "
                          "damaged or truncated — fetch it again") from None
    return buf.getvalue()


def read_bundle(path: str | os.PathLike, limits: Limits = Limits(), *,
                bundle_id: str | None = None, check_hashes: bool = True) -> Bundle:
    """Open a bundle and check its structure and every member hash.

    Raises BundleError for anything that is not a well-formed v1 bundle: not a zip, truncated,
    extra/duplicate/unsafe members, missing members, oversized members, hash mismatches.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise BundleError(f"cannot read bundle {path}: {exc.strerror}") from None
    if size > limits.max_bundle_bytes:
        raise BundleError(f"bundle {path} is {size} bytes, over the {limits.max_bundle_bytes} "
                          "byte limit")
    bid = bundle_id or sha256_file(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise BundleError(f"{path} is not an edgepack bundle (not a zip archive, or truncated). "
                          "Rebuild it with 'edgepack build' or fetch it again.",
                          bundle_id=bid) from None
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_members:
            raise BundleError(f"bundle has {len(infos)} members (limit {limits.max_members})",
                              bundle_id=bid)
        members: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            name = info.filename
            if name in members:
                raise BundleError(f"bundle has a duplicate member {name!r}", bundle_id=bid)
            if name not in (MANIFEST, SIGNATURE) and not _NAME.match(name):
                raise BundleError(f"bundle has an unsafe member name {name!r}", bundle_id=bid)
            if info.file_size > limits.max_member_bytes or (
                    info.compress_size and info.file_size / info.compress_size > limits.max_ratio
                    and info.file_size > 1 << 20):
                raise BundleError(f"bundle member {name!r} expands to {info.file_size} bytes: "
                                  "refused as a possible zip bomb", bundle_id=bid)
            members[name] = info
        if MANIFEST not in members:
            raise BundleError(f"{path} has no {MANIFEST}: not an edgepack bundle", bundle_id=bid)
        if members[MANIFEST].file_size > limits.max_manifest_bytes:
            raise BundleError(f"{MANIFEST} is over {limits.max_manifest_bytes} bytes",
                              bundle_id=bid)
        manifest_bytes = _read_bounded(zf, members[MANIFEST], limits)
        try:
            manifest = json.loads(manifest_bytes)
        except (ValueError, RecursionError) as exc:  # also: huge integers, deep nesting
            raise BundleError(f"{MANIFEST} is not valid JSON ({exc})", bundle_id=bid) from None
        validate_manifest(manifest)
        signature = None
        if SIGNATURE in members:
            if members[SIGNATURE].file_size > 4096:
                raise BundleError(f"{SIGNATURE} is implausibly large", bundle_id=bid)
            try:
                signature = json.loads(_read_bounded(zf, members[SIGNATURE], limits))
            except (ValueError, RecursionError):
                raise BundleError(f"{SIGNATURE} is not valid JSON", bundle_id=bid) from None
            if not isinstance(signature, dict):
                raise BundleError(f"{SIGNATURE} is not a JSON object", bundle_id=bid)
        expected = {MANIFEST, manifest["model"]["file"], *manifest["files"]}
        extra = set(members) - expected - {SIGNATURE}
        if extra:
            raise BundleError(f"bundle holds members the manifest does not name: "
                              f"{', '.join(sorted(extra))}", bundle_id=bid)
        missing = expected - set(members)
        if missing:
            raise BundleError(f"bundle is missing {', '.join(sorted(missing))}", bundle_id=bid)
        if members[manifest["model"]["file"]].file_size != manifest["model"]["bytes"]:
            raise BundleError("model size differs from the manifest", bundle_id=bid)
    bundle = Bundle(path=path, bundle_id=bid, manifest=manifest, manifest_bytes=manifest_bytes,
                    signature=signature, size=size, _members=members)
    if check_hashes:
        for name in bundle.member_names():
            bundle.read_member(name, limits)
    return bundle
