"""The fleet database connection: SQLite or PostgreSQL, a small pool, ``?`` placeholders on
both, one schema with a version number.

Repositories (one per table, in this package) borrow cursors from :class:`Database`; SQL lives
only in this package.
"""

from __future__ import annotations

import contextlib
import json
import queue
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from edgepack.agent.errors import EdgepackError

__all__ = ["Database", "StorageError", "Cursor", "open_database", "SCHEMA_VERSION"]

# 2: drift_windows and drift_references (added by the CREATE … IF NOT EXISTS below; a version 1
# database gains them when opened and is marked 2).
# Additions an older edgepack can ignore keep the version: the enrollments table (created
# above) and the devices columns of _ADDED_COLUMNS, added to any database that lacks them.
SCHEMA_VERSION = 2


class StorageError(EdgepackError):
    """The fleet database cannot be opened, created or used."""


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
    key_id TEXT, claimed_groups TEXT, unauthenticated BIGINT, auth_error TEXT,
    PRIMARY KEY (fleet, device_id));
CREATE TABLE IF NOT EXISTS enrollments (
    fleet TEXT NOT NULL, device_id TEXT NOT NULL, key_id TEXT NOT NULL, key TEXT NOT NULL,
    groups_json TEXT NOT NULL, enrolled_at DOUBLE PRECISION NOT NULL,
    revoked_at DOUBLE PRECISION, updated DOUBLE PRECISION NOT NULL,
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
CREATE TABLE IF NOT EXISTS rollout_checks (
    rollout_id TEXT PRIMARY KEY, checks TEXT, comparison TEXT, halt TEXT,
    updated DOUBLE PRECISION);
CREATE TABLE IF NOT EXISTS drift_windows (
    fleet TEXT NOT NULL, device_id TEXT NOT NULL,
    ts DOUBLE PRECISION NOT NULL, received DOUBLE PRECISION NOT NULL, bundle_id TEXT,
    ref TEXT NOT NULL, calls BIGINT, sampled BIGINT, nrows BIGINT, payload TEXT NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS drift_windows_device_ts ON drift_windows (fleet, device_id, ts);
CREATE INDEX IF NOT EXISTS drift_windows_bundle ON drift_windows (fleet, bundle_id, ts);
CREATE INDEX IF NOT EXISTS drift_windows_received ON drift_windows (received);
CREATE TABLE IF NOT EXISTS drift_references (
    fleet TEXT NOT NULL, bundle_id TEXT NOT NULL, ref TEXT, reference TEXT, error TEXT,
    PRIMARY KEY (fleet, bundle_id));
"""


# columns added to tables an older database has: (table, column, type)
_ADDED_COLUMNS = (
    ("devices", "key_id", "TEXT"), ("devices", "claimed_groups", "TEXT"),
    ("devices", "unauthenticated", "BIGINT"), ("devices", "auth_error", "TEXT"),
)


# ------------------------------------------------------------------------------ column values

def num(v: Any) -> float | None:
    """A finite number as float; None for anything else (bool, str, NaN, inf)."""
    t = type(v)
    if t is float:
        return v if v - v == 0.0 else None  # false for NaN and ±inf
    if t is int:
        return float(v)
    return None


def integer(v: Any) -> int | None:
    f = num(v)
    return int(f) if f is not None else None


def text(v: Any, limit: int = 512) -> str | None:
    return v[:limit] if isinstance(v, str) else None


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, default=str)


def loads(raw: str | None) -> Any:
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def placeholders(n: int) -> str:
    return ", ".join("?" * n)


def filters(*conditions: tuple[str, Any]) -> tuple[str, list[Any]]:
    """`` AND …`` for each ``(clause, value)`` whose value is given, and their parameters: a
    sequence value becomes ``clause IN (…)``, anything else binds the clause's one ``?``."""
    sql, params = "", []
    for clause, value in conditions:
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            sql += f" AND {clause} IN ({placeholders(len(value))})"
            params.extend(value)
        else:
            sql += f" AND {clause}"
            params.append(value)
    return sql, params


# ------------------------------------------------------------------------------ dialects

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


class Cursor:
    """A DB-API cursor that speaks ``?`` placeholders on both backends."""

    def __init__(self, cur: Any, dialect: _Dialect) -> None:
        self._cur = cur
        self.dialect = dialect

    @property
    def kind(self) -> str:
        return self.dialect.name

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        self._cur.execute(self.dialect.sql(sql), tuple(params))

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = [tuple(r) for r in rows]
        if rows:
            self._cur.executemany(self.dialect.sql(sql), rows)

    def values_many(self, prefix: str, rows: Sequence[Sequence[Any]], suffix: str = "") -> None:
        """``prefix (?, …), (?, …) … suffix`` in as few statements as the backend allows: one
        statement per few hundred rows is much cheaper than one per row, above all over a
        network to PostgreSQL."""
        if not rows:
            return
        width = len(rows[0])
        per = max(1, min(1000, 30000 // width))  # under SQLite's and PostgreSQL's bind limits
        one = "(" + placeholders(width) + ")"
        for i in range(0, len(rows), per):
            part = rows[i:i + per]
            sql = prefix + ", ".join([one] * len(part)) + suffix
            self._cur.execute(self.dialect.sql(sql), [v for r in part for v in r])

    def copy_rows(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """PostgreSQL ``COPY … FROM STDIN`` of ``rows``."""
        with self._cur.copy(sql) as copy:
            for r in rows:
                copy.write_row(r)

    def fetchone(self) -> Any:
        return self._cur.fetchone()

    def columns(self, table: str) -> set[str]:
        """The column names of ``table``."""
        self._cur.execute(f"SELECT * FROM {table} WHERE 1 = 0")
        names = {d[0] for d in self._cur.description or ()}
        self._cur.fetchall()
        return names

    @property
    def rowcount(self) -> int:
        return self._cur.rowcount


class Database:
    """Pooled connections to the fleet database. Thread-safe: every call borrows one."""

    def __init__(self, url: str, dialect: _Dialect, factory: Any, *, pool_size: int = 8) -> None:
        self.url = url
        self.dialect = dialect
        self._pool = _Pool(factory, pool_size)
        self._transient: tuple[type[BaseException], ...] = ()

    @property
    def kind(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.dialect.name

    @property
    def safe_url(self) -> str:
        """The URL without a password, for messages and logs."""
        parts = urlsplit(self.url)
        if parts.password:
            netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
            return parts._replace(netloc=netloc).geturl()
        return self.url

    def close(self) -> None:
        self._pool.close()

    def is_transient(self, exc: BaseException) -> bool:
        """True for errors worth retrying as they are (locked, disconnected, server restart)."""
        if isinstance(exc, sqlite3.OperationalError):
            msg = str(exc).lower()
            return any(s in msg for s in ("locked", "busy", "disk i/o", "unable to open"))
        return isinstance(exc, (*self._transient, StorageError))

    @contextlib.contextmanager
    def connection(self) -> Iterator[Any]:
        """A raw pooled connection (for backend-specific statements such as PRAGMAs)."""
        with self._pool.get() as conn:
            yield conn

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Cursor]:
        """A cursor inside one transaction: committed on success, rolled back on error."""
        with self._pool.get() as conn:
            cur = conn.cursor()
            try:
                if self.kind == "sqlite":
                    cur.execute("BEGIN IMMEDIATE")
                yield Cursor(cur, self.dialect)
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

    def query_in(self, sql: str, ids: Sequence[Any], before: Sequence[Any] = (),
                 after: Sequence[Any] = (), *, part: int = 500) -> list[dict[str, Any]]:
        """Rows of ``sql`` whose ``{ids}`` is replaced by an ``IN (…)`` list, queried
        ``part`` ids at a time (under the backends' bind limits); ``before`` and ``after`` are
        the parameters around the list."""
        out: list[dict[str, Any]] = []
        ids = list(ids)
        for i in range(0, len(ids), part):
            chunk = ids[i:i + part]
            out += self.query(sql.replace("{ids}", f"({placeholders(len(chunk))})"),
                              [*before, *chunk, *after])
        return out

    def query_one(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement in its own transaction; returns the row count."""
        with self.transaction() as cur:
            cur.execute(sql, params)
            return cur.rowcount

    def create_schema(self) -> None:
        """Create the tables (idempotent); refuse a database written by a newer edgepack."""
        ddl = _DDL.replace("{autoid}", self.dialect.autoid)
        with self.transaction() as cur:
            for stmt in (s.strip() for s in ddl.split(";")):
                if stmt:
                    cur.execute(stmt)
            for table, column, kind in _ADDED_COLUMNS:
                if column not in cur.columns(table):
                    cur.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
            cur.execute("SELECT value FROM meta WHERE key = ?", ("schema_version",))
            row = cur.fetchone()
            if row is None:
                cur.execute("INSERT INTO meta (key, value, updated) VALUES (?, ?, ?)",
                            ("schema_version", str(SCHEMA_VERSION), time.time()))
            elif int(row[0]) > SCHEMA_VERSION:
                raise StorageError(
                    f"the fleet database {self.safe_url} has schema version {row[0]}, newer than "
                    f"this edgepack understands ({SCHEMA_VERSION}): upgrade edgepack")
            elif int(row[0]) < SCHEMA_VERSION:  # the tables it lacked were created above
                cur.execute("UPDATE meta SET value = ?, updated = ? WHERE key = ?",
                            (str(SCHEMA_VERSION), time.time(), "schema_version"))


# ------------------------------------------------------------------------------ opening

def _sqlite_path(url: str) -> str:
    if url.startswith("sqlite:///"):
        return url[len("sqlite:///"):] or ":memory:"
    if url.startswith("sqlite://"):
        return url[len("sqlite://"):] or ":memory:"
    return url


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


def open_database(url: str, *, create: bool = True, pool_size: int = 8) -> Database:
    """Open (and by default create the schema of) the fleet database at ``url``."""
    if url.startswith(("postgresql://", "postgres://")):
        return _open_postgres(url, create=create, pool_size=pool_size)
    if "://" in url and not url.startswith("sqlite:"):
        raise StorageError(f"database URL {url!r} is neither sqlite:///PATH nor "
                           "postgresql://USER@HOST/DB", field="db")
    path = _sqlite_path(url)
    if path == ":memory:":
        raise StorageError("an in-memory SQLite database cannot be shared by the collector and "
                           "the dashboard: give a file, e.g. sqlite:///fleet.db", field="db")
    p = Path(path).expanduser()
    if not p.parent.exists():
        raise StorageError(f"cannot create the fleet database {p}: directory {p.parent} does not "
                           "exist", field="db")

    def factory() -> _SqliteConn:
        conn = sqlite3.connect(str(p), timeout=5.0, check_same_thread=False,
                               isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")
        return _SqliteConn(conn)

    try:
        db = Database(f"sqlite:///{p}", _Dialect(), factory, pool_size=pool_size)
        if create:
            db.create_schema()
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open the fleet database {p}: {exc}", field="db") from None
    return db


def _open_postgres(url: str, *, create: bool, pool_size: int) -> Database:
    try:
        import psycopg
    except ImportError:
        raise StorageError("PostgreSQL needs psycopg: pip install 'edgepack[fleet]' (or "
                           "'psycopg[binary]')") from None
    conninfo = "postgresql://" + url.split("://", 1)[1]

    def factory() -> Any:
        return psycopg.connect(conninfo, connect_timeout=10, autocommit=False)

    db = Database(conninfo, _PgDialect(), factory, pool_size=pool_size)
    db._transient = (psycopg.OperationalError, psycopg.InterfaceError,
                     psycopg.errors.AdminShutdown, psycopg.errors.SerializationFailure,
                     psycopg.errors.DeadlockDetected)
    if create:
        try:
            db.create_schema()
        except psycopg.Error as exc:
            parts = urlsplit(conninfo)
            where = f"{parts.hostname}:{parts.port or 5432}/{unquote(parts.path.lstrip('/'))}"
            raise StorageError(f"cannot use the PostgreSQL database {where}: "
                               f"{str(exc).strip()}", field="db") from None
    return db
