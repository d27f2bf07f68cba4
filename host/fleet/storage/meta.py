"""The ``meta`` table: schema version, leases between ``fleet serve`` processes, heartbeats."""

from __future__ import annotations

import time

from edgepack.host.fleet.storage.db import Database, dumps, loads

__all__ = ["Meta"]


class Meta:
    """Small keyed values, leases and heartbeats."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def get(self, key: str) -> str | None:
        row = self._db.query_one("SELECT value FROM meta WHERE key = ?", (key,))
        return row["value"] if row else None

    def set(self, key: str, value: str) -> None:
        self._db.execute("INSERT INTO meta (key, value, updated) VALUES (?, ?, ?) "
                         "ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
                         "updated = excluded.updated", (key, value, time.time()))

    def beat(self, name: str, info: dict) -> None:
        """Record that ``name`` (a collector) is alive, with what it says about itself."""
        self.set(f"collector:{name}", dumps({**info, "ts": time.time()}))

    def alive(self, within_s: float = 60.0) -> list[dict]:
        """Heartbeats of collectors written within the last ``within_s`` seconds."""
        rows = self._db.query("SELECT key, value FROM meta WHERE key LIKE ?", ("collector:%",))
        now = time.time()
        return [v for r in rows if now - ((v := loads(r["value"]) or {}).get("ts") or 0)
                < within_s]

    def acquire_lease(self, name: str, owner: str, ttl_s: float) -> bool:
        """Hold the named lease for ``ttl_s`` (renewing it if ``owner`` holds it already).

        Several ``fleet serve`` processes may share a database; only the holder of the
        ``rollouts`` lease drives rollouts.
        """
        now = time.time()
        key = f"lease:{name}"
        value = dumps({"owner": owner, "until": now + ttl_s})
        with self._db.transaction() as cur:
            cur.execute("SELECT value FROM meta WHERE key = ?", (key,))
            row = cur.fetchone()
            if row is not None:
                held = loads(row[0]) or {}
                if held.get("owner") != owner and float(held.get("until", 0)) > now:
                    return False
                cur.execute("UPDATE meta SET value = ?, updated = ? WHERE key = ?",
                            (value, now, key))
            else:
                cur.execute("INSERT INTO meta (key, value, updated) VALUES (?, ?, ?)",
                            (key, value, now))
        return True

    def release_lease(self, name: str, owner: str) -> None:
        key = f"lease:{name}"
        if (loads(self.get(key)) or {}).get("owner") == owner:
            self._db.execute("DELETE FROM meta WHERE key = ?", (key,))
