"""The ``desired`` table: the retained desired states (device- and group-level)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from edgepack.host.fleet.storage.db import Cursor, Database, num, text

__all__ = ["DesiredRecord", "Desired"]


@dataclass(frozen=True)
class DesiredRecord:
    """What the host asked a device (``scope="device"``) or a group to run."""

    fleet: str
    scope: str
    name: str
    deployment_id: str | None = None
    bundle_id: str | None = None
    bundle_name: str | None = None
    version: str | None = None
    allow_downgrade: int | None = None
    ts: float | None = None
    received: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Desired:
    """Reads and writes of the ``desired`` table."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def write(self, cur: Cursor, fleet: str, scope: str, name: str, received: float,
              payload: dict | None) -> None:
        """Store a retained desired state; None (a cleared topic) deletes it."""
        if payload is None:
            cur.execute("DELETE FROM desired WHERE fleet = ? AND scope = ? AND name = ?",
                        (fleet, scope, name))
            return
        cur.execute(
            "INSERT INTO desired (fleet, scope, name, deployment_id, bundle_id, "
            "bundle_name, version, allow_downgrade, ts, received) VALUES "
            "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (fleet, scope, name) DO UPDATE SET "
            "deployment_id = excluded.deployment_id, bundle_id = excluded.bundle_id, "
            "bundle_name = excluded.bundle_name, version = excluded.version, "
            "allow_downgrade = excluded.allow_downgrade, ts = excluded.ts, "
            "received = excluded.received",
            (fleet, scope, name, text(payload.get("deployment_id")),
             text(payload.get("bundle_id")), text(payload.get("name")),
             text(payload.get("version")), int(bool(payload.get("allow_downgrade"))),
             num(payload.get("ts")), received))

    def list(self, fleet: str) -> list[DesiredRecord]:
        return [DesiredRecord(**r) for r in self._db.query(
            "SELECT * FROM desired WHERE fleet = ? ORDER BY scope, name", (fleet,))]

    def group(self, fleet: str, group: str) -> DesiredRecord | None:
        """The retained desired state of ``group``, if any."""
        row = self._db.query_one("SELECT * FROM desired WHERE fleet = ? AND scope = 'group' "
                                 "AND name = ?", (fleet, group))
        return DesiredRecord(**row) if row else None
