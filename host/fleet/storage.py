"""Where the fleet collector keeps what devices said: SQLite (default) or PostgreSQL.

``open_storage(url)`` picks the backend from the URL:

* ``sqlite:///fleet.db`` (relative path), ``sqlite:////var/lib/edgepack/fleet.db`` (absolute), or
  a bare file path: SQLite in WAL mode, so the dashboard reads while the collector writes;
* ``postgresql://user[:password]@host[:5432]/dbname`` (``postgres://`` too): PostgreSQL through
  psycopg 3, for bigger fleets and several collectors.

Both backends share one schema and the same SQL (``?`` placeholders are rewritten for psycopg):

======================  =========================================================================
``devices``             one row per device: presence (retained state + LWT), board, target,
                        groups, active bundle, the last state and the last telemetry message
``telemetry``           the time series: one row per telemetry message (latency quantiles, RSS,
                        CPU, temperature, …)
``events``              install events (download_started … installed / health_failed / …)
``bundles``             manifests of published bundles (from the retained manifest messages),
                        and the build report once fetched
``desired``             the retained desired states (device- and group-level)
``rollouts``            staged rollouts, ``rollout_devices`` their devices, ``rollout_log`` what
                        happened; the rollout engine resumes from these after a restart
``meta``                schema version, leases, heartbeats
======================  =========================================================================

Writes come in batches (:class:`Batch`), one transaction each. :meth:`Storage.is_transient` tells
the collector which errors to retry (locked database, lost connection) and which to isolate.
"""

from __future__ import annotations

import contextlib
import json
import queue
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from edgepack.agent.errors import EdgepackError

__all__ = [
    "Storage",
    "StorageError",
    "Batch",
    "open_storage",
    "SCHEMA_VERSION",
    "TELEMETRY_COLUMNS",
]

SCHEMA_VERSION = 1
_MAX_BODY = 64 * 1024  # an event body larger than this is stored without its extras


class StorageError(EdgepackError):
    """The fleet database cannot be opened, created or used."""


TELEMETRY_COLUMNS = (
    "ts", "received", "bundle_id", "window_s", "inferences", "errors", "p50", "p95", "p99",
    "max_ms", "rss_mb", "peak_rss_mb", "cpu_percent", "temperature_c", "disk_free_mb",
    "uptime_s", "outbox_dropped",
)

_DDL = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY, value TEXT, updated DOUBLE PRECISION);
CREATE TABLE IF NOT EXISTS devices (
    fleet TEXT NOT NULL, device_id TEXT NOT NULL,
    online INTEGER, online_changed DOUBLE PRECISION, offline_reason TEXT,
    board TEXT, target TEXT, agent_version TEXT, groups_json TEXT,
    bundle_id TEXT, bundle_name TEXT, bundle_version TEXT, slot TEXT, phase TEXT,
    state TEXT, state_ts DOUBLE PRECISION,
    first_seen DOUBLE PRECISION, last_seen DOUBLE PRECISION,
    telemetry TEXT, telemetry_ts DOUBLE PRECISION,
    PRIMARY KEY (fleet, device_id));
CREATE TABLE IF NOT EXISTS telemetry (
    fleet TEXT NOT NULL, device_id TEXT NOT NULL,
    ts DOUBLE PRECISION NOT NULL, received DOUBLE PRECISION NOT NULL, bundle_id TEXT,
    window_s DOUBLE PRECISION, inferences BIGINT, errors BIGINT,
    p50 DOUBLE PRECISION, p95 DOUBLE PRECISION, p99 DOUBLE PRECISION, max_ms DOUBLE PRECISION,
    rss_mb DOUBLE PRECISION, peak_rss_mb DOUBLE PRECISION, cpu_percent DOUBLE PRECISION,
    temperature_c DOUBLE PRECISION, disk_free_mb DOUBLE PRECISION, uptime_s DOUBLE PRECISION,
    outbox_dropped BIGINT);
CREATE UNIQUE INDEX IF NOT EXISTS telemetry_device_ts ON telemetry (fleet, device_id, ts);
CREATE INDEX IF NOT EXISTS telemetry_received ON telemetry (received);
CREATE TABLE IF NOT EXISTS events (
    id {autoid}, fleet TEXT NOT NULL, device_id TEXT NOT NULL,
    ts DOUBLE PRECISION, received DOUBLE PRECISION NOT NULL, kind TEXT NOT NULL,
    deployment_id TEXT, bundle_id TEXT, detail TEXT, body TEXT);
CREATE INDEX IF NOT EXISTS events_deployment ON events (fleet, deployment_id);
CREATE UNIQUE INDEX IF NOT EXISTS events_once ON events (fleet, device_id, ts, kind);
CREATE INDEX IF NOT EXISTS events_device ON events (fleet, device_id, id);
CREATE INDEX IF NOT EXISTS events_received ON events (received);
CREATE TABLE IF NOT EXISTS bundles (
    fleet TEXT NOT NULL, bundle_id TEXT NOT NULL, name TEXT, version TEXT, target TEXT,
    bytes BIGINT, chunk_size BIGINT, chunks INTEGER, signed_by TEXT, manifest TEXT,
    report TEXT, report_error TEXT, published DOUBLE PRECISION, first_seen DOUBLE PRECISION,
    PRIMARY KEY (fleet, bundle_id));
CREATE TABLE IF NOT EXISTS desired (
    fleet TEXT NOT NULL, scope TEXT NOT NULL, name TEXT NOT NULL, deployment_id TEXT,
    bundle_id TEXT, bundle_name TEXT, version TEXT, allow_downgrade INTEGER,
    ts DOUBLE PRECISION, received DOUBLE PRECISION,
    PRIMARY KEY (fleet, scope, name));
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY, fleet TEXT NOT NULL, group_name TEXT NOT NULL,
    bundle_id TEXT NOT NULL, bundle_name TEXT, bundle_version TEXT, target TEXT,
    stages TEXT NOT NULL, max_failures TEXT NOT NULL, soak_s DOUBLE PRECISION NOT NULL,
    stage_timeout_s DOUBLE PRECISION NOT NULL, budgets TEXT, allow_downgrade INTEGER,
    state TEXT NOT NULL, stage INTEGER NOT NULL, stage_started DOUBLE PRECISION,
    soak_started DOUBLE PRECISION, created DOUBLE PRECISION, updated DOUBLE PRECISION,
    finished DOUBLE PRECISION, detail TEXT, previous_group_desired TEXT);
CREATE INDEX IF NOT EXISTS rollouts_fleet ON rollouts (fleet, created);
CREATE TABLE IF NOT EXISTS rollout_devices (
    rollout_id TEXT NOT NULL, device_id TEXT NOT NULL, stage INTEGER NOT NULL,
    deployment_id TEXT, status TEXT NOT NULL, previous TEXT,
    deployed_at DOUBLE PRECISION, installed_at DOUBLE PRECISION, updated DOUBLE PRECISION,
    detail TEXT,
    PRIMARY KEY (rollout_id, device_id));
CREATE TABLE IF NOT EXISTS rollout_log (
    id {autoid}, rollout_id TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL, message TEXT);
CREATE INDEX IF NOT EXISTS rollout_log_rollout ON rollout_log (rollout_id, id);
"""

_DEVICE_COLUMNS = ("fleet", "device_id", "online", "online_changed", "offline_reason", "board",
                   "target", "agent_version", "groups_json", "bundle_id", "bundle_name",
                   "bundle_version", "slot", "phase", "state", "state_ts", "first_seen",
                   "last_seen", "telemetry", "telemetry_ts")


# ------------------------------------------------------------------------------------- batches

@dataclass
class Batch:
    """What the collector writes in one transaction, in arrival order per kind.

    ``states``: ``(fleet, device_id, received, payload)`` where payload is the decoded state
    message (a presence-only message such as the LWT ``{"online": false}`` updates presence
    and keeps the rest). ``telemetry``: ``(fleet, device_id, received, payload)``. ``events``:
    ``(fleet, device_id, received, payload)``. ``bundles``: ``(fleet, received, table)`` where
    table is the decoded retained manifest message. ``desired``: ``(fleet, scope, name,
    received, payload or None)``; None clears it.
    """

    states: list[tuple[str, str, float, dict]] = field(default_factory=list)
    telemetry: list[tuple[str, str, float, dict]] = field(default_factory=list)
    events: list[tuple[str, str, float, dict]] = field(default_factory=list)
    bundles: list[tuple[str, float, dict]] = field(default_factory=list)
    desired: list[tuple[str, str, str, float, dict | None]] = field(default_factory=list)

    def __len__(self) -> int:
        return (len(self.states) + len(self.telemetry) + len(self.events) + len(self.bundles)
                + len(self.desired))

    def split(self) -> Iterator[Batch]:
        """One single-message batch per message (to isolate a message the database refuses)."""
        for name in ("states", "telemetry", "events", "bundles", "desired"):
            for item in getattr(self, name):
                b = Batch()
                getattr(b, name).append(item)
                yield b


def _num(v: Any) -> float | None:
    """A finite number as float; None for anything else (bool, str, NaN, inf)."""
    t = type(v)
    if t is float:
        return v if v - v == 0.0 else None  # false for NaN and ±inf
    if t is int:
        return float(v)
    return None


def _int(v: Any) -> int | None:
    f = _num(v)
    return int(f) if f is not None else None


def _str(v: Any, limit: int = 512) -> str | None:
    return v[:limit] if isinstance(v, str) else None


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, default=str)


def _loads(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def telemetry_row(fleet: str, device_id: str, received: float, t: dict) -> tuple:
    """The ``telemetry`` table row of one telemetry message."""
    lat = t.get("latency_ms") if isinstance(t.get("latency_ms"), dict) else {}
    ts = _num(t.get("ts")) or received
    return (fleet, device_id, ts, received, _str(t.get("bundle_id"), 64), _num(t.get("window_s")),
            _int(t.get("inferences")), _int(t.get("errors")), _num(lat.get("p50")),
            _num(lat.get("p95")), _num(lat.get("p99")), _num(lat.get("max")),
            _num(t.get("rss_mb")), _num(t.get("peak_rss_mb")), _num(t.get("cpu_percent")),
            _num(t.get("temperature_c")), _num(t.get("disk_free_mb")), _num(t.get("uptime_s")),
            _int(t.get("outbox_dropped")))


def _telemetry_summary(row: tuple) -> str:
    return json.dumps({c: v for c, v in zip(TELEMETRY_COLUMNS, row[2:], strict=True)
                       if v is not None}, separators=(",", ":"))


def _active(state: dict) -> dict:
    a = state.get("active")
    if isinstance(a, str):
        return {"bundle_id": a}
    return a if isinstance(a, dict) else {}


def _is_full_state(state: dict) -> bool:
    """A birth/agent state message (as opposed to the presence-only LWT)."""
    return any(k in state for k in ("target", "board", "active", "agent_version"))


# ------------------------------------------------------------------------------------- dialects

class _Dialect:
    name = "sqlite"
    autoid = "INTEGER PRIMARY KEY AUTOINCREMENT"
    greatest = "max"

    def sql(self, q: str) -> str:
        return q

    def same(self, a: str, b: str) -> str:
        return f"{a} IS {b}"


class _PgDialect(_Dialect):
    name = "postgresql"
    autoid = "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"
    greatest = "GREATEST"

    def sql(self, q: str) -> str:
        return q.replace("%", "%%").replace("?", "%s")

    def same(self, a: str, b: str) -> str:
        return f"{a} IS NOT DISTINCT FROM {b}"


class _Pool:
    """A few connections shared by threads (the collector's writer, HTTP handlers, rollouts)."""

    def __init__(self, factory: Any, size: int) -> None:
        self._factory = factory
        self._idle: queue.LifoQueue = queue.LifoQueue()
        self._sem = threading.BoundedSemaphore(size)
        self._all: list[Any] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def get(self, timeout: float = 30.0) -> Iterator[Any]:
        if not self._sem.acquire(timeout=timeout):
            raise StorageError(f"no database connection free within {timeout:g}s")
        conn = None
        try:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                conn = self._factory()
                with self._lock:
                    self._all.append(conn)
            yield conn
        except BaseException:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.rollback()
                if self._is_broken(conn):
                    self._drop(conn)
                    conn = None
            raise
        finally:
            if conn is not None:
                self._idle.put(conn)
            self._sem.release()

    @staticmethod
    def _is_broken(conn: Any) -> bool:
        return bool(getattr(conn, "broken", False) or getattr(conn, "closed", False) is True)

    def _drop(self, conn: Any) -> None:
        with contextlib.suppress(Exception):
            conn.close()
        with self._lock, contextlib.suppress(ValueError):
            self._all.remove(conn)

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for c in conns:
            with contextlib.suppress(Exception):
                c.close()


# ------------------------------------------------------------------------------------- storage

class Storage:
    """The fleet database. Thread-safe: every call borrows a pooled connection."""

    def __init__(self, url: str, dialect: _Dialect, factory: Any, *, pool_size: int = 8) -> None:
        self.url = url
        self.dialect = dialect
        self._pool = _Pool(factory, pool_size)
        self._transient: tuple[type[BaseException], ...] = ()

    # -- plumbing
    @property
    def kind(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.dialect.name

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> Storage:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def is_transient(self, exc: BaseException) -> bool:
        """True for errors worth retrying as they are (locked, disconnected, server restart)."""
        if isinstance(exc, sqlite3.OperationalError):
            msg = str(exc).lower()
            return any(s in msg for s in ("locked", "busy", "disk i/o", "unable to open"))
        return isinstance(exc, (*self._transient, StorageError))

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
        """A cursor inside one transaction: committed on success, rolled back on error."""
        with self._pool.get() as conn:
            cur = conn.cursor()
            try:
                if self.kind == "sqlite":
                    cur.execute("BEGIN IMMEDIATE")
                yield _Cursor(cur, self.dialect)
                conn.commit()
            except BaseException:
                with contextlib.suppress(Exception):
                    conn.rollback()
                raise
            finally:
                with contextlib.suppress(Exception):
                    cur.close()

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Rows of a read-only query as dicts."""
        with self._pool.get() as conn:
            cur = conn.cursor()
            try:
                cur.execute(self.dialect.sql(sql), tuple(params))
                cols = [d[0] for d in cur.description or ()]
                rows = [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
                conn.commit()  # end the read transaction (psycopg opens one)
                return rows
            finally:
                with contextlib.suppress(Exception):
                    cur.close()

    def query_one(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement in its own transaction; returns the row count."""
        with self.transaction() as cur:
            cur.execute(sql, params)
            return cur.rowcount

    def create_schema(self) -> None:
        ddl = _DDL.replace("{autoid}", self.dialect.autoid)
        with self.transaction() as cur:
            for stmt in (s.strip() for s in ddl.split(";")):
                if stmt:
                    cur.execute(stmt)
            cur.execute("SELECT value FROM meta WHERE key = ?", ("schema_version",))
            row = cur.fetchone()
            if row is None:
                cur.execute("INSERT INTO meta (key, value, updated) VALUES (?, ?, ?)",
                            ("schema_version", str(SCHEMA_VERSION), time.time()))
            elif int(row[0]) > SCHEMA_VERSION:
                raise StorageError(
                    f"the fleet database {self.safe_url} has schema version {row[0]}, newer than "
                    f"this edgepack understands ({SCHEMA_VERSION}): upgrade edgepack")

    @property
    def safe_url(self) -> str:
        """The URL without a password, for messages and logs."""
        parts = urlsplit(self.url)
        if parts.password:
            netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
            return parts._replace(netloc=netloc).geturl()
        return self.url

    # -- ingest
    def write_batch(self, batch: Batch) -> None:
        """Store one batch of messages in one transaction."""
        d = self.dialect
        with self.transaction() as cur:
            if batch.telemetry:
                rows = [telemetry_row(f, dev, rcv, t) for f, dev, rcv, t in batch.telemetry]
                cols = ", ".join(("fleet", "device_id") + TELEMETRY_COLUMNS)
                if self.kind == "postgresql" and len(rows) > 20:
                    # COPY into a per-transaction staging table, then one INSERT … SELECT:
                    # binding parameters row by row costs more than the whole insert
                    cur.execute("CREATE TEMP TABLE IF NOT EXISTS telemetry_in (LIKE telemetry) "
                                "ON COMMIT DELETE ROWS")
                    cur.copy_rows(f"COPY telemetry_in ({cols}) FROM STDIN", rows)
                    cur.execute(f"INSERT INTO telemetry ({cols}) SELECT {cols} FROM telemetry_in "
                                "ON CONFLICT DO NOTHING")
                else:
                    cur.values_many(f"INSERT INTO telemetry ({cols}) VALUES ", rows,
                                    " ON CONFLICT DO NOTHING")
                latest: dict[tuple[str, str], tuple] = {}
                for r in rows:
                    key = (r[0], r[1])
                    if key not in latest or r[2] >= latest[key][2]:
                        latest[key] = r
                dev_rows = [(r[0], r[1], r[3], r[3], _telemetry_summary(r), r[2])
                            for r in latest.values()]
                dcols = "fleet, device_id, first_seen, last_seen, telemetry, telemetry_ts"
                update = (
                    " ON CONFLICT (fleet, device_id) DO "
                    "UPDATE SET telemetry = CASE WHEN devices.telemetry_ts IS NULL OR "
                    "excluded.telemetry_ts >= devices.telemetry_ts THEN excluded.telemetry ELSE "
                    "devices.telemetry END, telemetry_ts = "
                    f"{d.greatest}(COALESCE(devices.telemetry_ts, 0), excluded.telemetry_ts), "
                    f"last_seen = {d.greatest}(COALESCE(devices.last_seen, 0), "
                    "excluded.last_seen)")
                if self.kind == "postgresql" and len(dev_rows) > 20:
                    cur.execute("CREATE TEMP TABLE IF NOT EXISTS devices_in (fleet TEXT, "
                                "device_id TEXT, first_seen DOUBLE PRECISION, last_seen DOUBLE "
                                "PRECISION, telemetry TEXT, telemetry_ts DOUBLE PRECISION) "
                                "ON COMMIT DELETE ROWS")
                    cur.copy_rows(f"COPY devices_in ({dcols}) FROM STDIN", dev_rows)
                    cur.execute(f"INSERT INTO devices ({dcols}) SELECT {dcols} FROM devices_in"
                                + update)
                else:
                    cur.values_many(f"INSERT INTO devices ({dcols}) VALUES ", dev_rows, update)
            for fleet, device, received, state in batch.states:
                self._write_state(cur, fleet, device, received, state)
            if batch.events:
                cur.executemany(
                    "INSERT INTO events (fleet, device_id, ts, received, kind, deployment_id, "
                    "bundle_id, detail, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    [_event_row(f, dev, rcv, e) for f, dev, rcv, e in batch.events])
                seen = {}
                for f, dev, rcv, _ in batch.events:
                    seen[(f, dev)] = rcv
                cur.executemany(
                    f"UPDATE devices SET last_seen = {d.greatest}(COALESCE(last_seen, 0), ?) "
                    "WHERE fleet = ? AND device_id = ?",
                    [(rcv, f, dev) for (f, dev), rcv in seen.items()])
            for fleet, received, table in batch.bundles:
                self._write_bundle(cur, fleet, received, table)
            for fleet, scope, name, received, payload in batch.desired:
                if payload is None:
                    cur.execute("DELETE FROM desired WHERE fleet = ? AND scope = ? AND name = ?",
                                (fleet, scope, name))
                    continue
                cur.execute(
                    "INSERT INTO desired (fleet, scope, name, deployment_id, bundle_id, "
                    "bundle_name, version, allow_downgrade, ts, received) VALUES "
                    "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (fleet, scope, name) DO UPDATE SET "
                    "deployment_id = excluded.deployment_id, bundle_id = excluded.bundle_id, "
                    "bundle_name = excluded.bundle_name, version = excluded.version, "
                    "allow_downgrade = excluded.allow_downgrade, ts = excluded.ts, "
                    "received = excluded.received",
                    (fleet, scope, name, _str(payload.get("deployment_id")),
                     _str(payload.get("bundle_id")), _str(payload.get("name")),
                     _str(payload.get("version")), int(bool(payload.get("allow_downgrade"))),
                     _num(payload.get("ts")), received))

    def _write_state(self, cur: _Cursor, fleet: str, device: str, received: float,
                     state: dict) -> None:
        d = self.dialect
        online = state.get("online")
        online_i = int(online) if isinstance(online, bool) else None
        changed = (f"online_changed = CASE WHEN {d.same('devices.online', 'excluded.online')} "
                   "THEN COALESCE(devices.online_changed, excluded.online_changed) "
                   "ELSE excluded.online_changed END")
        reason = None if online else _str(state.get("reason")) or ("clean shutdown" if
                                                                   online is False else None)
        ts = _num(state.get("ts"))
        if not _is_full_state(state):
            cur.execute(
                "INSERT INTO devices (fleet, device_id, online, online_changed, offline_reason, "
                "first_seen, last_seen, state_ts) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (fleet, device_id) DO UPDATE SET online = excluded.online, "
                f"{changed}, offline_reason = excluded.offline_reason, "
                f"last_seen = {d.greatest}(COALESCE(devices.last_seen, 0), excluded.last_seen)",
                (fleet, device, online_i, received, reason, received, received, ts))
            return
        active = _active(state)
        groups = state.get("groups")
        groups = [g for g in groups if isinstance(g, str)] if isinstance(groups, list) else None
        slot = state.get("slot", active.get("slot"))
        row = (fleet, device, online_i, received, reason, _str(state.get("board")),
               _str(state.get("target")), _str(state.get("agent_version")),
               _dumps(groups) if groups is not None else None,
               _str(active.get("bundle_id", active.get("id")), 64), _str(active.get("name")),
               _str(active.get("version")), _str(slot) if slot is not None else None,
               _str(state.get("phase")), _dumps(state), ts, received, received)
        cols = _DEVICE_COLUMNS[:18]
        updates = ", ".join(f"{c} = excluded.{c}" for c in cols[5:16])
        cur.execute(
            f"INSERT INTO devices ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
            "ON CONFLICT (fleet, device_id) DO UPDATE SET online = excluded.online, "
            f"{changed}, offline_reason = excluded.offline_reason, {updates}, "
            f"last_seen = {d.greatest}(COALESCE(devices.last_seen, 0), excluded.last_seen)",
            row)

    def _write_bundle(self, cur: _Cursor, fleet: str, received: float, table: dict) -> None:
        manifest = table.get("manifest") if isinstance(table.get("manifest"), dict) else {}
        sig = table.get("table_sig") if isinstance(table.get("table_sig"), dict) else None
        chunks = table.get("chunks")
        cur.execute(
            "INSERT INTO bundles (fleet, bundle_id, name, version, target, bytes, chunk_size, "
            "chunks, signed_by, manifest, published, first_seen) VALUES "
            "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (fleet, bundle_id) DO UPDATE SET "
            "name = excluded.name, version = excluded.version, target = excluded.target, "
            "bytes = excluded.bytes, chunk_size = excluded.chunk_size, chunks = excluded.chunks, "
            "signed_by = excluded.signed_by, manifest = excluded.manifest, "
            "published = excluded.published",
            (fleet, _str(table.get("bundle_id"), 64), _str(manifest.get("name")),
             _str(manifest.get("version")), _str(manifest.get("target")),
             _int(table.get("bytes")), _int(table.get("chunk_size")),
             len(chunks) if isinstance(chunks, list) else None,
             _str(sig.get("key_id")) if sig else None, _dumps(manifest),
             _num(table.get("ts")), received))

    def set_bundle_report(self, fleet: str, bundle_id: str, report: Any,
                          error: str | None = None) -> None:
        """Store a bundle's build report (``report.json``), or why it could not be read."""
        self.execute("UPDATE bundles SET report = ?, report_error = ? WHERE fleet = ? AND "
                     "bundle_id = ?", (_dumps(report) if report is not None else None, error,
                                       fleet, bundle_id))

    def add_bundle(self, fleet: str, table: dict, report: Any = None) -> None:
        """Record a bundle the host published itself (its manifest message and build report)."""
        with self.transaction() as cur:
            self._write_bundle(cur, fleet, time.time(), table)
        if report is not None:
            self.set_bundle_report(fleet, table["bundle_id"], report)

    # -- maintenance
    def prune(self, *, telemetry_before: float | None = None,
              events_before: float | None = None) -> dict[str, int]:
        """Delete telemetry and events received before the given unix times (retention)."""
        out = {"telemetry": 0, "events": 0}
        if telemetry_before is not None:
            out["telemetry"] = self.execute("DELETE FROM telemetry WHERE received < ?",
                                            (telemetry_before,))
        if events_before is not None:
            out["events"] = self.execute("DELETE FROM events WHERE received < ?",
                                         (events_before,))
        if self.kind == "sqlite" and (out["telemetry"] or out["events"]):
            with self._pool.get() as conn:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        return out

    def get_meta(self, key: str) -> str | None:
        row = self.query_one("SELECT value FROM meta WHERE key = ?", (key,))
        return row["value"] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.execute("INSERT INTO meta (key, value, updated) VALUES (?, ?, ?) ON CONFLICT (key) "
                     "DO UPDATE SET value = excluded.value, updated = excluded.updated",
                     (key, value, time.time()))

    def acquire_lease(self, name: str, owner: str, ttl_s: float) -> bool:
        """Hold the named lease for ``ttl_s`` (renewing it if ``owner`` holds it already).

        Several ``fleet serve`` processes may share a database; only the holder of the
        ``rollouts`` lease drives rollouts.
        """
        now = time.time()
        key = f"lease:{name}"
        with self.transaction() as cur:
            cur.execute("SELECT value FROM meta WHERE key = ?", (key,))
            row = cur.fetchone()
            if row is not None:
                held = _loads(row[0]) or {}
                if held.get("owner") != owner and float(held.get("until", 0)) > now:
                    return False
                cur.execute("UPDATE meta SET value = ?, updated = ? WHERE key = ?",
                            (_dumps({"owner": owner, "until": now + ttl_s}), now, key))
            else:
                cur.execute("INSERT INTO meta (key, value, updated) VALUES (?, ?, ?)",
                            (key, _dumps({"owner": owner, "until": now + ttl_s}), now))
        return True

    def release_lease(self, name: str, owner: str) -> None:
        key = f"lease:{name}"
        row = self.query_one("SELECT value FROM meta WHERE key = ?", (key,))
        if row and (_loads(row["value"]) or {}).get("owner") == owner:
            self.execute("DELETE FROM meta WHERE key = ?", (key,))

    # -- reads used by the dashboard, metrics and rollouts
    def fleets(self) -> list[str]:
        rows = self.query("SELECT DISTINCT fleet FROM devices UNION SELECT DISTINCT fleet FROM "
                          "rollouts UNION SELECT DISTINCT fleet FROM bundles")
        return sorted(r["fleet"] for r in rows)

    def devices(self, fleet: str, *, ids: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Device rows with ``groups``, ``state`` and ``telemetry`` decoded."""
        rows = self.query("SELECT * FROM devices WHERE fleet = ? ORDER BY device_id", (fleet,))
        if ids is not None:
            wanted = set(ids)
            rows = [r for r in rows if r["device_id"] in wanted]
        return [_device(r) for r in rows]

    def device(self, fleet: str, device_id: str) -> dict[str, Any] | None:
        row = self.query_one("SELECT * FROM devices WHERE fleet = ? AND device_id = ?",
                             (fleet, device_id))
        return _device(row) if row else None

    def telemetry(self, fleet: str, device_id: str, *, since: float | None = None,
                  until: float | None = None, limit: int = 5000) -> list[dict[str, Any]]:
        """Telemetry rows of one device, oldest first: the newest ``limit`` in the window."""
        sql = f"SELECT {', '.join(TELEMETRY_COLUMNS)} FROM telemetry WHERE fleet = ? AND " \
              "device_id = ?"
        params: list[Any] = [fleet, device_id]
        if since is not None:
            sql += " AND ts >= ?"
            params.append(since)
        if until is not None:
            sql += " AND ts <= ?"
            params.append(until)
        sql += " ORDER BY ts DESC LIMIT ?"
        params.append(int(limit))
        return list(reversed(self.query(sql, params)))

    def telemetry_stats(self, fleet: str, device_ids: Sequence[str], *, since: float,
                        bundle_id: str | None = None) -> dict[str, dict[str, Any]]:
        """Per device since ``since``: message count and the worst p95 and peak RSS."""
        if not device_ids:
            return {}
        out: dict[str, dict[str, Any]] = {}
        ids = list(device_ids)
        for i in range(0, len(ids), 500):
            part = ids[i:i + 500]
            sql = ("SELECT device_id, COUNT(*) AS n, MAX(p95) AS p95, MAX(peak_rss_mb) AS "
                   "peak_rss_mb, MAX(rss_mb) AS rss_mb, SUM(errors) AS errors, "
                   "SUM(inferences) AS inferences FROM telemetry WHERE fleet = ? AND ts >= ? "
                   f"AND device_id IN ({', '.join('?' * len(part))})")
            params: list[Any] = [fleet, since, *part]
            if bundle_id is not None:
                sql += " AND bundle_id = ?"
                params.append(bundle_id)
            for r in self.query(sql + " GROUP BY device_id", params):
                out[r["device_id"]] = r
        return out

    def count_telemetry(self, fleet: str | None = None) -> int:
        if fleet is None:
            return int(self.query_one("SELECT COUNT(*) AS n FROM telemetry")["n"])
        return int(self.query_one("SELECT COUNT(*) AS n FROM telemetry WHERE fleet = ?",
                                  (fleet,))["n"])

    def events(self, fleet: str, *, device_id: str | None = None,
               deployment_id: str | None = None, deployment_ids: Sequence[str] | None = None,
               kinds: Sequence[str] | None = None, after_id: int | None = None,
               limit: int = 200, newest_first: bool = True) -> list[dict[str, Any]]:
        sql = "SELECT * FROM events WHERE fleet = ?"
        params: list[Any] = [fleet]
        if device_id is not None:
            sql += " AND device_id = ?"
            params.append(device_id)
        if deployment_id is not None:
            sql += " AND deployment_id = ?"
            params.append(deployment_id)
        if deployment_ids is not None:
            if not deployment_ids:
                return []
            sql += f" AND deployment_id IN ({', '.join('?' * len(deployment_ids))})"
            params.extend(deployment_ids)
        if kinds:
            sql += f" AND kind IN ({', '.join('?' * len(kinds))})"
            params.extend(kinds)
        if after_id is not None:
            sql += " AND id > ?"
            params.append(after_id)
        sql += f" ORDER BY id {'DESC' if newest_first else 'ASC'} LIMIT ?"
        params.append(int(limit))
        rows = self.query(sql, params)
        for r in rows:
            r["body"] = _loads(r["body"])
        return rows

    def event_counts(self) -> list[dict[str, Any]]:
        """``(fleet, kind, n)`` over every stored event: install outcomes for /metrics."""
        return self.query("SELECT fleet, kind, COUNT(*) AS n FROM events GROUP BY fleet, kind")

    def deployment_summaries(self, fleet: str, limit: int = 50) -> list[dict[str, Any]]:
        """Deployments seen in events, newest first: first/last event time and device count."""
        return self.query(
            "SELECT deployment_id, MIN(bundle_id) AS bundle_id, MIN(received) AS first, "
            "MAX(received) AS last, COUNT(DISTINCT device_id) AS devices FROM events "
            "WHERE fleet = ? AND deployment_id IS NOT NULL GROUP BY deployment_id "
            "ORDER BY MAX(received) DESC LIMIT ?", (fleet, int(limit)))

    def deployment_kinds(self, fleet: str, deployment_id: str) -> list[dict[str, Any]]:
        """Per device and event kind of one deployment: count, newest detail, and how many
        ``error`` events gave up (``detail`` says so)."""
        return self.query(
            "SELECT device_id, kind, COUNT(*) AS n, MAX(id) AS last, MAX(detail) AS detail, "
            "SUM(CASE WHEN detail LIKE ? THEN 1 ELSE 0 END) AS giving_up FROM events "
            "WHERE fleet = ? AND deployment_id = ? GROUP BY device_id, kind",
            ("%giving up%", fleet, deployment_id))

    def event_kinds(self, fleet: str, deployment_ids: Sequence[str]) -> list[dict[str, Any]]:
        """Per device, deployment and kind: count, last ``received``, a detail, and how many
        ``error`` events gave up — what the rollout engine reads every tick."""
        out: list[dict[str, Any]] = []
        ids = list(deployment_ids)
        for i in range(0, len(ids), 200):
            part = ids[i:i + 200]
            out += self.query(
                "SELECT device_id, deployment_id, kind, COUNT(*) AS n, MAX(received) AS last, "
                "MAX(detail) AS detail, SUM(CASE WHEN detail LIKE ? THEN 1 ELSE 0 END) AS "
                "giving_up FROM events WHERE fleet = ? AND deployment_id IN "
                f"({', '.join('?' * len(part))}) GROUP BY device_id, deployment_id, kind",
                ("%giving up%", fleet, *part))
        return out

    def bundles(self, fleet: str) -> list[dict[str, Any]]:
        rows = self.query("SELECT fleet, bundle_id, name, version, target, bytes, chunk_size, "
                          "chunks, signed_by, published, first_seen, manifest FROM bundles "
                          "WHERE fleet = ? ORDER BY first_seen DESC", (fleet,))
        for r in rows:
            r["manifest"] = _loads(r["manifest"])
        return rows

    def bundle(self, fleet: str, bundle_id: str) -> dict[str, Any] | None:
        row = self.query_one("SELECT * FROM bundles WHERE fleet = ? AND bundle_id = ?",
                             (fleet, bundle_id))
        if row:
            row["manifest"] = _loads(row["manifest"])
            row["report"] = _loads(row["report"])
        return row

    def desired(self, fleet: str) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM desired WHERE fleet = ? ORDER BY scope, name", (fleet,))

    # -- rollouts
    def insert_rollout(self, row: dict[str, Any], devices: list[dict[str, Any]],
                       message: str) -> None:
        cols = list(row)
        with self.transaction() as cur:
            cur.execute(f"INSERT INTO rollouts ({', '.join(cols)}) VALUES "
                        f"({', '.join('?' * len(cols))})", [row[c] for c in cols])
            if devices:
                dcols = list(devices[0])
                cur.executemany(f"INSERT INTO rollout_devices ({', '.join(dcols)}) VALUES "
                                f"({', '.join('?' * len(dcols))})",
                                [[d[c] for c in dcols] for d in devices])
            cur.execute("INSERT INTO rollout_log (rollout_id, ts, message) VALUES (?, ?, ?)",
                        (row["id"], time.time(), message))

    def update_rollout(self, rollout_id: str, *, expect_state: str | None = None,
                       log: str | None = None, **fields: Any) -> bool:
        """Update a rollout's fields (only if it is in ``expect_state``); log a message."""
        fields["updated"] = time.time()
        sets = ", ".join(f"{k} = ?" for k in fields)
        sql = f"UPDATE rollouts SET {sets} WHERE id = ?"
        params = [*fields.values(), rollout_id]
        if expect_state is not None:
            sql += " AND state = ?"
            params.append(expect_state)
        with self.transaction() as cur:
            cur.execute(sql, params)
            ok = cur.rowcount > 0
            if ok and log:
                cur.execute("INSERT INTO rollout_log (rollout_id, ts, message) VALUES (?, ?, ?)",
                            (rollout_id, time.time(), log))
        return ok

    def update_rollout_devices(self, rollout_id: str, updates: list[dict[str, Any]]) -> None:
        """Update rows of ``rollout_devices``; each dict has ``device_id`` and the new fields."""
        if not updates:
            return
        now = time.time()
        with self.transaction() as cur:
            for u in updates:
                fields = {k: v for k, v in u.items() if k != "device_id"}
                fields["updated"] = now
                cur.execute(f"UPDATE rollout_devices SET {', '.join(f'{k} = ?' for k in fields)}"
                            " WHERE rollout_id = ? AND device_id = ?",
                            [*fields.values(), rollout_id, u["device_id"]])

    def add_rollout_log(self, rollout_id: str, message: str) -> None:
        self.execute("INSERT INTO rollout_log (rollout_id, ts, message) VALUES (?, ?, ?)",
                     (rollout_id, time.time(), message))

    def rollout(self, rollout_id: str) -> dict[str, Any] | None:
        row = self.query_one("SELECT * FROM rollouts WHERE id = ?", (rollout_id,))
        return _rollout(row) if row else None

    def rollouts(self, fleet: str | None = None, *, states: Sequence[str] | None = None,
                 limit: int = 100) -> list[dict[str, Any]]:
        sql, params = "SELECT * FROM rollouts WHERE 1 = 1", []
        if fleet is not None:
            sql += " AND fleet = ?"
            params.append(fleet)
        if states:
            sql += f" AND state IN ({', '.join('?' * len(states))})"
            params.extend(states)
        sql += " ORDER BY created DESC LIMIT ?"
        params.append(int(limit))
        return [_rollout(r) for r in self.query(sql, params)]

    def rollout_devices(self, rollout_id: str) -> list[dict[str, Any]]:
        rows = self.query("SELECT * FROM rollout_devices WHERE rollout_id = ? ORDER BY stage, "
                          "device_id", (rollout_id,))
        for r in rows:
            r["previous"] = _loads(r["previous"])
        return rows

    def rollout_log(self, rollout_id: str, limit: int = 200) -> list[dict[str, Any]]:
        return list(reversed(self.query(
            "SELECT ts, message FROM rollout_log WHERE rollout_id = ? ORDER BY id DESC LIMIT ?",
            (rollout_id, int(limit)))))


def _event_row(fleet: str, device: str, received: float, e: dict) -> tuple:
    body = _dumps(e)
    if len(body) > _MAX_BODY:
        body = _dumps({k: e.get(k) for k in ("kind", "deployment_id", "bundle_id", "ts")}
                      | {"truncated": True})
    return (fleet, device, _num(e.get("ts")), received, _str(e.get("kind"), 64) or "unknown",
            _str(e.get("deployment_id"), 128), _str(e.get("bundle_id"), 64),
            _str(e.get("detail"), 4000), body)


def _device(r: dict[str, Any]) -> dict[str, Any]:
    r = dict(r)
    r["groups"] = _loads(r.pop("groups_json", None)) or []
    r["state"] = _loads(r.get("state")) or {}
    r["telemetry"] = _loads(r.get("telemetry"))
    r["online"] = None if r.get("online") is None else bool(r["online"])
    return r


def _rollout(r: dict[str, Any]) -> dict[str, Any]:
    r = dict(r)
    r["stages"] = _loads(r["stages"]) or []
    r["budgets"] = _loads(r.get("budgets")) or {}
    r["previous_group_desired"] = _loads(r.get("previous_group_desired"))
    r["allow_downgrade"] = bool(r.get("allow_downgrade"))
    return r


class _Cursor:
    """A DB-API cursor that speaks ``?`` placeholders on both backends."""

    def __init__(self, cur: Any, dialect: _Dialect) -> None:
        self._cur = cur
        self._d = dialect

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        self._cur.execute(self._d.sql(sql), tuple(params))

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = [tuple(r) for r in rows]
        if rows:
            self._cur.executemany(self._d.sql(sql), rows)

    def values_many(self, prefix: str, rows: Sequence[Sequence[Any]], suffix: str = "") -> None:
        """``prefix (?, …), (?, …) … suffix`` in as few statements as the backend allows: one
        statement per few hundred rows is much cheaper than one per row, above all over a
        network to PostgreSQL."""
        if not rows:
            return
        width = len(rows[0])
        per = max(1, min(1000, 30000 // width))  # under SQLite's and PostgreSQL's bind limits
        one = "(" + ", ".join("?" * width) + ")"
        for i in range(0, len(rows), per):
            part = rows[i:i + per]
            sql = prefix + ", ".join([one] * len(part)) + suffix
            self._cur.execute(self._d.sql(sql), [v for r in part for v in r])

    def copy_rows(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """PostgreSQL ``COPY … FROM STDIN`` of ``rows``."""
        with self._cur.copy(sql) as copy:
            for r in rows:
                copy.write_row(r)

    def fetchone(self) -> Any:
        return self._cur.fetchone()

    def fetchall(self) -> list[Any]:
        return self._cur.fetchall()

    @property
    def rowcount(self) -> int:
        return self._cur.rowcount


# ------------------------------------------------------------------------------------- opening

def _sqlite_path(url: str) -> str:
    if url.startswith("sqlite:///"):
        return url[len("sqlite:///"):] or ":memory:"
    if url.startswith("sqlite://"):
        return url[len("sqlite://"):] or ":memory:"
    return url


def open_storage(url: str, *, create: bool = True, pool_size: int = 8) -> Storage:
    """Open (and by default create the schema of) the fleet database at ``url``."""
    if url.startswith(("postgresql://", "postgres://")):
        return _open_postgres(url, create=create, pool_size=pool_size)
    if "://" in url and not url.startswith("sqlite:"):
        raise StorageError(f"database URL {url!r} is neither sqlite:///PATH nor "
                           "postgresql://USER@HOST/DB")
    path = _sqlite_path(url)
    if path == ":memory:":
        raise StorageError("an in-memory SQLite database cannot be shared by the collector and "
                           "the dashboard: give a file, e.g. sqlite:///fleet.db")
    p = Path(path).expanduser()
    if not p.parent.exists():
        raise StorageError(f"cannot create the fleet database {p}: directory {p.parent} does not "
                           "exist")

    def factory() -> sqlite3.Connection:
        conn = sqlite3.connect(str(p), timeout=5.0, check_same_thread=False,
                               isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")
        return _SqliteConn(conn)

    try:
        storage = Storage(f"sqlite:///{p}", _Dialect(), factory, pool_size=pool_size)
        if create:
            storage.create_schema()
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open the fleet database {p}: {exc}") from None
    return storage


class _SqliteConn:
    """sqlite3 in autocommit mode with explicit BEGIN: commit/rollback only when in one."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def cursor(self) -> sqlite3.Cursor:
        return self._conn.cursor()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self._conn.execute(sql, params)

    def commit(self) -> None:
        if self._conn.in_transaction:
            self._conn.execute("COMMIT")

    def rollback(self) -> None:
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")

    def close(self) -> None:
        self._conn.close()


def _open_postgres(url: str, *, create: bool, pool_size: int) -> Storage:
    try:
        import psycopg
    except ImportError:
        raise StorageError("PostgreSQL needs psycopg: pip install 'edgepack[fleet]' (or "
                           "'psycopg[binary]')") from None
    conninfo = "postgresql://" + url.split("://", 1)[1]

    def factory() -> Any:
        return psycopg.connect(conninfo, connect_timeout=10, autocommit=False)

    storage = Storage(conninfo, _PgDialect(), factory, pool_size=pool_size)
    storage._transient = (psycopg.OperationalError, psycopg.InterfaceError,
                          psycopg.errors.AdminShutdown, psycopg.errors.SerializationFailure,
                          psycopg.errors.DeadlockDetected)
    if create:
        try:
            storage.create_schema()
        except psycopg.Error as exc:
            parts = urlsplit(conninfo)
            where = f"{parts.hostname}:{parts.port or 5432}/{unquote(parts.path.lstrip('/'))}"
            raise StorageError(f"cannot use the PostgreSQL database {where}: "
                               f"{str(exc).strip()}") from None
    return storage
