"""The ``drift_windows`` and ``drift_references`` tables: the devices' drift windows (one row per
telemetry message that carried one) and the reference profile (``drift.json``) of each bundle."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from edgepack.host.fleet.storage.db import Cursor, Database, filters, integer, num, text

__all__ = ["DriftWindowRecord", "DriftReferenceRecord", "DriftWindows", "drift_row"]

_COLUMNS = ("device_id", "ts", "received", "bundle_id", "ref", "calls", "sampled", "nrows",
            "payload")
_SELECT = ", ".join(_COLUMNS).replace("nrows", "nrows AS rows")


@dataclass(frozen=True)
class DriftWindowRecord:
    """One stored window: who sent it, for which bundle and reference, when; ``payload`` is the
    ``drift/1`` JSON as validated on arrival."""

    device_id: str
    ts: float
    received: float
    bundle_id: str | None
    ref: str
    calls: int
    sampled: int
    rows: int
    payload: str


@dataclass(frozen=True)
class DriftReferenceRecord:
    """A bundle's reference profile as fetched from its chunks: ``reference`` is the JSON text
    of ``drift.json``, None when the bundle has none (``error`` says why when it could not be
    read)."""

    bundle_id: str
    ref: str | None
    reference: str | None
    error: str | None


def drift_row(fleet: str, device_id: str, received: float, telemetry: dict, ref: str,
              counters: tuple[int, int, int], payload: str) -> tuple:
    """The ``drift_windows`` row of one telemetry message's validated window."""
    ts = num(telemetry.get("ts")) or received
    calls, sampled, rows = counters
    return (fleet, device_id, ts, received, text(telemetry.get("bundle_id"), 64), ref[:64],
            integer(calls), integer(sampled), integer(rows), payload)


class DriftWindows:
    """Reads and writes of the drift tables."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def write(self, cur: Cursor, rows: Sequence[tuple]) -> None:
        """Insert :func:`drift_row` rows; a window stored already is skipped."""
        cur.values_many(f"INSERT INTO drift_windows (fleet, {', '.join(_COLUMNS)}) VALUES ",
                        rows, " ON CONFLICT DO NOTHING")

    def windows(self, fleet: str, *, device_ids: Sequence[str] | None = None,
                bundle_id: str | None = None, since: float | None = None,
                until: float | None = None, limit: int = 20_000) -> list[DriftWindowRecord]:
        """Windows oldest first: the newest ``limit`` within ``since <= ts < until``."""
        if device_ids is not None and not device_ids:
            return []
        where, params = filters(("device_id", list(device_ids) if device_ids is not None
                                 else None), ("bundle_id = ?", bundle_id), ("ts >= ?", since),
                                ("ts < ?", until))
        rows = self._db.query(f"SELECT {_SELECT} FROM drift_windows WHERE "
                              f"fleet = ?{where} ORDER BY ts DESC LIMIT ?",
                              [fleet, *params, int(limit)])
        return [DriftWindowRecord(**r) for r in reversed(rows)]

    def count(self, fleet: str) -> int:
        return int(self._db.query_one("SELECT COUNT(*) AS n FROM drift_windows WHERE fleet = ?",
                                      (fleet,))["n"])

    def prune(self, before: float) -> int:
        """Delete windows received before ``before`` (retention, as telemetry); how many."""
        return self._db.execute("DELETE FROM drift_windows WHERE received < ?", (before,))

    # -- references
    def set_reference(self, fleet: str, bundle_id: str, ref: str | None,
                      reference: str | None, error: str | None = None) -> None:
        """Store a bundle's ``drift.json`` (or that it has none, or why it is unreadable)."""
        self._db.execute(
            "INSERT INTO drift_references (fleet, bundle_id, ref, reference, error) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (fleet, bundle_id) DO UPDATE SET "
            "ref = excluded.ref, reference = excluded.reference, error = excluded.error",
            (fleet, bundle_id, ref, reference, error))

    def reference(self, fleet: str, bundle_id: str) -> DriftReferenceRecord | None:
        """The stored reference of a bundle; None when it was not fetched yet."""
        row = self._db.query_one("SELECT bundle_id, ref, reference, error FROM drift_references "
                                 "WHERE fleet = ? AND bundle_id = ?", (fleet, bundle_id))
        return DriftReferenceRecord(**row) if row else None

    def references(self, fleet: str) -> dict[str, DriftReferenceRecord]:
        """Every fetched reference of ``fleet`` by bundle id."""
        rows: list[dict[str, Any]] = self._db.query(
            "SELECT bundle_id, ref, reference, error FROM drift_references WHERE fleet = ?",
            (fleet,))
        return {r["bundle_id"]: DriftReferenceRecord(**r) for r in rows}
