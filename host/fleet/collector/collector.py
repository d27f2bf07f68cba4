"""The fleet collector: subscribes to what devices publish and stores it (``edgepack fleet serve``).

Threads: paho's network thread only timestamps each message and puts it in the inbox
(:mod:`.subscription`); a *writer* thread drains the inbox in batches (one transaction each) and
retries a batch until the database takes it, while the inbox keeps absorbing what the broker
delivers — a database outage costs latency, not data, up to ``queue_max`` messages (then new
telemetry is dropped and counted; state and events are always kept). The subscriber reconnects
with backoff after a broker restart and subscribes again. While the collector is down, the
broker queues QoS 1 messages for its persistent session (up to the broker's own limit,
``max_queued_messages`` in Mosquitto). A *reports* thread fetches each new bundle's chunks once
to read its build report; a *maintenance* thread writes heartbeats and applies retention.

Telemetry and events are stored idempotently (a unique key on device and timestamp), so an agent
re-sending from its outbox after a reconnect does not count twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Any

from edgepack.agent.mqtt import BrokerConfig, parse_broker_url
from edgepack.host.fleet.collector.authenticator import Authenticator
from edgepack.host.fleet.collector.inbox import Inbox
from edgepack.host.fleet.collector.lag import LagStats
from edgepack.host.fleet.collector.messages import Parsed, parse_messages
from edgepack.host.fleet.collector.options import CollectorOptions, default_client_id
from edgepack.host.fleet.collector.reports import ReportFetcher
from edgepack.host.fleet.collector.subscription import Subscriber
from edgepack.host.fleet.storage import Batch, Store

__all__ = ["Collector"]

log = logging.getLogger("edgepack.collector")


class Collector:
    """Subscribe to fleets on a broker and store what arrives. ``start()``, then ``stop()``."""

    def __init__(self, broker: BrokerConfig | str, store: Store,
                 options: CollectorOptions | None = None) -> None:
        self.cfg = parse_broker_url(broker) if isinstance(broker, str) else broker
        self.store = store
        self.opts = options or CollectorOptions()
        self.client_id = self.opts.client_id or default_client_id(self.opts.fleets, store.url)
        self.lag = LagStats()  # device timestamp -> committed
        self.ingest_lag = LagStats()  # received by the collector -> committed
        self.received: Counter[str] = Counter()
        self.stored: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.unauthenticated: Counter[str] = Counter()  # refused device reports, by reason
        self._auth = Authenticator(store, self.opts.fleets)
        self.db_errors = 0
        self.db_retries = 0
        self.last_commit: float | None = None
        self.last_db_error: str | None = None
        self.started_at = time.time()
        self._inbox = Inbox()
        self._subscriber = Subscriber(self.cfg, self.client_id, self.opts, self._inbox,
                                      self.dropped)
        self._reports = ReportFetcher(self.cfg, store, max_bytes=self.opts.report_max_bytes) \
            if self.opts.fetch_reports else None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Collector:
        for name, target in (("edgepack-collector-net", self._subscriber.run),
                             ("edgepack-collector-writer", self._run_writer),
                             ("edgepack-collector-maint", self._run_maintenance)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        if self._reports is not None:
            self._reports.start()
        return self

    def stop(self, drain_timeout: float = 10.0) -> None:
        """Disconnect from the broker (the session persists), store what is queued, stop."""
        self._subscriber.stop()
        self.wait_idle(drain_timeout)
        self._stop.set()
        if self._reports is not None:
            self._reports.stop()
        for t in self._threads:
            t.join(timeout=5)
        if self._inbox.depth > 0 or self._inbox.busy:
            log.error("stopping with %d received message(s) not stored: the database at %s "
                      "is unavailable (%s)", self._inbox.depth + (1 if self._inbox.busy else 0),
                      self.store.safe_url, self.last_db_error)

    def __enter__(self) -> Collector:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ state
    @property
    def connected(self) -> bool:
        return self._subscriber.connected

    @property
    def connects(self) -> int:
        return self._subscriber.connects

    @property
    def protocol(self) -> str | None:
        """``"5"`` or ``"3.1.1"`` once connected."""
        return self._subscriber.protocol

    @property
    def shared_active(self) -> bool:
        return self._subscriber.shared_active

    @property
    def queue_depth(self) -> int:
        return self._inbox.depth

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Block until every message received so far is stored (or ``timeout``)."""
        return self._inbox.wait_idle(timeout)

    def wait_connected(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.connected:
                return True
            time.sleep(0.02)
        return False

    def stats(self) -> dict[str, Any]:
        """Counters for ``/api/health`` and ``/metrics``."""
        return {
            "client_id": self.client_id, "broker": self.cfg.url, "fleets": list(self.opts.fleets),
            "connected": self.connected, "protocol": self.protocol,
            "shared_subscription": self.shared_active, "connects": self.connects,
            "received": dict(self.received), "stored": dict(self.stored),
            "dropped": dict(self.dropped), "unauthenticated": dict(self.unauthenticated),
            "queue_depth": self._inbox.depth,
            "db_errors": self.db_errors, "db_retries": self.db_retries,
            "last_db_error": self.last_db_error, "last_commit": self.last_commit,
            "lag_s": self.lag.quantiles(), "ingest_lag_s": self.ingest_lag.quantiles(),
            "database": self.store.kind, "uptime_s": round(time.time() - self.started_at, 1),
        }

    # ------------------------------------------------------------------ writer
    def _parse(self, items: list[tuple]) -> Parsed:
        while True:  # reports are judged against the current inventory
            try:
                self._auth.refresh()
                break
            except Exception as exc:  # noqa: BLE001 - the database is away: judge with the
                if self._auth.loaded or self._stop.is_set():  # inventory read last
                    log.debug("inventory not reloaded: %s", exc)
                    break
                time.sleep(0.2)
        return parse_messages(items, set(self.opts.fleets), received=self.received,
                              dropped=self.dropped, on_bundle=self._on_bundle,
                              auth=self._auth, refused=self.unauthenticated)

    def _on_bundle(self, fleet: str, table: dict) -> None:
        if self._reports is not None:
            self._reports.want(fleet, table)

    def _run_writer(self) -> None:
        pending: Parsed | None = None
        delay = 0.05
        while True:
            if pending is None:
                self._inbox.busy = False
                if self._stop.is_set() and self._inbox.depth <= 0:
                    return
                items = self._inbox.take(self.opts.batch_max, 0.2)
                if not items:
                    continue
                pending = self._parse(items)
            batch = pending.batch
            if not len(batch):
                pending = None
                continue
            try:
                self.store.write_batch(batch)
            except Exception as exc:  # noqa: BLE001 - the database decides what is fatal
                self.db_errors += 1
                self.last_db_error = f"{type(exc).__name__}: {exc}".strip()[:500]
                if self.store.is_transient(exc):
                    self.db_retries += 1
                    if self.db_retries == 1 or self.db_retries % 50 == 0:
                        log.warning("database write failed (%s); retrying (%d messages "
                                    "waiting)", self.last_db_error,
                                    self._inbox.depth + len(batch))
                    time.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                log.error("database refused a batch (%s): storing its messages one by one",
                          self.last_db_error)
                self._write_isolated(batch)
            delay = 0.05
            now = time.time()
            self.lag.add_many([now - t for t in pending.device_ts])
            self.ingest_lag.add_many([now - t for t in pending.received_ts])
            self.last_commit = now
            for name in Batch.KINDS[:-1]:  # not "refused": counted when parsed
                n = len(getattr(batch, name))
                if n:
                    self.stored[name] += n
            pending = None

    def _write_isolated(self, batch: Batch) -> None:
        for single in batch.split():
            for _ in range(3):
                try:
                    self.store.write_batch(single)
                    break
                except Exception as exc:  # noqa: BLE001
                    if not self.store.is_transient(exc):
                        self.dropped["db_rejected"] += 1
                        log.error("database refused a message: %s", exc)
                        break
                    time.sleep(0.2)
            else:
                self.dropped["db_unavailable"] += 1

    # ------------------------------------------------------------------ maintenance
    def _run_maintenance(self) -> None:
        next_prune = time.monotonic() + 5.0
        while True:
            try:
                self.store.meta.beat(self.client_id, {
                    "connected": self.connected, "broker": self.cfg.url,
                    "fleets": list(self.opts.fleets), "queue_depth": self._inbox.depth})
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + self.opts.prune_every_s
                    self.prune()
            except Exception as exc:  # noqa: BLE001 - a database hiccup: try next round
                log.debug("maintenance skipped: %s", exc)
            if self._stop.wait(min(self.opts.heartbeat_s, 5.0)):
                return

    def prune(self) -> dict[str, int]:
        """Apply the retention policy now."""
        now = time.time()
        o = self.opts
        out = self.store.prune(
            telemetry_before=now - o.telemetry_retention_s if o.telemetry_retention_s else None,
            events_before=now - o.events_retention_s if o.events_retention_s else None)
        if out["telemetry"] or out["events"]:
            log.info("retention: deleted %d telemetry rows and %d events", out["telemetry"],
                     out["events"])
        return out
