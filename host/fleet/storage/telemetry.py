"""The ``telemetry`` table: the time series, one row per telemetry message."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from edgepack.host.fleet.storage.db import Cursor, Database, filters, integer, num, text

__all__ = ["TelemetryRecord", "TelemetryStats", "BudgetTally", "TelemetrySample", "Telemetry",
           "TELEMETRY_COLUMNS"]

TELEMETRY_COLUMNS = (
    "ts", "received", "bundle_id", "window_s", "inferences", "errors", "p50", "p95", "p99",
    "max_ms", "rss_mb", "peak_rss_mb", "cpu_percent", "temperature_c", "disk_free_mb",
    "uptime_s", "outbox_dropped",
)


@dataclass(frozen=True)
class TelemetryRecord:
    """One telemetry message as stored (latency in ms, memory in MB)."""

    ts: float
    received: float
    bundle_id: str | None = None
    window_s: float | None = None
    inferences: int | None = None
    errors: int | None = None
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    max_ms: float | None = None
    rss_mb: float | None = None
    peak_rss_mb: float | None = None
    cpu_percent: float | None = None
    temperature_c: float | None = None
    disk_free_mb: float | None = None
    uptime_s: float | None = None
    outbox_dropped: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TelemetryStats:
    """One device's telemetry since a time: count, worst p95 and memory, sums."""

    device_id: str
    n: int
    p95: float | None
    peak_rss_mb: float | None
    rss_mb: float | None
    errors: int | None
    inferences: int | None


@dataclass(frozen=True)
class BudgetTally:
    """How many of a device's reports went over a p95 / peak-RSS budget, and the worst."""

    device_id: str
    n: int
    bad: int
    p95: float | None
    rss: float | None


@dataclass(frozen=True)
class TelemetrySample:
    """One telemetry window as a rollout compares it: who, on which bundle, when, how many
    inferences and errors, and the window's p95 latency (ms)."""

    device_id: str
    bundle_id: str | None
    ts: float
    inferences: int | None
    errors: int | None
    p95: float | None


def telemetry_row(fleet: str, device_id: str, received: float, t: dict) -> tuple:
    """The ``telemetry`` table row of one telemetry message."""
    lat = t.get("latency_ms") if isinstance(t.get("latency_ms"), dict) else {}
    ts = num(t.get("ts")) or received
    return (fleet, device_id, ts, received, text(t.get("bundle_id"), 64), num(t.get("window_s")),
            integer(t.get("inferences")), integer(t.get("errors")), num(lat.get("p50")),
            num(lat.get("p95")), num(lat.get("p99")), num(lat.get("max")),
            num(t.get("rss_mb")), num(t.get("peak_rss_mb")), num(t.get("cpu_percent")),
            num(t.get("temperature_c")), num(t.get("disk_free_mb")), num(t.get("uptime_s")),
            integer(t.get("outbox_dropped")))


def summary(row: tuple, message: dict | None = None) -> str:
    """The JSON the ``devices`` row keeps of its newest telemetry row (reported columns only),
    plus the device's view of the control plane (``freshness``: status, age, withheld states;
    bounded, since a device's report is only as honest as the device)."""
    out = {c: v for c, v in zip(TELEMETRY_COLUMNS, row[2:], strict=True) if v is not None}
    f = (message or {}).get("freshness")
    if isinstance(f, dict) and isinstance(f.get("status"), str):
        behind = f.get("behind") if isinstance(f.get("behind"), list) else []
        out["freshness"] = {"status": f["status"][:16], "age_s": num(f.get("age_s")),
                            "behind": [text(b, 64) for b in behind[:10]]}
    return json.dumps(out, separators=(",", ":"))


class Telemetry:
    """Reads and writes of the ``telemetry`` table."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def write(self, cur: Cursor, rows: Sequence[tuple]) -> None:
        """Insert :func:`telemetry_row` rows; a message stored already is skipped."""
        cols = ", ".join(("fleet", "device_id") + TELEMETRY_COLUMNS)
        if cur.kind == "postgresql" and len(rows) > 20:
            # COPY into a per-transaction staging table, then one INSERT … SELECT: binding
            # parameters row by row costs more than the whole insert
            cur.execute("CREATE TEMP TABLE IF NOT EXISTS telemetry_in (LIKE telemetry) "
                        "ON COMMIT DELETE ROWS")
            cur.copy_rows(f"COPY telemetry_in ({cols}) FROM STDIN", rows)
            cur.execute(f"INSERT INTO telemetry ({cols}) SELECT {cols} FROM telemetry_in "
                        "ON CONFLICT DO NOTHING")
        else:
            cur.values_many(f"INSERT INTO telemetry ({cols}) VALUES ", rows,
                            " ON CONFLICT DO NOTHING")

    def series(self, fleet: str, device_id: str, *, since: float | None = None,
               until: float | None = None, limit: int = 5000) -> list[TelemetryRecord]:
        """Telemetry of one device, oldest first: the newest ``limit`` rows in the window."""
        where, params = filters(("ts >= ?", since), ("ts <= ?", until))
        rows = self._db.query(f"SELECT {', '.join(TELEMETRY_COLUMNS)} FROM telemetry WHERE "
                              f"fleet = ? AND device_id = ?{where} ORDER BY ts DESC LIMIT ?",
                              [fleet, device_id, *params, int(limit)])
        return [TelemetryRecord(**r) for r in reversed(rows)]

    def stats(self, fleet: str, device_ids: Sequence[str], *, since: float,
              bundle_id: str | None = None) -> dict[str, TelemetryStats]:
        """Per device since ``since``: message count and the worst p95 and peak RSS."""
        sql = ("SELECT device_id, COUNT(*) AS n, MAX(p95) AS p95, MAX(peak_rss_mb) AS "
               "peak_rss_mb, MAX(rss_mb) AS rss_mb, SUM(errors) AS errors, "
               "SUM(inferences) AS inferences FROM telemetry WHERE fleet = ? AND ts >= ? "
               "AND device_id IN {ids}")
        after: list[Any] = []
        if bundle_id is not None:
            sql += " AND bundle_id = ?"
            after.append(bundle_id)
        rows = self._db.query_in(sql + " GROUP BY device_id", device_ids, (fleet, since), after)
        return {r["device_id"]: TelemetryStats(**r) for r in rows}

    def over_budget(self, fleet: str, bundle_id: str, device_ids: Sequence[str], *,
                    since: float, p95_ms: float, peak_rss_mb: float) -> list[BudgetTally]:
        """Per device, its reports on ``bundle_id`` since ``since``: how many went over the
        p95 or peak-RSS budget (what a rollout's soak checks)."""
        return [BudgetTally(**r) for r in self._db.query_in(
            "SELECT device_id, COUNT(*) AS n, SUM(CASE WHEN p95 > ? OR peak_rss_mb > ? "
            "THEN 1 ELSE 0 END) AS bad, MAX(p95) AS p95, MAX(peak_rss_mb) AS rss "
            "FROM telemetry WHERE fleet = ? AND bundle_id = ? AND ts >= ? AND device_id IN "
            "{ids} GROUP BY device_id", device_ids,
            (p95_ms, peak_rss_mb, fleet, bundle_id, since))]

    def samples(self, fleet: str, device_ids: Sequence[str], *, since: float,
                until: float | None = None) -> list[TelemetrySample]:
        """The windows of ``device_ids`` within ``since <= ts < until``, oldest first (what a
        rollout's stage comparison reads)."""
        if not device_ids:
            return []
        sql = ("SELECT device_id, bundle_id, ts, inferences, errors, p95 FROM telemetry "
               "WHERE fleet = ? AND ts >= ? AND device_id IN {ids}")
        after: list[Any] = []
        if until is not None:
            sql += " AND ts < ?"
            after.append(until)
        rows = self._db.query_in(sql, device_ids, (fleet, since), after)
        return sorted((TelemetrySample(**r) for r in rows), key=lambda t: t.ts)

    def count(self, fleet: str | None = None) -> int:
        if fleet is None:
            return int(self._db.query_one("SELECT COUNT(*) AS n FROM telemetry")["n"])
        return int(self._db.query_one("SELECT COUNT(*) AS n FROM telemetry WHERE fleet = ?",
                                      (fleet,))["n"])

    def prune(self, before: float) -> int:
        """Delete rows received before ``before`` (retention); returns how many."""
        return self._db.execute("DELETE FROM telemetry WHERE received < ?", (before,))
