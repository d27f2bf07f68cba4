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
from collections.abc import Mapping
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

    def __init__(self, path: str | os.PathLike, max_bytes: int = 8 * 1024**2) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._db = sqlite3.connect(str(self.path), isolation_level=None,
                                   check_same_thread=False, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._bytes = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM outbox").fetchone()[0]

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
        return self._meta("dropped")

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]

    def put(self, topic: str, body: Mapping[str, Any] | bytes, *, qos: int = 1,
            retain: bool = False) -> int:
        """Append a message; a mapping is JSON-encoded with ``seq`` and ``ts`` added.

        Returns the ``seq`` (for bytes: the row id). Drops the oldest messages when over the bound.
        """
        self._db.execute("BEGIN IMMEDIATE")
        try:
            seq = self._meta("seq") + 1
            self._set_meta("seq", seq)
            if isinstance(body, Mapping):
                doc = dict(body)
                doc["seq"] = seq
                doc.setdefault("ts", time.time())
                payload = json.dumps(doc, separators=(",", ":"), sort_keys=True,
                                     default=str).encode()
            else:
                payload = bytes(body)
            size = len(payload) + len(topic) + 32
            self._db.execute(
                "INSERT INTO outbox(topic, payload, qos, retain, size, created) "
                "VALUES(?, ?, ?, ?, ?, ?)", (topic, payload, qos, int(retain), size, time.time()))
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
            self._db.execute("ROLLBACK")
            raise
        return seq

    def peek(self, limit: int, after_id: int = 0) -> list[OutboxRow]:
        """The oldest ``limit`` messages with an id above ``after_id``."""
        rows = self._db.execute(
            "SELECT id, topic, payload, qos, retain FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
            (after_id, limit)).fetchall()
        return [OutboxRow(r[0], r[1], bytes(r[2]), r[3], bool(r[4])) for r in rows]

    def ack(self, row_id: int) -> None:
        """The broker has the message: forget it."""
        row = self._db.execute("SELECT size FROM outbox WHERE id = ?", (row_id,)).fetchone()
        if row is not None:
            self._db.execute("DELETE FROM outbox WHERE id = ?", (row_id,))
            self._bytes -= row[0]
