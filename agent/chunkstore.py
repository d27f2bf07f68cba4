"""Where a transfer puts the chunks it fetched: on disk (the agent), or in memory (the fleet
simulator, which has no disk per device and never runs the model).

A :class:`ChunkStore` sees only verified chunks (the transfer checks each against the signed
chunk table) and answers for persistence: what survives a restart, and the final file.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Protocol

from edgepack.agent.bundle import sha256_file
from edgepack.agent.errors import TransferError
from edgepack.agent.files import atomic_write
from edgepack.agent.protocol import ChunkTable

__all__ = ["ChunkStore", "DiskChunks", "MemoryChunks", "chunk_length"]

_MB = 1024 * 1024


def chunk_length(table: ChunkTable, i: int) -> int:
    """The size of chunk ``i`` (the last one may be short)."""
    n = len(table.chunks)
    return table.chunk_size if i < n - 1 else table.bytes - table.chunk_size * (n - 1)


class ChunkStore(Protocol):
    """The transfer's sink. Every method may raise OSError (disk full, I/O error)."""

    #: where the chunks go, for messages
    where: str

    def finished(self) -> bool:
        """A complete download of this bundle is already there (a bad one is removed)."""

    def saved_table(self) -> bytes | None:
        """The chunk table a previous run saved, if any."""

    def begin(self, raw: bytes, table: ChunkTable) -> None:
        """Start afresh: keep ``raw`` (the table message) and open an empty download."""

    def resume(self, table: ChunkTable) -> bytearray:
        """Reopen a previous run's download: the bitmap of chunks still matching ``table``."""

    def write(self, i: int, offset: int, payload: bytes) -> None: ...

    def checkpoint(self, have: bytearray) -> None:
        """A window is complete: make it durable and record the bitmap."""

    def keep(self, have: bytearray) -> None:
        """Best effort on cancel or failure: record what arrived (never raises)."""

    def complete(self, table: ChunkTable) -> str:
        """Every chunk is in: the sha256 of the whole; kept as the result when it equals the
        bundle id, the partial download discarded otherwise."""

    def discard(self) -> None:
        """Forget the partial download and the saved table (a rejection, a damaged record)."""

    def close(self) -> None: ...

    def cleanup(self) -> None:
        """Remove everything of this bundle (after install, rejection, or cancel)."""


class DiskChunks:
    """``directory/{id}.part`` written at ``index * chunk_size``, the bitmap in
    ``{id}.progress.json``, the table in ``{id}.table.json``, the result ``{id}.edgepack``."""

    def __init__(self, bundle_id: str, directory: Path, *, min_free_mb: float = 64.0) -> None:
        self.bundle_id = bundle_id
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.min_free_mb = min_free_mb
        self.where = str(self.dir)
        self.part_path = self.dir / f"{bundle_id}.part"
        self.progress_path = self.dir / f"{bundle_id}.progress.json"
        self.table_path = self.dir / f"{bundle_id}.table.json"
        self.result_path = self.dir / f"{bundle_id}.edgepack"
        self._fd: int | None = None
        self._chunks = 0

    def finished(self) -> bool:
        if not self.result_path.exists():
            return False
        if sha256_file(self.result_path) == self.bundle_id:
            return True
        self.result_path.unlink(missing_ok=True)
        return False

    def saved_table(self) -> bytes | None:
        if not self.table_path.exists():
            return None
        try:
            return self.table_path.read_bytes()
        except OSError:
            return None

    def begin(self, raw: bytes, table: ChunkTable) -> None:
        self._check_space(table, 0)
        atomic_write(self.table_path, raw)
        self.part_path.unlink(missing_ok=True)
        self.progress_path.unlink(missing_ok=True)
        self._open(table)

    def resume(self, table: ChunkTable) -> bytearray:
        have = self._load_bitmap(len(table.chunks))
        self._verify(table, have)
        done = sum(bin(b).count("1") for b in have)
        self._check_space(table, done * table.chunk_size)
        self._open(table)
        return have

    def write(self, i: int, offset: int, payload: bytes) -> None:
        assert self._fd is not None
        if os.pwrite(self._fd, payload, offset) != len(payload):
            # a short write (disk filling up): the chunk is not on disk, do not mark it
            raise OSError(errno.ENOSPC, f"short write of chunk {i}")

    def checkpoint(self, have: bytearray) -> None:
        assert self._fd is not None
        os.fdatasync(self._fd)
        self._save_progress(have)

    def keep(self, have: bytearray) -> None:
        """The last record stays valid if the disk refuses: it only ever under-states what is
        there, so at worst chunks are fetched again."""
        if self._fd is None:
            return
        try:
            os.fsync(self._fd)
            self._save_progress(have)
        except OSError:
            pass

    def complete(self, table: ChunkTable) -> str:
        self.close()
        os.truncate(self.part_path, table.bytes)
        digest = sha256_file(self.part_path)
        if digest != self.bundle_id:
            self.part_path.unlink(missing_ok=True)
            self.progress_path.unlink(missing_ok=True)
            return digest
        os.replace(self.part_path, self.result_path)
        self.progress_path.unlink(missing_ok=True)
        self.table_path.unlink(missing_ok=True)
        return digest

    def discard(self) -> None:
        self.close()
        for p in (self.part_path, self.progress_path, self.table_path):
            p.unlink(missing_ok=True)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def cleanup(self) -> None:
        self.discard()
        self.result_path.unlink(missing_ok=True)

    # ---- internals
    def _open(self, table: ChunkTable) -> None:
        self._chunks = len(table.chunks)
        self._fd = os.open(self.part_path, os.O_RDWR | os.O_CREAT, 0o644)

    def _check_space(self, table: ChunkTable, on_disk: int) -> None:
        # The download, then the unpacked slot (at most about the bundle's size again).
        need = 2 * table.bytes - on_disk + self.min_free_mb * _MB
        free = shutil.disk_usage(self.dir).free
        if free < need:
            raise TransferError(
                f"not enough disk space for bundle {self.bundle_id[:12]}: {free / _MB:.0f} MB "
                f"free, {need / _MB:.0f} MB needed (download + unpack + transfer.min_free_mb). "
                "Free space on the device.", bundle_id=self.bundle_id)

    def _verify(self, table: ChunkTable, have: bytearray) -> None:
        """Chunks recorded as on disk must still match the signed table (a failing disk, a
        lost page after a power cut): any that do not are fetched again, instead of the whole
        file failing its hash at the end."""
        if not any(have):
            return
        with open(self.part_path, "rb") as f:
            for i in range(len(table.chunks)):
                if not have[i >> 3] >> (i & 7) & 1:
                    continue
                f.seek(i * table.chunk_size)
                if hashlib.sha256(f.read(chunk_length(table, i))).hexdigest() != table.chunks[i]:
                    have[i >> 3] &= ~(1 << (i & 7)) & 0xFF

    def _save_progress(self, have: bytearray) -> None:
        doc = {"bundle_id": self.bundle_id, "chunks": self._chunks,
               "have": base64.b64encode(bytes(have)).decode(), "ts": time.time()}
        atomic_write(self.progress_path, json.dumps(doc).encode(), durable=False)

    def _load_bitmap(self, n: int) -> bytearray:
        empty = bytearray((n + 7) // 8)
        if not self.part_path.exists():
            return empty
        try:
            doc = json.loads(self.progress_path.read_text())
            bits = bytearray(base64.b64decode(doc["have"]))
        except (OSError, ValueError, KeyError, TypeError):
            return empty
        return bits if len(bits) == len(empty) and doc.get("bundle_id") == self.bundle_id \
            else empty


class MemoryChunks:
    """Hashes chunks as they arrive and keeps only those not yet hashed (at most a window,
    since windows complete in order); nothing survives the process."""

    where = "memory"

    def __init__(self) -> None:
        self._hasher = hashlib.sha256()
        self._pending: dict[int, bytes] = {}
        self._next = 0

    def finished(self) -> bool:
        return False

    def saved_table(self) -> bytes | None:
        return None

    def begin(self, raw: bytes, table: ChunkTable) -> None:
        self.discard()

    def resume(self, table: ChunkTable) -> bytearray:
        self.discard()
        return bytearray((len(table.chunks) + 7) // 8)

    def write(self, i: int, offset: int, payload: bytes) -> None:
        self._pending[i] = payload
        while self._next in self._pending:
            self._hasher.update(self._pending.pop(self._next))
            self._next += 1

    def checkpoint(self, have: bytearray) -> None:
        pass

    def keep(self, have: bytearray) -> None:
        pass

    def complete(self, table: ChunkTable) -> str:
        return self._hasher.hexdigest()

    def discard(self) -> None:
        self._hasher = hashlib.sha256()
        self._pending.clear()
        self._next = 0

    def close(self) -> None:
        pass

    def cleanup(self) -> None:
        self.discard()
