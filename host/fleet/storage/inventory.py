"""The ``enrollments`` table: the fleet's device inventory, kept by the operator.

One row per enrolled device: its public key (the ``{"keyid", "key"}`` a device prints at
``agent init``), the groups the operator puts it in, when it was enrolled and, once revoked,
when. The collector believes a report only when the enrolled, unrevoked key of its device
signed it; rollouts reach devices through these groups, never through what a device claims.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from edgepack.host.fleet.storage.db import Database, StorageError, dumps, loads

__all__ = ["EnrollmentRecord", "Inventory"]


@dataclass(frozen=True)
class EnrollmentRecord:
    """One enrolled device."""

    fleet: str
    device_id: str
    key_id: str
    key: dict[str, Any]
    groups: tuple[str, ...]
    enrolled_at: float
    revoked_at: float | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def enrollment(self) -> dict[str, Any]:
        """The ``{"keyid", "key"}`` object the report verifier takes."""
        return {"keyid": self.key_id, "key": self.key}

    @classmethod
    def from_row(cls, r: Mapping[str, Any]) -> EnrollmentRecord:
        return cls(fleet=r["fleet"], device_id=r["device_id"], key_id=r["key_id"],
                   key=loads(r["key"]) or {}, groups=tuple(loads(r["groups_json"]) or ()),
                   enrolled_at=r["enrolled_at"], revoked_at=r["revoked_at"])

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(groups=list(self.groups), revoked=self.revoked)
        return out


class Inventory:
    """Reads and writes of the ``enrollments`` table."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def enroll(self, fleet: str, device_id: str, key_id: str, key: Mapping[str, Any],
               groups: Sequence[str]) -> EnrollmentRecord:
        """Enroll (or enroll again, with a new key or groups, un-revoking) a device."""
        self.enroll_many(fleet, [(device_id, key_id, key, groups)])
        rec = self.get(fleet, device_id)
        assert rec is not None
        return rec

    def enroll_many(self, fleet: str,
                    devices: Sequence[tuple[str, str, Mapping[str, Any], Sequence[str]]]) -> None:
        """:meth:`enroll` ``(device_id, key_id, key, groups)`` for many, in one transaction."""
        now = time.time()
        with self._db.transaction() as cur:
            cur.executemany(
                "INSERT INTO enrollments (fleet, device_id, key_id, key, groups_json, "
                "enrolled_at, revoked_at, updated) VALUES (?, ?, ?, ?, ?, ?, NULL, ?) "
                "ON CONFLICT (fleet, device_id) DO UPDATE SET key_id = excluded.key_id, "
                "key = excluded.key, groups_json = excluded.groups_json, "
                "enrolled_at = excluded.enrolled_at, revoked_at = NULL, "
                "updated = excluded.updated",
                [(fleet, dev, key_id, json.dumps(dict(key), sort_keys=True),
                  dumps(list(groups)), now, now) for dev, key_id, key, groups in devices])

    def revoke(self, fleet: str, device_id: str) -> EnrollmentRecord:
        """Stop believing a device's key; StorageError when it is not enrolled."""
        now = time.time()
        n = self._db.execute("UPDATE enrollments SET revoked_at = COALESCE(revoked_at, ?), "
                             "updated = ? WHERE fleet = ? AND device_id = ?",
                             (now, now, fleet, device_id))
        if not n:
            raise StorageError(f"device {device_id!r} is not enrolled in fleet {fleet!r}: "
                               "nothing to revoke", field="device")
        rec = self.get(fleet, device_id)
        assert rec is not None
        return rec

    def get(self, fleet: str, device_id: str) -> EnrollmentRecord | None:
        row = self._db.query_one("SELECT * FROM enrollments WHERE fleet = ? AND device_id = ?",
                                 (fleet, device_id))
        return EnrollmentRecord.from_row(row) if row else None

    def list(self, fleet: str) -> list[EnrollmentRecord]:
        """Every enrolled device of ``fleet`` (revoked ones too), by device id."""
        return [EnrollmentRecord.from_row(r) for r in self._db.query(
            "SELECT * FROM enrollments WHERE fleet = ? ORDER BY device_id", (fleet,))]

    def active(self, fleets: Sequence[str]) -> dict[tuple[str, str], EnrollmentRecord]:
        """``{(fleet, device_id): record}`` of the unrevoked enrollments of ``fleets``."""
        rows = self._db.query_in("SELECT * FROM enrollments WHERE revoked_at IS NULL AND "
                                 "fleet IN {ids}", list(fleets))
        return {(r["fleet"], r["device_id"]): EnrollmentRecord.from_row(r) for r in rows}

    def version(self) -> tuple[int, float]:
        """Changes whenever a device is enrolled or revoked (the collector reloads then)."""
        row = self._db.query_one("SELECT COUNT(*) AS n, MAX(updated) AS t FROM enrollments")
        return (int(row["n"]), float(row["t"] or 0.0)) if row else (0, 0.0)
