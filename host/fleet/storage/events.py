"""The ``events`` table: install events devices report (download_started … installed,
health_failed, rolled_back, rejected, error)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from edgepack.host.fleet.storage.db import Cursor, Database, dumps, filters, loads, num, text

__all__ = ["EventRecord", "EventTally", "DeploymentSummary", "Events"]

_MAX_BODY = 64 * 1024  # an event body larger than this is stored without its extras


@dataclass(frozen=True)
class EventRecord:
    """One stored event; ``body`` is the whole message as the device sent it."""

    id: int
    fleet: str
    device_id: str
    ts: float | None
    received: float
    kind: str
    deployment_id: str | None = None
    bundle_id: str | None = None
    detail: str | None = None
    body: Any = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EventTally:
    """The events of one kind a device sent for one deployment: how many, when the last one
    arrived, a detail, and how many ``error`` events said the device gave up."""

    device_id: str
    deployment_id: str
    kind: str
    n: int
    last: float | None
    detail: str | None
    giving_up: int | None


@dataclass(frozen=True)
class DeploymentSummary:
    """A deployment as seen in events: first and last event time, device count."""

    deployment_id: str
    bundle_id: str | None
    first: float
    last: float
    devices: int


def event_row(fleet: str, device: str, received: float, e: dict) -> tuple:
    body = dumps(e)
    if len(body) > _MAX_BODY:
        body = dumps({k: e.get(k) for k in ("kind", "deployment_id", "bundle_id", "ts")}
                     | {"truncated": True})
    return (fleet, device, num(e.get("ts")), received, text(e.get("kind"), 64) or "unknown",
            text(e.get("deployment_id"), 128), text(e.get("bundle_id"), 64),
            text(e.get("detail"), 4000), body)


class Events:
    """Reads and writes of the ``events`` table."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def write(self, cur: Cursor, rows: Sequence[tuple]) -> None:
        """Insert :func:`event_row` rows; an event stored already is skipped."""
        cur.executemany(
            "INSERT INTO events (fleet, device_id, ts, received, kind, deployment_id, "
            "bundle_id, detail, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            rows)

    def list(self, fleet: str, *, device_id: str | None = None,
             deployment_id: str | None = None, kinds: Sequence[str] | None = None,
             after_id: int | None = None, limit: int = 200) -> list[EventRecord]:
        """Events of ``fleet``, newest first, filtered by device, deployment, kinds, id."""
        where, params = filters(("device_id = ?", device_id),
                                ("deployment_id = ?", deployment_id),
                                ("kind", list(kinds) if kinds else None), ("id > ?", after_id))
        rows = self._db.query(f"SELECT * FROM events WHERE fleet = ?{where} ORDER BY id DESC "
                              "LIMIT ?", [fleet, *params, int(limit)])
        return [EventRecord(**{**r, "body": loads(r["body"])}) for r in rows]

    def counts(self) -> dict[tuple[str, str], int]:
        """``{(fleet, kind): n}`` over every stored event: install outcomes for /metrics."""
        return {(r["fleet"], r["kind"]): int(r["n"]) for r in self._db.query(
            "SELECT fleet, kind, COUNT(*) AS n FROM events GROUP BY fleet, kind")}

    def deployments(self, fleet: str, limit: int = 50) -> list[DeploymentSummary]:
        """Deployments seen in events, newest first."""
        return [DeploymentSummary(**r) for r in self._db.query(
            "SELECT deployment_id, MIN(bundle_id) AS bundle_id, MIN(received) AS first, "
            "MAX(received) AS last, COUNT(DISTINCT device_id) AS devices FROM events "
            "WHERE fleet = ? AND deployment_id IS NOT NULL GROUP BY deployment_id "
            "ORDER BY MAX(received) DESC LIMIT ?", (fleet, int(limit)))]

    def tallies(self, fleet: str, deployment_ids: Sequence[str]) -> list[EventTally]:
        """Per device, deployment and kind: what the rollout engine and the deployments page
        read to tell how far each device got."""
        return [EventTally(**r) for r in self._db.query_in(
            "SELECT device_id, deployment_id, kind, COUNT(*) AS n, MAX(received) AS last, "
            "MAX(detail) AS detail, SUM(CASE WHEN detail LIKE ? THEN 1 ELSE 0 END) AS "
            "giving_up FROM events WHERE fleet = ? AND deployment_id IN {ids} "
            "GROUP BY device_id, deployment_id, kind", deployment_ids, ("%giving up%", fleet),
            part=200)]

    def prune(self, before: float) -> int:
        """Delete events received before ``before`` (retention); returns how many."""
        return self._db.execute("DELETE FROM events WHERE received < ?", (before,))
