"""Write bundle v1 archives deterministically (the host side of ``edgepack.agent.bundle``)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.agent.bundle import MANIFEST, SCHEMA, SIGNATURE, read_bundle, validate_manifest
from edgepack.agent.errors import BundleError

__all__ = ["npz_bytes", "write_bundle"]

# Fixed zip metadata so the same inputs give the same bytes.
_EPOCH = (1980, 1, 1, 0, 0, 0)


def _zinfo(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_EPOCH)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    info.create_system = 3
    return info


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """An ``.npz`` file as bytes, reproducible (``np.savez`` stamps the current time)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name in sorted(arrays):
            arr = io.BytesIO()
            np.lib.format.write_array(arr, np.ascontiguousarray(arrays[name]),
                                      allow_pickle=False)
            zf.writestr(_zinfo(f"{name}.npy"), arr.getvalue())
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_bundle(out_path: str | os.PathLike, manifest: dict[str, Any], model_bytes: bytes,
                 files: Mapping[str, bytes], *, sign: Any = None) -> Path:
    """Fill in hashes, sign the manifest and write the archive atomically.

    ``manifest`` is completed in place with ``schema``, ``model.sha256``/``bytes`` and ``files``.
    ``sign`` is a callable ``bytes -> signature dict`` (``edgepack.host.keys.sign_bytes`` bound to
    a key) or None for an unsigned bundle. The file appears at ``out_path`` only when complete and
    readable; nothing partial is ever left behind.
    """
    out_path = Path(out_path)
    manifest["schema"] = SCHEMA
    manifest["model"]["sha256"] = _sha(model_bytes)
    manifest["model"]["bytes"] = len(model_bytes)
    manifest["files"] = {name: _sha(data) for name, data in sorted(files.items())}
    validate_manifest(manifest)
    manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"
    members: list[tuple[str, bytes]] = [(MANIFEST, manifest_bytes),
                                        (manifest["model"]["file"], model_bytes)]
    members += sorted(files.items())
    if sign is not None:
        members.append((SIGNATURE, json.dumps(sign(manifest_bytes), sort_keys=True).encode()))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=".edgepack", dir=out_path.parent)
    try:
        with os.fdopen(fd, "wb") as raw, zipfile.ZipFile(raw, "w") as zf:
            for name, data in members:
                zf.writestr(_zinfo(name), data)
        read_bundle(tmp)  # never ship what the device could not read
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if not out_path.exists():
        raise BundleError(f"bundle {out_path} was not written")
    return out_path
