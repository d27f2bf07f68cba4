"""An on-disk outbox (SQLite) for telemetry and events: nothing is lost in a broker outage.

Messages are appended in order and deleted only when the broker acknowledged them (PUBACK), so
after a reconnect or an agent restart they are sent again from the oldest: delivery is
at-least-once and in order; each JSON message carries ``seq`` (strictly increasing per device)
so a consumer can drop duplicates. The outbox is bounded in bytes: when full, the oldest messages
are dropped and counted; the count is persisted and reported in telemetry (``outbox_dropped``).

Only the agent loop uses an :class:`Outbox` (SQLite connections are not shared across threads).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Outbox", "OutboxRow"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    size INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


_SPILL_MAX = 256  # messages kept in memory while the disk is full


def _disk_full(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR)
    return "full" in str(exc) or "disk I/O" in str(exc)


Encoder = Callable[[Mapping[str, Any]], bytes]


def _plain_encode(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True, default=str).encode()


@dataclass(frozen=True)
class OutboxRow:
    """One queued message."""

    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool


class Outbox:
    """A bounded FIFO of MQTT messages in a SQLite file."""

    def __init__(self, path: str | os.PathLike, max_bytes: int = 8 * 1024**2, *,
                 encode: Encoder | None = None) -> None:
        self.path = Path(path)
        #: serialises a mapping message (with ``seq`` and ``ts``); the agent passes its device
        #: identity's ``encode`` so every report is signed where it is serialised
        self.encode = encode or _plain_encode
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        #: why the database was found damaged and recreated at open (None: it was fine)
        self.recovered: str | None = None
        try:
            self._open()
        except sqlite3.DatabaseError as exc:
            # SQLITE_CORRUPT / SQLITE_NOTADB; a full disk or a permission problem is an
            # OperationalError and must not cost the queued messages
            if isinstance(exc, sqlite3.OperationalError):
                raise
            self._db.close()
            aside = self.path.with_name(f"{self.path.name}.damaged-{int(time.time())}")
            os.replace(self.path, aside)
            for suffix in ("-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            self._open()
            # consumers drop duplicates by (device_id, seq): the new numbering must stay above
            # whatever the lost database handed out, and a millisecond clock is
            self._seq = max(self._seq, int(time.time() * 1000))
            self._set_meta("seq", self._seq)
            self.recovered = (f"the outbox database {self.path} was damaged ({exc}); moved aside "
                              f"to {aside.name} with the messages it held, and started afresh")

    def _open(self) -> None:
        self._spill: list[OutboxRow] = []  # written while the disk was full: in memory only
        self._unacked: set[int] = set()  # acked while the disk was full: not yet deleted
        self._spill_dropped = 0
        self._db = sqlite3.connect(str(self.path), isolation_level=None,
                                   check_same_thread=False, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        check = self._db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(f"integrity check: {check}")
        self._bytes = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM outbox").fetchone()[0]
        # Messages kept in memory while the disk is full carry seqs the database never saw; the
        # highest is written in place into this small preallocated file (an overwrite needs no
        # free space), so a restart never hands one out again to a different message.
        self._seq_file = Path(f"{self.path}.seq")
        self._seq = max(self._meta("seq"), self._read_seq_file())
        if not self._seq_file.exists():
            self._write_seq_file(self._seq, create=True)
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        self._last_id = int(row[0]) if row else 0

    def _read_seq_file(self) -> int:
        try:
            value = int.from_bytes(self._seq_file.read_bytes()[:8], "big")
        except OSError:
            return 0
        return value if value < 1 << 62 else 0  # garbage: ignore

    def _write_seq_file(self, seq: int, create: bool = False) -> None:
        try:
            fd = os.open(self._seq_file, os.O_WRONLY | (os.O_CREAT if create else 0), 0o644)
        except OSError:
            return
        try:
            os.pwrite(fd, seq.to_bytes(8, "big"), 0)
            os.fsync(fd)
        except OSError:
            pass  # best effort: the database's own counter still holds everything written
        finally:
            os.close(fd)

    def close(self) -> None:
        self._db.close()

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE "
                         "SET value = excluded.value", (key, value))

    @property
    def dropped(self) -> int:
        """Messages dropped (oldest first) because the outbox was full, since it was created."""
        return self._meta("dropped") + self._spill_dropped

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] + len(self._spill)

    def put(self, topic: str, body: Mapping[str, Any] | bytes, *, qos: int = 1,
            retain: bool = False) -> int:
        """Append a message; a mapping is JSON-encoded with ``seq`` and ``ts`` added.

        Returns the ``seq`` (for bytes: the row id). Drops the oldest messages when over the bound.
        When the disk is full the message is kept in memory (at most ``_SPILL_MAX`` of them) and
        written to the database once there is room again: it is still sent, only not durably.
        """
        try:
            self._flush_spill()
            return self._put(topic, body, qos=qos, retain=retain)
        except sqlite3.OperationalError as exc:
            if not _disk_full(exc):
                raise
        seq = self._seq + 1
        payload = self._encode(body, seq) if isinstance(body, Mapping) else bytes(body)
        self._last_id += 1
        self._spill.append(OutboxRow(self._last_id, topic, payload, qos, retain))
        self._seq = seq
        self._write_seq_file(seq)
        while len(self._spill) > _SPILL_MAX:
            self._spill.pop(0)
            self._spill_dropped += 1
        return seq

    def _encode(self, body: Mapping[str, Any], seq: int) -> bytes:
        doc = dict(body)
        doc["seq"] = seq
        doc.setdefault("ts", time.time())
        return self.encode(doc)

    def _flush_spill(self) -> None:
        """Write what the full disk kept in memory (same ids, in order), and the acks that
        could not be recorded."""
        if not self._spill and not self._unacked and not self._spill_dropped:
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for row in self._spill:
                size = len(row.payload) + len(row.topic) + 32
                self._db.execute(
                    "INSERT INTO outbox(id, topic, payload, qos, retain, size, created) "
                    "VALUES(?, ?, ?, ?, ?, ?, ?)", (row.id, row.topic, row.payload, row.qos,
                                                    int(row.retain), size, time.time()))
            for rid in self._unacked:
                self._db.execute("DELETE FROM outbox WHERE id = ?", (rid,))
            self._set_meta("seq", max(self._meta("seq"), self._seq))
            self._set_meta("dropped", self._meta("dropped") + self._spill_dropped)
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        self._spill, self._unacked, self._spill_dropped = [], set(), 0
        self._bytes = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM outbox").fetchone()[0]

    def _put(self, topic: str, body: Mapping[str, Any] | bytes, *, qos: int,
             retain: bool) -> int:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            seq = max(self._meta("seq"), self._seq) + 1
            self._set_meta("seq", seq)
            payload = self._encode(body, seq) if isinstance(body, Mapping) else bytes(body)
            size = len(payload) + len(topic) + 32
            # explicit ids: a message kept in memory while the disk was full and acked before
            # it reached the database still used its id, which must not be handed out again
            row_id = self._last_id + 1
            self._db.execute(
                "INSERT INTO outbox(id, topic, payload, qos, retain, size, created) "
                "VALUES(?, ?, ?, ?, ?, ?, ?)", (row_id, topic, payload, qos, int(retain), size,
                                                time.time()))
            self._bytes += size
            dropped = 0
            while self._bytes > self.max_bytes:
                row = self._db.execute("SELECT id, size FROM outbox ORDER BY id LIMIT 1").fetchone()
                if row is None:
                    break
                self._db.execute("DELETE FROM outbox WHERE id = ?", (row[0],))
                self._bytes -= row[1]
                dropped += 1
            if dropped:
                self._set_meta("dropped", self._meta("dropped") + dropped)
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:  # SQLite may have rolled back already (disk full)
                self._db.execute("ROLLBACK")
            raise
        self._seq, self._last_id = seq, row_id
        return seq

    def peek(self, limit: int, after_id: int = 0) -> list[OutboxRow]:
        """The oldest ``limit`` messages with an id above ``after_id``."""
        rows = self._db.execute(
            "SELECT id, topic, payload, qos, retain FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
            (after_id, limit + len(self._unacked))).fetchall()
        out = [OutboxRow(r[0], r[1], bytes(r[2]), r[3], bool(r[4])) for r in rows
               if r[0] not in self._unacked]
        out += [r for r in self._spill if r.id > after_id]
        return out[:limit]

    def ack(self, row_id: int) -> None:
        """The broker has the message: forget it."""
        for i, r in enumerate(self._spill):
            if r.id == row_id:
                del self._spill[i]
                return
        try:
            row = self._db.execute("SELECT size FROM outbox WHERE id = ?", (row_id,)).fetchone()
            if row is not None:
                self._db.execute("DELETE FROM outbox WHERE id = ?", (row_id,))
                self._bytes -= row[0]
        except sqlite3.OperationalError as exc:
            if not _disk_full(exc):
                raise
            self._unacked.add(row_id)  # deleted with the next write that finds room
