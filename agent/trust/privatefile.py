"""Files only their owner may read: keys, the trusted root, the trust state (mode 0600).

Written atomically (temporary file, fsync, rename, fsync of the directory) so that a power cut
leaves the old or the new content, never a torn file, and never a moment with a wider mode.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from edgepack.agent.trust.errors import KeyFileError

__all__ = ["PRIVATE_MODE", "write_private", "read_private", "read_signer"]

PRIVATE_MODE = 0o600


def write_private(path: str | os.PathLike, data: bytes) -> Path:
    """Replace ``path`` with ``data``, mode 0600, atomically and durably."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_MODE)
    try:
        os.fchmod(fd, PRIVATE_MODE)  # an existing temporary file keeps its mode otherwise
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return path


def read_private(path: str | os.PathLike, what: str) -> bytes:
    """Read a file that must be 0600 (no group or other bits); KeyFileError otherwise."""
    path = Path(path)
    try:
        st = path.stat()
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {path}: {exc.strerror}", path=path) from None
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise KeyFileError(
            f"{what} {path} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"make it 0600 (chmod 600 {path}) and replace the key if others could read it",
            path=path)
    return data


def read_signer(path: str | os.PathLike, what: str) -> Any:
    """An Ed25519 private key file (PKCS#8 PEM, 0600) as a securesystemslib CryptoSigner."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from securesystemslib.signer import CryptoSigner, SSlibKey

    data = read_private(path, what)
    try:
        priv = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        priv = None
    if not isinstance(priv, Ed25519PrivateKey):
        raise KeyFileError(f"{what} {path} is not an unencrypted Ed25519 PEM private key "
                           "(a .pub.json file is the public half)", path=path)
    return CryptoSigner(priv, SSlibKey.from_crypto(priv.public_key()))
