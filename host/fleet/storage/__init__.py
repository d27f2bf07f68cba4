"""Where the fleet collector keeps what devices said: SQLite (default) or PostgreSQL.

``open_store(url)`` picks the backend from the URL:

* ``sqlite:///fleet.db`` (relative path), ``sqlite:////var/lib/edgepack/fleet.db`` (absolute), or
  a bare file path: SQLite in WAL mode, so the dashboard reads while the collector writes;
* ``postgresql://user[:password]@host[:5432]/dbname`` (``postgres://`` too): PostgreSQL through
  psycopg 3, for bigger fleets and several collectors.

One repository per table, each returning frozen records (SQL lives only in this package):

======================  ==============================  ==========================================
``store.devices``       :class:`DeviceRecord`           presence (retained state + LWT), board,
                                                        target, groups, active bundle, last state
                                                        and last telemetry message
``store.telemetry``     :class:`TelemetryRecord`        the time series, one row per message
``store.events``        :class:`EventRecord`            install events (download_started …)
``store.bundles``       :class:`BundleRecord`           manifests of published bundles, reports
``store.desired``       :class:`DesiredRecord`          retained desired states (device, group)
``store.rollouts``      :class:`RolloutRecord`, …       staged rollouts, their devices and log
``store.drift``         :class:`DriftWindowRecord`, …   devices' drift windows, bundles' drift.json
``store.inventory``     :class:`EnrollmentRecord`       enrolled devices: key, groups, revocation
``store.meta``          —                               schema version, leases, heartbeats
======================  ==============================  ==========================================

The collector writes in batches (:class:`Batch`, :meth:`Store.write_batch`), one transaction
each. :meth:`Store.is_transient` tells it which errors to retry (locked database, lost
connection) and which to isolate.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from edgepack.host.fleet.storage.bundles import BundleRecord, Bundles
from edgepack.host.fleet.storage.db import (
    SCHEMA_VERSION,
    Database,
    StorageError,
    open_database,
)
from edgepack.host.fleet.storage.desired import Desired, DesiredRecord
from edgepack.host.fleet.storage.devices import (
    UNAUTHENTICATED,
    DeviceRecord,
    Devices,
    ReportTrust,
)
from edgepack.host.fleet.storage.drift import (
    DriftReferenceRecord,
    DriftWindowRecord,
    DriftWindows,
    drift_row,
)
from edgepack.host.fleet.storage.events import (
    DeploymentSummary,
    EventRecord,
    Events,
    EventTally,
    event_row,
)
from edgepack.host.fleet.storage.inventory import EnrollmentRecord, Inventory
from edgepack.host.fleet.storage.meta import Meta
from edgepack.host.fleet.storage.rollouts import (
    RolloutDeviceRecord,
    RolloutLogEntry,
    RolloutRecord,
    Rollouts,
)
from edgepack.host.fleet.storage.telemetry import (
    TELEMETRY_COLUMNS,
    BudgetTally,
    Telemetry,
    TelemetryRecord,
    TelemetryStats,
    summary,
    telemetry_row,
)

__all__ = [
    "Store",
    "open_store",
    "Batch",
    "StorageError",
    "SCHEMA_VERSION",
    "TELEMETRY_COLUMNS",
    "DeviceRecord",
    "ReportTrust",
    "UNAUTHENTICATED",
    "EnrollmentRecord",
    "TelemetryRecord",
    "TelemetryStats",
    "BudgetTally",
    "EventRecord",
    "EventTally",
    "DeploymentSummary",
    "BundleRecord",
    "DesiredRecord",
    "RolloutRecord",
    "RolloutDeviceRecord",
    "RolloutLogEntry",
    "DriftWindowRecord",
    "DriftReferenceRecord",
]


@dataclass
class Batch:
    """What the collector writes in one transaction, in arrival order per kind.

    ``states``: ``(fleet, device_id, received, payload)`` where payload is the decoded state
    message (a presence-only message such as the LWT ``{"online": false}`` updates presence
    and keeps the rest). ``telemetry``: ``(fleet, device_id, received, payload)``. ``events``:
    ``(fleet, device_id, received, payload)``. ``drift``: ``(fleet, device_id, received,
    telemetry, ref, (calls, sampled, rows), window JSON)`` for each telemetry message whose
    window passed validation. ``bundles``: ``(fleet, received, table)`` where
    table is the decoded retained manifest message. ``desired``: ``(fleet, scope, name,
    received, payload or None)``; None clears it.

    The collector appends a :class:`ReportTrust` to each state, ``(…, payload, trust)``, and
    lists the reports it could not authenticate in ``refused``: ``(fleet, device_id,
    received, reason)`` (counted on the device's row, never stored as reports).
    """

    states: list[tuple[str, str, float, dict]] = field(default_factory=list)
    telemetry: list[tuple[str, str, float, dict]] = field(default_factory=list)
    events: list[tuple[str, str, float, dict]] = field(default_factory=list)
    bundles: list[tuple[str, float, dict]] = field(default_factory=list)
    desired: list[tuple[str, str, str, float, dict | None]] = field(default_factory=list)
    drift: list[tuple[str, str, float, dict, str, tuple[int, int, int], str]] = field(
        default_factory=list)
    refused: list[tuple[str, str, float, str]] = field(default_factory=list)

    KINDS = ("states", "telemetry", "events", "bundles", "desired", "drift", "refused")

    def __len__(self) -> int:
        return sum(len(getattr(self, name)) for name in self.KINDS)

    def split(self) -> Iterator[Batch]:
        """One single-message batch per message (to isolate a message the database refuses)."""
        for name in self.KINDS:
            for item in getattr(self, name):
                b = Batch()
                getattr(b, name).append(item)
                yield b


class Store:
    """The fleet database: one repository per table. Thread-safe (pooled connections)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.devices = Devices(db)
        self.telemetry = Telemetry(db)
        self.events = Events(db)
        self.bundles = Bundles(db)
        self.desired = Desired(db)
        self.rollouts = Rollouts(db)
        self.drift = DriftWindows(db)
        self.inventory = Inventory(db)
        self.meta = Meta(db)

    @property
    def url(self) -> str:
        return self.db.url

    @property
    def safe_url(self) -> str:
        """The URL without a password, for messages and logs."""
        return self.db.safe_url

    @property
    def kind(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.db.kind

    def is_transient(self, exc: BaseException) -> bool:
        """True for errors worth retrying as they are (locked, disconnected, server restart)."""
        return self.db.is_transient(exc)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def fleets(self) -> list[str]:
        """Every fleet the database knows (devices, rollouts or bundles)."""
        rows = self.db.query("SELECT DISTINCT fleet FROM devices UNION SELECT DISTINCT fleet "
                             "FROM rollouts UNION SELECT DISTINCT fleet FROM bundles")
        return sorted(r["fleet"] for r in rows)

    def write_batch(self, batch: Batch) -> None:
        """Store one batch of messages in one transaction."""
        with self.db.transaction() as cur:
            if batch.telemetry:
                rows = [telemetry_row(f, dev, rcv, t) for f, dev, rcv, t in batch.telemetry]
                self.telemetry.write(cur, rows)
                latest: dict[tuple[str, str], tuple[tuple, dict]] = {}
                for r, (*_, t) in zip(rows, batch.telemetry, strict=True):
                    key = (r[0], r[1])
                    if key not in latest or r[2] >= latest[key][0][2]:
                        latest[key] = (r, t)
                self.devices.write_last_telemetry(cur, [(r[0], r[1], r[3], r[3], summary(r, t),
                                                         r[2]) for r, t in latest.values()])
            for fleet, device, received, state, *trust in batch.states:
                self.devices.write_state(cur, fleet, device, received, state, *trust)
            if batch.events:
                self.events.write(cur, [event_row(f, dev, rcv, e)
                                        for f, dev, rcv, e in batch.events])
                self.devices.touch(cur, {(f, dev): rcv for f, dev, rcv, _ in batch.events})
            for fleet, received, table in batch.bundles:
                self.bundles.write(cur, fleet, received, table)
            for fleet, scope, name, received, payload in batch.desired:
                self.desired.write(cur, fleet, scope, name, received, payload)
            if batch.drift:
                self.drift.write(cur, [drift_row(*item) for item in batch.drift])
            if batch.refused:
                self.devices.count_refused(cur, batch.refused)

    def prune(self, *, telemetry_before: float | None = None,
              events_before: float | None = None) -> dict[str, int]:
        """Delete telemetry (and drift windows) and events received before the given unix
        times (retention)."""
        out = {"telemetry": 0, "events": 0}
        if telemetry_before is not None:
            out["telemetry"] = self.telemetry.prune(telemetry_before)
            self.drift.prune(telemetry_before)
        if events_before is not None:
            out["events"] = self.events.prune(events_before)
        if self.kind == "sqlite" and (out["telemetry"] or out["events"]):
            with self.db.connection() as conn:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        return out


def open_store(url: str, *, create: bool = True, pool_size: int = 8) -> Store:
    """Open (and by default create the schema of) the fleet database at ``url``."""
    return Store(open_database(url, create=create, pool_size=pool_size))
