"""``/metrics``: the fleet in Prometheus exposition format (text 0.0.4), built at scrape time.

Base units, as Prometheus conventions ask: seconds and bytes.

=====================================================  ==========================================
``edgepack_devices{fleet,status}``                      devices by presence: online, offline,
                                                        unknown
``edgepack_device_online{fleet,device}``                1 online, 0 offline (retained state + LWT)
``edgepack_device_info{fleet,device,board,target,       1, labels say what the device runs
bundle,version}``
``edgepack_device_latency_seconds{fleet,device,         inference latency of the last telemetry
quantile}``                                             window (0.5, 0.95, 0.99)
``edgepack_device_rss_bytes{fleet,device}``,            memory of the agent process
``edgepack_device_peak_rss_bytes``
``edgepack_device_cpu_ratio``,                          CPU share (0-1), SoC temperature
``edgepack_device_temperature_celsius``
``edgepack_device_inferences``, ``…_errors``            counts in the last telemetry window
``edgepack_device_last_seen_timestamp_seconds``         last message from the device
``edgepack_install_outcomes_total{fleet,outcome}``      install events stored (installed,
                                                        health_failed, rolled_back, rejected,
                                                        error) within the retention window
``edgepack_drift_score{fleet,device,bundle}``           drift of the device's windows on the bundle
                                                        (first 12 hex digits of its id) over the
                                                        last hour: 1.0 is the alert threshold;
                                                        absent until 300 rows are sketched
``edgepack_drift_alert{fleet,device,bundle}``           1 when a figure alerts, else 0
``edgepack_drift_rows{fleet,device,bundle}``            rows sketched behind the verdict
``edgepack_drift_confidence_drop{…}``                   fall of the mean top probability
``edgepack_rollouts{fleet,state}``                      rollouts by state
``edgepack_collector_connected``                        1 while subscribed to the broker
``edgepack_collector_messages_received_total{kind}``    messages the broker delivered, by topic
``edgepack_collector_messages_stored_total{kind}``      … and committed to the database
``edgepack_collector_dropped_total{reason}``            messages dropped (queue_full,
                                                        bad_message, db_rejected)
``edgepack_collector_queue_depth``                      received, not yet stored
``edgepack_collector_db_errors_total``                  failed database writes (retried)
``edgepack_collector_lag_seconds``                      histogram: device timestamp → stored
``edgepack_collector_ingest_lag_seconds``               histogram: received → stored
``edgepack_collector_recent_lag_seconds{quantile}``     quantiles of the recent lag
=====================================================  ==========================================
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from edgepack.host.fleet.storage import Store

__all__ = ["render_metrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_OUTCOMES = ("installed", "health_failed", "rolled_back", "rejected", "error")
_MB = 1024.0 * 1024.0


class _FleetCollector:
    """A prometheus_client custom collector reading the database on each scrape."""

    def __init__(self, store: Store, fleets: Iterable[str], collector: Any = None,
                 engine: Any = None, per_device: bool = True) -> None:
        self.store = store
        self.fleets = list(fleets)
        self.collector = collector
        self.engine = engine
        self.per_device = per_device

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        devices = GaugeMetricFamily("edgepack_devices", "Devices by presence.",
                                    labels=["fleet", "status"])
        online = GaugeMetricFamily("edgepack_device_online",
                                   "1 when the device is online (retained state and LWT).",
                                   labels=["fleet", "device"])
        info = GaugeMetricFamily("edgepack_device_info", "What the device is and runs.",
                                 labels=["fleet", "device", "board", "target", "bundle",
                                         "version"])
        latency = GaugeMetricFamily("edgepack_device_latency_seconds",
                                    "Inference latency quantiles of the last telemetry window.",
                                    labels=["fleet", "device", "quantile"])
        rss = GaugeMetricFamily("edgepack_device_rss_bytes", "Resident memory of the agent.",
                                labels=["fleet", "device"])
        peak = GaugeMetricFamily("edgepack_device_peak_rss_bytes",
                                 "Peak resident memory of the agent.", labels=["fleet", "device"])
        cpu = GaugeMetricFamily("edgepack_device_cpu_ratio", "CPU share of the agent (0-1).",
                                labels=["fleet", "device"])
        temp = GaugeMetricFamily("edgepack_device_temperature_celsius", "SoC temperature.",
                                 labels=["fleet", "device"])
        infer = GaugeMetricFamily("edgepack_device_inferences",
                                  "Inferences in the last telemetry window.",
                                  labels=["fleet", "device"])
        errors = GaugeMetricFamily("edgepack_device_errors",
                                   "Failed inferences in the last telemetry window.",
                                   labels=["fleet", "device"])
        seen = GaugeMetricFamily("edgepack_device_last_seen_timestamp_seconds",
                                 "Unix time of the device's last message.",
                                 labels=["fleet", "device"])
        for fleet in self.fleets:
            counts = {"online": 0, "offline": 0, "unknown": 0}
            for d in self.store.devices.list(fleet):
                status = "online" if d.online is True else "offline" if d.online is False \
                    else "unknown"
                counts[status] += 1
                if not self.per_device:
                    continue
                dev = d.device_id
                online.add_metric([fleet, dev], 1.0 if d.online else 0.0)
                info.add_metric([fleet, dev, d.board or "", d.target or "",
                                 d.bundle_name or "", d.bundle_version or ""], 1.0)
                if d.last_seen:
                    seen.add_metric([fleet, dev], float(d.last_seen))
                t = d.telemetry or {}
                for q, key in (("0.5", "p50"), ("0.95", "p95"), ("0.99", "p99")):
                    if t.get(key) is not None and t.get("inferences") != 0:
                        latency.add_metric([fleet, dev, q], t[key] / 1000.0)
                for fam, key, scale in ((rss, "rss_mb", _MB), (peak, "peak_rss_mb", _MB),
                                        (cpu, "cpu_percent", 0.01), (temp, "temperature_c", 1.0),
                                        (infer, "inferences", 1.0), (errors, "errors", 1.0)):
                    if t.get(key) is not None:
                        fam.add_metric([fleet, dev], float(t[key]) * scale)
            for status, n in counts.items():
                devices.add_metric([fleet, status], float(n))
        yield from (devices, online, info, latency, rss, peak, cpu, temp, infer, errors, seen)
        if self.per_device:
            yield from _drift_families(self.store, self.fleets, GaugeMetricFamily)

        outcomes = CounterMetricFamily("edgepack_install_outcomes",
                                       "Install events stored, by outcome.",
                                       labels=["fleet", "outcome"])
        found = self.store.events.counts()
        for fleet in self.fleets:
            for kind in _OUTCOMES:
                outcomes.add_metric([fleet, kind], float(found.get((fleet, kind), 0)))
        yield outcomes

        rollouts = GaugeMetricFamily("edgepack_rollouts", "Rollouts by state.",
                                     labels=["fleet", "state"])
        by_state: dict[tuple[str, str], int] = {}
        for r in self.store.rollouts.list(limit=100_000):
            if r.fleet in self.fleets:
                by_state[(r.fleet, r.state)] = by_state.get((r.fleet, r.state), 0) + 1
        for (fleet, state), n in sorted(by_state.items()):
            rollouts.add_metric([fleet, state], float(n))
        yield rollouts

        c = self.collector
        if c is None:
            return
        s = c.stats()
        yield _gauge(GaugeMetricFamily, "edgepack_collector_connected",
                     "1 while the collector is subscribed to the broker.",
                     1.0 if s["connected"] else 0.0)
        for name, helptext, data in (
                ("edgepack_collector_messages_received", "Messages the broker delivered.",
                 s["received"]),
                ("edgepack_collector_messages_stored", "Messages committed to the database.",
                 s["stored"])):
            fam = CounterMetricFamily(name, helptext, labels=["kind"])
            for kind, n in sorted(data.items()):
                fam.add_metric([kind], float(n))
            yield fam
        dropped = CounterMetricFamily("edgepack_collector_dropped",
                                      "Messages dropped, by reason.", labels=["reason"])
        for reason in sorted({"queue_full", "bad_message", "db_rejected", *s["dropped"]}):
            dropped.add_metric([reason], float(s["dropped"].get(reason, 0)))
        yield dropped
        yield _gauge(GaugeMetricFamily, "edgepack_collector_queue_depth",
                     "Messages received and not yet stored.", float(s["queue_depth"]))
        db = CounterMetricFamily("edgepack_collector_db_errors",
                                 "Failed database writes (each retried).")
        db.add_metric([], float(s["db_errors"]))
        yield db
        for name, helptext, stats in (
                ("edgepack_collector_lag_seconds", "Device timestamp to stored.", c.lag),
                ("edgepack_collector_ingest_lag_seconds", "Received to stored.", c.ingest_lag)):
            buckets, count, total = stats.histogram()
            h = HistogramMetricFamily(name, helptext)
            h.add_metric([], [(_le(b), float(n)) for b, n in buckets] + [("+Inf", float(count))],
                         float(total))
            yield h
        recent = GaugeMetricFamily("edgepack_collector_recent_lag_seconds",
                                   "Quantiles of the lag (device timestamp to stored) over the "
                                   "most recent messages.", labels=["quantile"])
        for key, v in s["lag_s"].items():
            recent.add_metric([str(int(key[1:]) / 100)], float(v))
        yield recent
        if self.engine is not None:
            yield _gauge(GaugeMetricFamily, "edgepack_rollout_engine_errors",
                         "Rollout steps that failed (retried next tick).",
                         float(self.engine.errors))


def _drift_families(store: Store, fleets: Iterable[str], gauge: Any) -> Iterator[Any]:
    """``edgepack_drift_*``: each device's verdict on the bundle it ran over the last hour."""
    from edgepack.host.fleet.drift_status import drift_status

    labels = ["fleet", "device", "bundle"]
    score = gauge("edgepack_drift_score", "Drift score of the device's windows over the last "
                  "hour (1.0 = alert threshold).", labels=labels)
    alert = gauge("edgepack_drift_alert", "1 when a drift figure alerts.", labels=labels)
    rows = gauge("edgepack_drift_rows", "Rows sketched behind the drift verdict.", labels=labels)
    drop = gauge("edgepack_drift_confidence_drop", "Fall of the mean top probability from the "
                 "bundle's reference.", labels=labels)
    for fleet in fleets:
        for s in drift_status(store, fleet):
            if s.verdict is None:
                continue
            key = [fleet, s.key, (s.bundle_id or "")[:12]]
            rows.add_metric(key, float(s.verdict.rows))
            alert.add_metric(key, 1.0 if s.alert else 0.0)
            if s.score is not None:
                score.add_metric(key, float(s.score))
            drops = [f.confidence_drop for f in s.verdict.figures
                     if f.confidence_drop is not None]
            if drops:
                drop.add_metric(key, float(max(drops)))
    yield from (score, alert, rows, drop)


def _gauge(cls: Any, name: str, helptext: str, value: float) -> Any:
    g = cls(name, helptext)
    g.add_metric([], value)
    return g


def _le(b: float) -> str:
    return f"{b:g}"


def render_metrics(store: Store, fleets: Iterable[str], *, collector: Any = None,
                   engine: Any = None, per_device: bool = True) -> bytes:
    """The exposition text for one scrape."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_FleetCollector(store, fleets, collector, engine, per_device))
    return generate_latest(registry)
