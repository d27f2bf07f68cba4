"""The fleet collector: subscribes to what devices publish and stores it (``edgepack fleet serve``).

Subscriptions, per fleet (all QoS 1, one persistent session with a stable client id):

* ``devices/+/telemetry`` and ``devices/+/events`` — through an MQTT 5 *shared subscription*
  (``$share/<group>/…``) when the broker offers one, so several collectors split a fleet's
  traffic; a plain subscription otherwise (MQTT 3.1.1 brokers such as the embedded one, or
  ``shared="off"``);
* ``devices/+/state``, ``devices/+/desired``, ``groups/+/desired`` and ``bundles/+/manifest`` —
  always plain: these are retained, and a broker never sends retained messages to a shared
  subscription. Every collector keeps the full presence picture; state writes are idempotent.

Threads: paho's network thread only timestamps each message and puts it on an in-memory queue; a
*writer* thread drains the queue in batches (one transaction each) and retries a batch until the
database takes it, while the queue keeps absorbing what the broker delivers — a database outage
costs latency, not data, up to ``queue_max`` messages (then new telemetry is dropped and counted;
state and events are always kept). A *connector* thread reconnects with backoff after a broker
restart and subscribes again. While the collector is down, the broker queues QoS 1 messages for
its persistent session (up to the broker's own limit, ``max_queued_messages`` in Mosquitto).
A *reports* thread fetches each new bundle's chunks once to read its build report.

Telemetry and events are stored idempotently (a unique key on device and timestamp), so an agent
re-sending from its outbox after a reconnect does not count twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import queue
import random
import socket
import ssl
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

from edgepack.agent.errors import EdgepackError, ProtocolError
from edgepack.agent.mqtt import BrokerConfig, parse_broker_url
from edgepack.agent.protocol import VERSION, Topics, check_id, decode
from edgepack.host.fleet.storage import Batch, Storage

__all__ = ["Collector", "CollectorOptions", "LagStats", "default_client_id"]

log = logging.getLogger("edgepack.collector")

_LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def default_client_id(fleets: tuple[str, ...], db_url: str = "") -> str:
    """A client id stable across restarts of the same collector (so its session persists)."""
    h = hashlib.sha256(f"{socket.gethostname()}|{','.join(fleets)}|{db_url}".encode())
    return f"edgepack-collector-{h.hexdigest()[:12]}"


@dataclass(frozen=True)
class CollectorOptions:
    """How the collector subscribes, batches, retains and recovers."""

    fleets: tuple[str, ...] = ("default",)
    client_id: str | None = None  # default: stable per host, fleets and database
    shared: str = "auto"  # auto: MQTT 5 shared subscription if offered; on; off
    share_group: str = "edgepack"
    session_expiry_s: int = 7 * 86400  # how long the broker keeps our session while we are away
    batch_max: int = 5000
    queue_max: int = 500_000  # messages held while the database is away (~250 MB)
    telemetry_retention_s: float | None = 7 * 86400.0
    events_retention_s: float | None = 90 * 86400.0
    prune_every_s: float = 600.0
    fetch_reports: bool = True
    report_max_bytes: int = 256 * 1024 * 1024
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    heartbeat_s: float = 10.0

    def __post_init__(self) -> None:
        if self.shared not in ("auto", "on", "off"):
            raise ValueError("shared must be auto, on or off")
        for f in self.fleets:
            check_id(f, "fleet name")
        check_id(self.share_group, "share group")


class LagStats:
    """Ingest lag (seconds): cumulative histogram for Prometheus, recent values for quantiles."""

    def __init__(self, recent: int = 200_000) -> None:
        self._lock = threading.Lock()
        self.buckets = [0] * len(_LAG_BUCKETS)
        self.count = 0
        self.sum = 0.0
        self.max = 0.0
        self._recent: deque[float] = deque(maxlen=recent)

    def add_many(self, values: list[float]) -> None:
        if not values:
            return
        with self._lock:
            for v in values:
                v = max(0.0, v)
                self.count += 1
                self.sum += v
                if v > self.max:
                    self.max = v
                for i, b in enumerate(_LAG_BUCKETS):
                    if v <= b:
                        self.buckets[i] += 1
                        break
                self._recent.append(v)

    def reset_recent(self) -> None:
        with self._lock:
            self._recent.clear()
            self.max = 0.0

    def quantiles(self, qs: tuple[float, ...] = (0.5, 0.95, 0.99)) -> dict[str, float]:
        with self._lock:
            values = sorted(self._recent)
        if not values:
            return {f"p{int(q * 100)}": 0.0 for q in qs}
        return {f"p{int(q * 100)}": values[min(len(values) - 1, int(q * len(values)))]
                for q in qs}

    def histogram(self) -> tuple[list[tuple[float, int]], int, float]:
        """Cumulative ``[(le, count)]``, total count and sum."""
        with self._lock:
            out, acc = [], 0
            for b, n in zip(_LAG_BUCKETS, self.buckets, strict=True):
                acc += n
                out.append((b, acc))
            return out, self.count, self.sum


class Collector:
    """Subscribe to fleets on a broker and store what arrives. ``start()``, then ``stop()``."""

    def __init__(self, broker: BrokerConfig | str, storage: Storage,
                 options: CollectorOptions | None = None) -> None:
        self.cfg = parse_broker_url(broker) if isinstance(broker, str) else broker
        self.storage = storage
        self.opts = options or CollectorOptions()
        self.client_id = self.opts.client_id or default_client_id(self.opts.fleets, storage.url)
        self.topics = {f: Topics(f) for f in self.opts.fleets}
        self.lag = LagStats()  # device timestamp -> committed
        self.ingest_lag = LagStats()  # received by the collector -> committed
        self.received: Counter[str] = Counter()
        self.stored: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.db_errors = 0
        self.db_retries = 0
        self.connects = 0
        self.connected = False
        self.protocol: str | None = None
        self.shared_active = False
        self.last_commit: float | None = None
        self.last_db_error: str | None = None
        self.started_at = time.time()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._depth = 0  # messages in the inbox (updated by both sides under a lock)
        self._depth_lock = threading.Lock()
        self._busy = False
        self._stop = threading.Event()
        self._net_stop = threading.Event()
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._reports: queue.Queue = queue.Queue()
        self._report_seen: set[tuple[str, str]] = set()
        self._threads: list[threading.Thread] = []
        self._force_v311 = self.opts.shared == "off"
        self._v5_worked = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Collector:
        for name, target in (("edgepack-collector-net", self._run_network),
                             ("edgepack-collector-writer", self._run_writer),
                             ("edgepack-collector-maint", self._run_maintenance)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        if self.opts.fetch_reports:
            t = threading.Thread(target=self._run_reports, name="edgepack-collector-reports",
                                 daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, drain_timeout: float = 10.0) -> None:
        """Disconnect from the broker (the session persists), store what is queued, stop."""
        self._net_stop.set()
        with self._client_lock:
            client = self._client
        if client is not None:
            with contextlib.suppress(Exception):
                client.disconnect()
        self.wait_idle(drain_timeout)
        self._stop.set()
        self._reports.put(None)
        for t in self._threads:
            t.join(timeout=5)
        if self._depth > 0 or self._busy:
            log.error("stopping with %d received message(s) not stored: the database at %s "
                      "is unavailable (%s)", self._depth + (1 if self._busy else 0),
                      self.storage.safe_url, self.last_db_error)

    def __enter__(self) -> Collector:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def queue_depth(self) -> int:
        return self._depth

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Block until every message received so far is stored (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._depth == 0 and not self._busy:
                return True
            time.sleep(0.01)
        return False

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
            "dropped": dict(self.dropped), "queue_depth": self._depth,
            "db_errors": self.db_errors, "db_retries": self.db_retries,
            "last_db_error": self.last_db_error, "last_commit": self.last_commit,
            "lag_s": self.lag.quantiles(), "ingest_lag_s": self.ingest_lag.quantiles(),
            "database": self.storage.kind, "uptime_s": round(time.time() - self.started_at, 1),
        }

    # ------------------------------------------------------------------ network
    def _subscriptions(self, shared: bool) -> list[tuple[str, bool]]:
        """``(filter, is_shared)`` for every fleet."""
        subs = []
        for t in self.topics.values():
            for leaf in ("telemetry", "events"):
                f = t.all_devices(leaf)
                subs.append((f"$share/{self.opts.share_group}/{f}", True) if shared
                            else (f, False))
            subs += [(t.all_devices("state"), False), (t.all_devices("desired"), False),
                     (f"{t.prefix}groups/+/desired", False),
                     (f"{t.prefix}bundles/+/manifest", False)]
        return subs

    def _make_client(self, v5: bool) -> Any:
        import paho.mqtt.client as mqtt

        cfg = self.cfg
        if v5:
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                            protocol=mqtt.MQTTv5)
        else:
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                            clean_session=False, protocol=mqtt.MQTTv311)
        if cfg.username is not None:
            c.username_pw_set(cfg.username, cfg.password)
        if cfg.tls or cfg.ca or cfg.cert:
            c.tls_set(ca_certs=cfg.ca, certfile=cfg.cert, keyfile=cfg.key,
                      cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        c.max_inflight_messages_set(64)
        c.max_queued_messages_set(0)
        return c

    def _run_network(self) -> None:
        attempt = 0
        while not self._net_stop.is_set():
            v5 = not self._force_v311
            outcome = self._session(v5)
            if self._net_stop.is_set():
                break
            if outcome == "ok":
                attempt = 0
            elif outcome == "v5_refused" and self.opts.shared == "auto":
                log.info("broker at %s refused MQTT 5: using MQTT 3.1.1 and plain "
                         "subscriptions", self.cfg.url)
                self._force_v311 = True
                continue
            delay = min(self.opts.reconnect_max_s, self.opts.reconnect_min_s * 2 ** attempt)
            attempt += 1
            self._net_stop.wait(random.uniform(delay / 2, delay))

    def _session(self, v5: bool) -> str:
        """One connection from CONNECT to disconnect: ``ok``, ``failed`` or ``v5_refused``."""
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        events: queue.SimpleQueue = queue.SimpleQueue()
        inbox = self._inbox
        client = self._make_client(v5)

        def on_connect(c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
            events.put(("connack", rc, props))

        def on_disconnect(c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
            c.loop_stop()  # only sets a flag from this thread: we reconnect ourselves
            events.put(("disconnect", rc, None))

        def on_subscribe(c: Any, u: Any, mid: int, rcs: Any, props: Any) -> None:
            events.put(("suback", mid, rcs))

        queue_max = self.opts.queue_max
        dropped = self.dropped

        def on_message(c: Any, u: Any, msg: Any) -> None:
            # the bound on memory while the database is away: shed telemetry, keep the rest
            if self._depth >= queue_max and msg.topic.endswith("/telemetry"):
                dropped["queue_full"] += 1
                return
            inbox.put((time.time(), msg.topic, msg.payload, msg.retain))
            with self._depth_lock:
                self._depth += 1

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        try:
            if v5:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = int(self.opts.session_expiry_s)
                props.ReceiveMaximum = 65535
                client.connect(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive,
                               clean_start=False, properties=props)
            else:
                client.connect(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive)
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.warning("cannot reach the broker at %s: %s", self.cfg.url, exc)
            return "failed"
        with self._client_lock:
            self._client = client
        client.loop_start()
        try:
            # a broker that does not speak MQTT 5 may just hang up, or say nothing at all
            probe = v5 and self.opts.shared == "auto" and not self._v5_worked
            kind, rc, props = self._next_event(
                events, min(self.cfg.connect_timeout, 3.0) if probe else self.cfg.connect_timeout)
            if kind != "connack" or getattr(rc, "is_failure", False):
                if v5 and (kind != "connack" or int(getattr(rc, "value", 0)) in (1, 0x84)):
                    return "v5_refused"  # dropped before CONNACK / unsupported protocol version
                log.warning("broker at %s refused the collector: %s", self.cfg.url, rc)
                return "failed"
            shared = v5 and self.opts.shared != "off"
            if shared and props is not None and \
                    getattr(props, "SharedSubscriptionAvailable", 1) == 0:
                shared = False
            self.protocol = "5" if v5 else "3.1.1"
            self._v5_worked = self._v5_worked or v5
            if not self._subscribe(client, events, shared):
                if not shared:
                    return "failed"
                log.info("broker at %s refused shared subscriptions: subscribing plainly",
                         self.cfg.url)
                self._unsubscribe_shared(client)
                if not self._subscribe(client, events, False):
                    return "failed"
                shared = False
            self.shared_active = shared
            self.connected = True
            self.connects += 1
            log.info("collector connected to %s (MQTT %s%s) for fleet(s) %s", self.cfg.url,
                     self.protocol, ", shared subscription" if shared else "",
                     ", ".join(self.opts.fleets))
            while not self._net_stop.is_set():
                try:
                    kind, rc, _ = events.get(timeout=0.2)
                except queue.Empty:
                    continue
                if kind == "disconnect":
                    if not self._net_stop.is_set():
                        log.warning("collector lost the broker at %s (%s); reconnecting",
                                    self.cfg.url, rc)
                    break
            return "ok"
        finally:
            self.connected = False
            with self._client_lock:
                self._client = None
            with contextlib.suppress(Exception):
                client.disconnect()
            client.loop_stop()

    def _next_event(self, events: queue.SimpleQueue, timeout: float) -> tuple[str, Any, Any]:
        try:
            return events.get(timeout=timeout)
        except queue.Empty:
            return ("timeout", None, None)

    def _subscribe(self, client: Any, events: queue.SimpleQueue, shared: bool) -> bool:
        subs = self._subscriptions(shared)
        rc, mid = client.subscribe([(f, 1) for f, _ in subs])
        if rc != 0:
            return False
        deadline = time.monotonic() + self.cfg.connect_timeout
        while (left := deadline - time.monotonic()) > 0:
            kind, got, rcs = self._next_event(events, left)
            if kind == "disconnect":
                return False
            if kind == "suback" and got == mid:
                codes = [int(getattr(r, "value", r)) for r in rcs]
                return all(c < 0x80 for c in codes)
        return False

    def _unsubscribe_shared(self, client: Any) -> None:
        shared = [f for f, s in self._subscriptions(True) if s]
        with contextlib.suppress(Exception):
            client.unsubscribe(shared)

    # ------------------------------------------------------------------ writer
    def _take(self, timeout: float) -> list[tuple]:
        try:
            first = self._inbox.get(timeout=timeout)
        except queue.Empty:
            return []
        self._busy = True  # before the depth drops, so wait_idle never sees a gap
        items = [first]
        get = self._inbox.get_nowait
        try:
            while len(items) < self.opts.batch_max:
                items.append(get())
        except queue.Empty:
            pass
        with self._depth_lock:
            self._depth -= len(items)
        return items

    def _parse(self, items: list[tuple]) -> tuple[Batch, list[float], list[float]]:
        """Decode messages into a batch; returns it with device and receive timestamps of the
        telemetry and events in it (for lag)."""
        batch = Batch()
        dev_ts: list[float] = []
        rcv_ts: list[float] = []
        base = f"edgepack/{VERSION}/"
        for received, topic, payload, retained in items:
            try:
                if not topic.startswith(base):
                    raise ProtocolError("foreign topic")
                parts = topic[len(base):].split("/")
                fleet = parts[0]
                if fleet not in self.topics or len(parts) < 4:
                    raise ProtocolError("foreign topic")
                kind = parts[1]
                if kind == "devices" and len(parts) == 4:
                    device, leaf = check_id(parts[2]), parts[3]
                    self.received[leaf] += 1
                    if leaf == "desired":
                        batch.desired.append((fleet, "device", device, received,
                                              decode(payload) if payload else None))
                        continue
                    if not payload:
                        continue  # a cleared state: nothing to record
                    body = decode(bytes(payload), f"{leaf} of {device}")
                    if leaf == "telemetry":
                        batch.telemetry.append((fleet, device, received, body))
                    elif leaf == "events":
                        batch.events.append((fleet, device, received, body))
                    elif leaf == "state":
                        seen = received
                        ts = body.get("ts")
                        if retained and type(ts) in (int, float) and 0 < ts < received:
                            seen = float(ts)  # a retained state is as old as it says, not new
                        batch.states.append((fleet, device, seen, body))
                        continue
                    else:
                        continue
                    ts = body.get("ts")
                    if isinstance(ts, (int, float)) and not isinstance(ts, bool):
                        dev_ts.append(float(ts))
                    rcv_ts.append(received)
                elif kind == "groups" and parts[3] == "desired" and len(parts) == 4:
                    self.received["group_desired"] += 1
                    batch.desired.append((fleet, "group", check_id(parts[2], "group name"),
                                          received, decode(payload) if payload else None))
                elif kind == "bundles" and parts[3] == "manifest" and len(parts) == 4:
                    self.received["manifest"] += 1
                    if payload:
                        table = decode(bytes(payload), "bundle manifest message")
                        if table.get("bundle_id") == parts[2]:
                            batch.bundles.append((fleet, received, table))
                            self._queue_report(fleet, table)
                else:
                    raise ProtocolError("unexpected topic")
            except ProtocolError as exc:
                self.dropped["bad_message"] += 1
                log.debug("dropped a message on %s: %s", topic, exc)
        return batch, dev_ts, rcv_ts

    def _run_writer(self) -> None:
        pending: tuple[Batch, list[float], list[float]] | None = None
        delay = 0.05
        while True:
            if pending is None:
                self._busy = False
                if self._stop.is_set() and self._depth <= 0:
                    return
                items = self._take(0.2)
                if not items:
                    continue
                pending = self._parse(items)
            batch, dev_ts, rcv_ts = pending
            if not len(batch):
                pending = None
                continue
            try:
                self.storage.write_batch(batch)
            except Exception as exc:  # noqa: BLE001 - the database decides what is fatal
                self.db_errors += 1
                self.last_db_error = f"{type(exc).__name__}: {exc}".strip()[:500]
                if self.storage.is_transient(exc):
                    self.db_retries += 1
                    if self.db_retries == 1 or self.db_retries % 50 == 0:
                        log.warning("database write failed (%s); retrying (%d messages "
                                    "waiting)", self.last_db_error, self._depth + len(batch))
                    time.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                log.error("database refused a batch (%s): storing its messages one by one",
                          self.last_db_error)
                self._write_isolated(batch)
            delay = 0.05
            now = time.time()
            self.lag.add_many([now - t for t in dev_ts])
            self.ingest_lag.add_many([now - t for t in rcv_ts])
            self.last_commit = now
            for name in ("states", "telemetry", "events", "bundles", "desired"):
                n = len(getattr(batch, name))
                if n:
                    self.stored[name] += n
            pending = None

    def _write_isolated(self, batch: Batch) -> None:
        for single in batch.split():
            for _ in range(3):
                try:
                    self.storage.write_batch(single)
                    break
                except Exception as exc:  # noqa: BLE001
                    if not self.storage.is_transient(exc):
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
                self.storage.set_meta(f"collector:{self.client_id}", json.dumps(
                    {"ts": time.time(), "connected": self.connected, "broker": self.cfg.url,
                     "fleets": list(self.opts.fleets), "queue_depth": self._depth}))
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
        out = self.storage.prune(
            telemetry_before=now - o.telemetry_retention_s if o.telemetry_retention_s else None,
            events_before=now - o.events_retention_s if o.events_retention_s else None)
        if out["telemetry"] or out["events"]:
            log.info("retention: deleted %d telemetry rows and %d events", out["telemetry"],
                     out["events"])
        return out

    # ------------------------------------------------------------------ build reports
    def _queue_report(self, fleet: str, table: dict) -> None:
        key = (fleet, table["bundle_id"])
        if self.opts.fetch_reports and key not in self._report_seen:
            self._report_seen.add(key)
            self._reports.put((fleet, table))

    def _run_reports(self) -> None:
        while not self._stop.is_set():
            item = self._reports.get()
            if item is None:
                return
            fleet, table = item
            bid = table["bundle_id"]
            try:
                time.sleep(0.2)  # let the writer store the bundle row first
                row = self.storage.bundle(fleet, bid)
                if row is not None and (row.get("report") is not None or row.get("report_error")):
                    continue
                report, error = fetch_report(self.cfg, fleet, table,
                                             max_bytes=self.opts.report_max_bytes)
                for _ in range(20):
                    if self.storage.bundle(fleet, bid) is not None:
                        break
                    time.sleep(0.25)
                self.storage.set_bundle_report(fleet, bid, report, error)
            except Exception as exc:  # noqa: BLE001 - a report is a nicety: never stop for it
                log.warning("cannot read the build report of bundle %s: %s", bid[:12], exc)
                self._report_seen.discard((fleet, bid))


def fetch_report(cfg: BrokerConfig, fleet: str, table: dict, *, max_bytes: int,
                 timeout: float = 60.0) -> tuple[Any, str | None]:
    """Fetch a published bundle's retained chunks, check them, read ``report.json``.

    Returns ``(report, None)`` or ``(None, why not)``.
    """
    import tempfile
    import zipfile

    from edgepack.agent.bundle import read_bundle
    from edgepack.agent.mqtt import SyncClient
    from edgepack.agent.protocol import parse_chunk_table

    try:
        t = parse_chunk_table(json.dumps(table).encode(), expected_id=table.get("bundle_id"))
    except ProtocolError as exc:
        return None, f"malformed manifest message: {exc}"
    if t.bytes > max_bytes:
        return None, f"bundle is {t.bytes} bytes, over the {max_bytes} byte fetch limit"
    topics = Topics(fleet)
    prefix = f"{topics.prefix}bundles/{t.bundle_id}/chunks/"
    chunks: dict[int, bytes] = {}
    with SyncClient(cfg, client_id=f"edgepack-reports-{uuid.uuid4().hex[:8]}",
                    timeout=timeout) as c:
        c.subscribe(prefix + "+")
        deadline = time.monotonic() + timeout
        while len(chunks) < len(t.chunks) and (left := deadline - time.monotonic()) > 0:
            m = c.get(min(left, 1.0))
            if m is None:
                continue
            topic, payload, _ = m
            if not topic.startswith(prefix):
                continue
            try:
                i = int(topic[len(prefix):])
            except ValueError:
                continue
            if 0 <= i < len(t.chunks) and hashlib.sha256(payload).hexdigest() == t.chunks[i]:
                chunks[i] = payload
    if len(chunks) < len(t.chunks):
        return None, f"only {len(chunks)} of {len(t.chunks)} chunks are on the broker"
    data = b"".join(chunks[i] for i in range(len(t.chunks)))
    if hashlib.sha256(data).hexdigest() != t.bundle_id:
        return None, "the chunks do not add up to the bundle id"
    with tempfile.NamedTemporaryFile(suffix=".edgepack") as f:
        f.write(data)
        f.flush()
        try:
            b = read_bundle(f.name, bundle_id=t.bundle_id)
            if "report.json" not in b.member_names():
                return None, "the bundle has no report.json"
            return json.loads(b.read_member("report.json")), None
        except (EdgepackError, ValueError, zipfile.BadZipFile) as exc:
            return None, f"unreadable bundle: {exc}"
