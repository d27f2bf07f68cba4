"""``edgepack fleet simulate``: many simulated devices in one process, for demos and scale tests.

Each device is a real MQTT connection (its own client id, LWT and session) speaking protocol v1
as ``edgepack-agent`` does: a retained birth state (``online``, board, target, groups, runtimes,
active/previous bundle, slot, phase) and the LWT ``{"online": false}``; it follows its own and its
groups' retained desired states (the device's own wins); it fetches a deployed bundle with the
real chunk transfer — the retained ``bundles/{id}/manifest`` message, then windows of retained
chunks, each checked against the chunk table (and the table's signature when trusted keys are
given), the whole file against the bundle id — and reports the install events
(``download_started`` … ``installed``, or ``health_failed`` + ``rolled_back``); it sends plausible
telemetry (latency quantiles from the target's budget, RSS from the model size, CPU, temperature).

A configurable share of devices fails every health check (``fail_rate``); another share installs
but then runs over the bundle's latency and memory budgets (``over_budget_rate``), which a staged
rollout's soak catches. Which devices misbehave is drawn from ``seed``, so runs repeat.

All connections share one thread running a selector over the sockets (paho's external-loop API):
thousands of devices cost a few file descriptors and no threads each.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import itertools
import json
import logging
import math
import queue
import random
import selectors
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgepack.agent.errors import EdgepackError, ProtocolError
from edgepack.agent.mqtt import BrokerConfig, parse_broker_url
from edgepack.agent.protocol import (
    ChunkTable,
    DesiredState,
    Topics,
    check_id,
    encode,
    parse_chunk_table,
    parse_desired,
)

__all__ = ["Simulator", "SimOptions", "SimDevice"]

log = logging.getLogger("edgepack.simulator")
_MB = 1024 * 1024


@dataclass(frozen=True)
class SimOptions:
    """What to simulate."""

    devices: int = 10
    fleet: str = "default"
    target: str = "rpi4"
    board: str | None = None  # default: the target name
    groups: tuple[str, ...] = ("sim",)
    prefix: str = "sim"  # device ids: {prefix}-0001 …
    start_index: int = 1
    fail_rate: float = 0.0  # share of devices whose health check always fails
    over_budget_rate: float = 0.0  # share running over the bundle's budgets once installed
    interval_s: float = 5.0  # telemetry period
    telemetry_qos: int = 1
    install_s: float = 1.5  # how long the simulated health check takes
    window: int = 8  # chunks per transfer window
    chunk_timeout_s: float = 15.0
    connect_rate: float = 400.0  # new connections per second
    keepalive: int = 60
    trusted_keys: tuple[str, ...] = ()  # public keys to check table_sig (none: not checked)
    seed: int = 0
    clean_session: bool = True

    def __post_init__(self) -> None:
        check_id(self.fleet, "fleet name")
        for g in self.groups:
            check_id(g, "group name")
        if self.devices < 1:
            raise ValueError("devices must be at least 1")
        if not (0.0 <= self.fail_rate <= 1.0 and 0.0 <= self.over_budget_rate <= 1.0):
            raise ValueError("fail_rate and over_budget_rate are shares between 0 and 1")
        if self.telemetry_qos not in (0, 1):
            raise ValueError("telemetry_qos must be 0 or 1")


@dataclass
class _Job:
    desired: DesiredState
    table: ChunkTable | None = None
    next_chunk: int = 0
    window: dict[int, bytes] = field(default_factory=dict)
    inflight: list[int] = field(default_factory=list)
    hasher: Any = field(default_factory=hashlib.sha256)
    deadline: float = 0.0
    attempts: int = 0
    phase: str = "downloading"
    last_progress: float = 0.0
    started: float = field(default_factory=time.monotonic)


class SimDevice:
    """One simulated device (all methods run on the simulator's loop thread)."""

    def __init__(self, sim: Simulator, index: int, device_id: str, *, fails_health: bool,
                 over_budget: bool, rng: random.Random) -> None:
        self.sim = sim
        self.index = index
        self.id = device_id
        self.fails_health = fails_health
        self.over_budget = over_budget
        self.rng = rng
        o = sim.opts
        t = sim.topics
        self.state_topic = t.state(device_id)
        self.telemetry_topic = t.telemetry(device_id)
        self.events_topic = t.events(device_id)
        self.desired_topic = t.desired(device_id)
        self.group_topics = {t.group_desired(g): g for g in o.groups}
        self.client: Any = None
        self.connected = False
        self.closing = False
        self.attempt = 0
        self.active: dict | None = None
        self.previous: dict | None = None
        self.slot: str | None = None
        self.manifests: dict[str, dict] = {}  # bundle id -> manifest of installed bundles
        self.desired_device: DesiredState | None = None
        self.desired_groups: dict[str, DesiredState] = {}
        self.handled: set[str] = set()
        self.failed: set[tuple[str, str]] = set()
        self.job: _Job | None = None
        self.started = time.time()
        self.peak_rss = 0.0
        self.base_latency = sim.base_latency_ms * rng.uniform(0.85, 1.15)
        self.base_rss = 48.0 + rng.uniform(0, 12)
        self.disk_free = 20000.0 + rng.uniform(-3000, 3000)
        self.telemetry_sent = 0

    # ---- MQTT plumbing
    def make_client(self) -> Any:
        import paho.mqtt.client as mqtt

        cfg = self.sim.cfg
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                        client_id=f"edgepack-{self.sim.opts.fleet}-{self.id}",
                        clean_session=self.sim.opts.clean_session, protocol=mqtt.MQTTv311)
        if cfg.username is not None:
            c.username_pw_set(cfg.username, cfg.password)
        if cfg.tls or cfg.ca or cfg.cert:
            import ssl

            c.tls_set(ca_certs=cfg.ca, certfile=cfg.cert, keyfile=cfg.key,
                      cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        c.will_set(self.state_topic, encode({"online": False, "device_id": self.id,
                                             "reason": "connection lost"}), qos=1, retain=True)
        c.max_inflight_messages_set(64)
        c.max_queued_messages_set(0)
        c.user_data_set(self)
        self.sim._bind(c)
        c.on_connect = lambda cl, u, flags, rc, props: self.sim._post(self._on_connect, rc)
        c.on_disconnect = lambda cl, u, flags, rc, props: self.sim._post(self._on_disconnect, rc)
        c.on_message = lambda cl, u, msg: self.sim._post(self._on_message, msg.topic,
                                                         bytes(msg.payload))
        self.client = c
        return c

    def connect(self) -> None:
        if self.closing:
            return
        cfg = self.sim.cfg
        c = self.client or self.make_client()
        try:
            if getattr(c, "_edgepack_started", False):
                c.reconnect()
            else:
                c._edgepack_started = True
                c.connect(cfg.host, cfg.port, keepalive=self.sim.opts.keepalive)
        except (OSError, ValueError) as exc:
            self.sim.counters["connect_failed"] += 1
            log.debug("%s: connect failed: %s", self.id, exc)
            self._retry_later()

    def _retry_later(self) -> None:
        self.attempt += 1
        delay = min(30.0, 0.5 * 2 ** min(self.attempt, 6)) * self.rng.uniform(0.5, 1.0)
        self.sim.call_later(delay, self.connect)

    def _on_connect(self, rc: Any) -> None:
        if getattr(rc, "is_failure", False):
            self.sim.counters["refused"] += 1
            return  # paho closes the socket; on_disconnect schedules the retry
        self.connected = True
        self.attempt = 0
        self.sim.counters["connects"] += 1
        self.publish_state()
        self.client.subscribe([(self.desired_topic, 1), *[(t, 1) for t in self.group_topics]])
        job = self.job
        if job is not None and job.table is None and job.phase == "downloading":
            self.client.subscribe(self.sim.topics.bundle_manifest(job.desired.bundle_id), 1)
        elif job is not None and job.inflight:
            self._request(job, [i for i in job.inflight if i not in job.window])

    def _on_disconnect(self, rc: Any) -> None:
        was = self.connected
        self.connected = False
        if was:
            self.sim.counters["disconnects"] += 1
        if not self.closing:
            self._retry_later()

    def publish(self, topic: str, body: dict, *, qos: int = 1, retain: bool = False) -> None:
        if self.client is None or not self.connected:
            return
        payload = json.dumps(body, separators=(",", ":")).encode() if "ts" in body \
            else encode(body)
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != 0:
            self.sim.counters["publish_failed"] += 1

    # ---- protocol
    def state_payload(self, online: bool = True) -> dict:
        o = self.sim.opts
        job = self.job
        return {
            "online": online, "device_id": self.id, "agent_version": self.sim.agent_version,
            "board": o.board or o.target, "target": o.target, "fleet": o.fleet,
            "groups": list(o.groups), "runtimes": {"onnxruntime": "1.20.1"},
            "active": self.active, "previous": self.previous, "slot": self.slot,
            "phase": job.phase if job else "idle",
            "deployment": {"deployment_id": job.desired.deployment_id,
                           "bundle_id": job.desired.bundle_id, "phase": job.phase}
            if job else None,
            "started_at": self.started, "simulated": True,
        }

    def publish_state(self) -> None:
        self.publish(self.state_topic, self.state_payload(), qos=1, retain=True)

    def event(self, kind: str, detail: str, desired: DesiredState | None = None,
              **extra: Any) -> None:
        body = {"kind": kind, "device_id": self.id, "detail": detail,
                "deployment_id": desired.deployment_id if desired else None,
                "bundle_id": desired.bundle_id if desired else None, **extra}
        self.sim.counters[f"event_{kind}"] += 1
        self.publish(self.events_topic, body, qos=1)

    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            if topic == self.desired_topic:
                self.desired_device = parse_desired(payload)
                self._reconcile()
            elif topic in self.group_topics:
                ds = parse_desired(payload)
                g = self.group_topics[topic]
                if ds is None:
                    self.desired_groups.pop(g, None)
                else:
                    self.desired_groups[g] = ds
                self._reconcile()
            elif self.job is not None:
                self._on_transfer_message(self.job, topic, payload)
        except EdgepackError as exc:
            self.event("error", str(exc))

    def effective_desired(self) -> DesiredState | None:
        if self.desired_device is not None:
            return self.desired_device
        if not self.desired_groups:
            return None
        return max(self.desired_groups.values(), key=lambda d: d.ts)

    def _reconcile(self) -> None:
        want = self.effective_desired()
        if want is None:
            return
        job = self.job
        if job is not None:
            if job.desired.bundle_id == want.bundle_id:
                job.desired = want
                return
            self._cancel(job)
        if self.active is not None and self.active.get("bundle_id") == want.bundle_id:
            if want.deployment_id not in self.handled:
                self.handled.add(want.deployment_id)
                self.event("installed", f"{self.active.get('name')} "
                           f"{self.active.get('version')} is already active", want,
                           slot=self.slot, already_active=True)
                self.publish_state()
            return
        if (want.deployment_id, want.bundle_id) in self.failed:
            return
        self.job = _Job(desired=want, deadline=time.monotonic() + self.sim.opts.chunk_timeout_s)
        if self.connected:
            self.client.subscribe(self.sim.topics.bundle_manifest(want.bundle_id), 1)
        self.publish_state()

    def _cancel(self, job: _Job) -> None:
        if self.connected:
            topics = [self.sim.topics.bundle_manifest(job.desired.bundle_id)]
            topics += [self.sim.topics.bundle_chunk(job.desired.bundle_id, i)
                       for i in job.inflight]
            self.client.unsubscribe(topics)
        self.job = None

    def _on_transfer_message(self, job: _Job, topic: str, payload: bytes) -> None:
        t = self.sim.topics
        bid = job.desired.bundle_id
        if job.table is None and topic == t.bundle_manifest(bid):
            if not payload:
                return
            self.client.unsubscribe(topic)
            try:
                table = parse_chunk_table(payload, expected_id=bid)
            except ProtocolError as exc:
                self._reject(job, f"malformed manifest message: {exc}", "malformed")
                return
            why = self._check_table(job, table)
            if why is not None:
                self._reject(job, *why)
                return
            job.table = table
            self.event("download_started", f"fetching {table.bytes} bytes in "
                       f"{len(table.chunks)} chunks of {table.chunk_size} (window "
                       f"{self.sim.opts.window})", job.desired, bytes=table.bytes,
                       chunks_total=len(table.chunks), chunk_size=table.chunk_size,
                       window=self.sim.opts.window)
            self._next_window(job)
            return
        prefix = f"{t.prefix}bundles/{bid}/chunks/"
        if job.table is None or not topic.startswith(prefix) or not payload:
            return
        try:
            i = int(topic[len(prefix):])
        except ValueError:
            return
        if i not in job.inflight or i in job.window:
            return
        if hashlib.sha256(payload).hexdigest() != job.table.chunks[i]:
            self._reject(job, f"chunk {i} does not match the signed chunk table", "tampered")
            return
        job.window[i] = payload
        if len(job.window) == len(job.inflight):
            for k in sorted(job.window):
                job.hasher.update(job.window[k])
            self.client.unsubscribe([t.bundle_chunk(bid, k) for k in job.inflight])
            job.next_chunk = max(job.inflight) + 1
            job.window.clear()
            job.inflight = []
            now = time.monotonic()
            total = len(job.table.chunks)
            if job.next_chunk < total and now - job.last_progress >= 1.0:
                job.last_progress = now
                self.event("download_progress", f"{job.next_chunk}/{total} chunks", job.desired,
                           chunks_done=job.next_chunk, chunks_total=total)
            self._next_window(job)

    def _check_table(self, job: _Job, table: ChunkTable) -> tuple[str, str] | None:
        keys = self.sim.keys
        if keys:
            from edgepack.agent.signing import canonical_json, verify_detached

            if table.table_sig is None:
                return "the chunk table is not signed", "signature"
            try:
                verify_detached(canonical_json(table.signed_part()), table.table_sig, keys,
                                what="chunk table")
            except EdgepackError as exc:
                return str(exc), "signature"
        m = table.manifest
        o = self.sim.opts
        if m.get("target") != o.target:
            return (f"bundle is built for target {m.get('target')!r}; this device runs "
                    f"{o.target!r}", "target")
        if self.active and m.get("name") == self.active.get("name") \
                and not job.desired.allow_downgrade \
                and _version(m.get("version")) < _version(self.active.get("version")):
            return (f"{m.get('name')} {m.get('version')} is older than the active "
                    f"{self.active.get('version')}: a downgrade", "downgrade")
        return None

    def _next_window(self, job: _Job) -> None:
        assert job.table is not None
        total = len(job.table.chunks)
        if job.next_chunk >= total:
            self._downloaded(job)
            return
        job.inflight = list(range(job.next_chunk, min(total, job.next_chunk + self.sim.opts.window)))
        job.attempts = 0
        self._request(job, job.inflight)

    def _request(self, job: _Job, indices: list[int]) -> None:
        job.deadline = time.monotonic() + self.sim.opts.chunk_timeout_s
        if self.connected and indices:
            self.client.subscribe([(self.sim.topics.bundle_chunk(job.desired.bundle_id, i), 1)
                                   for i in indices])

    def tick(self, now: float) -> None:
        """Transfer timeouts (called about once a second)."""
        job = self.job
        if job is None or job.phase != "downloading" or not self.connected or now < job.deadline:
            return
        job.attempts += 1
        if job.table is None:
            self.event("error", f"bundle {job.desired.bundle_id[:12]} is not published (no "
                       "retained manifest)", job.desired)
            self.failed.add((job.desired.deployment_id, job.desired.bundle_id))
            self.job = None
            self.publish_state()
        elif job.attempts > 2:
            self.event("error", f"chunks {job.inflight} did not arrive (asked 3 times); "
                       "giving up", job.desired)
            self.failed.add((job.desired.deployment_id, job.desired.bundle_id))
            self._cancel(job)
            self.publish_state()
        else:
            self._request(job, [i for i in job.inflight if i not in job.window])

    def _reject(self, job: _Job, why: str, reason: str) -> None:
        self.event("rejected", why, job.desired, reason=reason)
        self.failed.add((job.desired.deployment_id, job.desired.bundle_id))
        self._cancel(job)
        self.publish_state()

    def _downloaded(self, job: _Job) -> None:
        assert job.table is not None
        d = job.desired
        if job.hasher.hexdigest() != d.bundle_id:
            self._reject(job, "the downloaded file does not hash to the bundle id", "tampered")
            return
        m = job.table.manifest
        self.event("downloaded", f"{job.table.bytes} bytes, sha256 matches the bundle id", d,
                   stats={"seconds": round(time.monotonic() - job.started, 3),
                          "chunks_total": len(job.table.chunks)})
        signer = (job.table.table_sig or {}).get("key_id")
        self.event("verified", f"{m.get('name')} {m.get('version')} for {m.get('target')}"
                   + (f": signed by key {signer}" if signer else ""), d, key_id=signer,
                   name=m.get("name"), version=m.get("version"))
        new_slot = "B" if self.slot == "A" else "A"
        self.event("staged", f"unpacked into slot {new_slot}", d, slot=new_slot)
        job.phase = "health_checking"
        self.event("health_checking", "loading the model, running golden.npz (simulated)", d,
                   slot=new_slot)
        self.publish_state()
        self.sim.call_later(self.sim.opts.install_s * self.rng.uniform(0.7, 1.3),
                            lambda: self._health_done(job, new_slot))

    def _health_done(self, job: _Job, new_slot: str) -> None:
        if self.job is not job:
            return
        d = job.desired
        m = job.table.manifest if job.table else {}
        budgets = m.get("budgets") or {}
        p95 = round(self._latency_for(m)[1], 3)
        rss = round(self._rss_for(job.table.bytes if job.table else 0), 1)
        if self.fails_health:
            health = {"passed": False, "failures": ["output logits: cosine 0.62 < 0.999"],
                      "latency_ms": {"p95": p95}, "peak_rss_mb": rss}
            self.event("health_failed", "output logits: cosine 0.62 < 0.999 (simulated)", d,
                       health=health)
            self.event("rolled_back", f"{_label(self.active)} stays active" if self.active
                       else "no bundle was active; none is", d, reason="health_failed",
                       active=self.active)
            self.failed.add((d.deployment_id, d.bundle_id))
            self.job = None
            self.publish_state()
            return
        self.previous = self.active
        self.active = {"bundle_id": d.bundle_id, "name": m.get("name", d.name),
                       "version": m.get("version", d.version), "deployment_id": d.deployment_id,
                       "slot": new_slot, "installed_at": time.time()}
        self.manifests[d.bundle_id] = {"budgets": budgets, "bytes": job.table.bytes
                                       if job.table else 0, "name": m.get("name")}
        self.slot = new_slot
        self.handled.add(d.deployment_id)
        self.job = None
        health = {"passed": True, "failures": [], "latency_ms": {"p95": p95},
                  "peak_rss_mb": rss}
        self.event("installed", f"{self.active['name']} {self.active['version']} committed in "
                   f"slot {new_slot} (p95 {p95} ms, peak RSS {rss} MB)", d, slot=new_slot,
                   health=health, previous=self.previous)
        self.publish_state()

    # ---- telemetry
    def _latency_for(self, manifest: dict | None) -> tuple[float, float, float, float]:
        budgets = (manifest or {}).get("budgets") or {}
        budget = _num(budgets.get("p95_ms", budgets.get("p95_latency_ms")))
        base = self.base_latency
        if budget:
            base = min(base, budget * 0.35)
        if self.over_budget and budget:
            base = budget * 1.2
        jitter = self.rng.uniform(0.9, 1.1)
        p50 = base * jitter
        return p50, p50 * 1.35, p50 * 1.7, p50 * self.rng.uniform(1.8, 3.0)

    def _rss_for(self, bundle_bytes: int, budgets: dict | None = None) -> float:
        rss = self.base_rss + 1.6 * bundle_bytes / _MB + self.rng.uniform(-1.5, 1.5)
        limit = _num((budgets or {}).get("peak_rss_mb", (budgets or {}).get("rss_mb")))
        if self.over_budget and limit:
            rss = limit * 1.15
        return rss

    def send_telemetry(self) -> None:
        if not self.connected:
            self.sim.counters["telemetry_skipped"] += 1
            return
        o = self.sim.opts
        info = self.manifests.get(self.active["bundle_id"]) if self.active else None
        if info is not None:
            p50, p95, p99, mx = self._latency_for({"budgets": info["budgets"]})
            rate = self.rng.uniform(4.0, 6.0)
            inferences = int(rate * o.interval_s)
            errors = 1 if self.rng.random() < 0.02 else 0
            rss = self._rss_for(info["bytes"], info["budgets"])
            cpu = min(100.0, 8.0 + p50 * rate / 10.0 + self.rng.uniform(0, 6))
        else:
            p50 = p95 = p99 = mx = 0.0
            inferences = errors = 0
            rss = self.base_rss + self.rng.uniform(-1, 1)
            cpu = self.rng.uniform(0.5, 2.0)
        self.peak_rss = max(self.peak_rss, rss)
        now = time.time()
        body = {
            "device_id": self.id, "window_s": o.interval_s, "inferences": inferences,
            "errors": errors, "latency_ms": {"p50": round(p50, 3), "p95": round(p95, 3),
                                             "p99": round(p99, 3), "max": round(mx, 3),
                                             "mean": round(p50 * 1.05, 3)},
            "rss_mb": round(rss, 2), "peak_rss_mb": round(self.peak_rss, 2),
            "cpu_percent": round(cpu, 1),
            "temperature_c": round(42.0 + cpu * 0.3 + 4 * math.sin(now / 300 + self.index)
                                   + self.rng.uniform(-0.5, 0.5), 1),
            "disk_free_mb": round(self.disk_free, 1), "uptime_s": round(now - self.started, 1),
            "bundle_id": self.active["bundle_id"] if self.active else None,
            "bundle": {"name": self.active.get("name"), "version": self.active.get("version")}
            if self.active else None,
            "phase": self.job.phase if self.job else "idle",
            "outbox_dropped": 0, "outbox_pending": 0, "seq": self.telemetry_sent, "ts": now,
        }
        self.telemetry_sent += 1
        self.sim.counters["telemetry"] += 1
        self.publish(self.telemetry_topic, body, qos=o.telemetry_qos)


class Simulator:
    """Run ``opts.devices`` simulated devices against a broker until :meth:`stop`."""

    def __init__(self, broker: BrokerConfig | str, options: SimOptions | None = None) -> None:
        self.cfg = parse_broker_url(broker) if isinstance(broker, str) else broker
        self.opts = options or SimOptions()
        self.topics = Topics(self.opts.fleet)
        from edgepack.agent import __version__

        self.agent_version = f"{__version__}-sim"
        self.keys: dict[str, Any] = {}
        if self.opts.trusted_keys:
            from edgepack.agent.signing import load_public_keys

            self.keys = load_public_keys(self.opts.trusted_keys)
        self.base_latency_ms = self._base_latency()
        self.counters: Counter[str] = Counter()
        rng = random.Random(self.opts.seed)
        n = self.opts.devices
        order = list(range(n))
        rng.shuffle(order)
        n_fail = round(self.opts.fail_rate * n)
        n_over = round(self.opts.over_budget_rate * n)
        failing = set(order[:n_fail])
        over = set(order[n_fail:n_fail + n_over])
        width = max(4, len(str(self.opts.start_index + n - 1)))
        self.devices = [
            SimDevice(self, i, f"{self.opts.prefix}-{self.opts.start_index + i:0{width}d}",
                      fails_health=i in failing, over_budget=i in over,
                      rng=random.Random(f"{self.opts.seed}-{i}"))
            for i in range(n)]
        self.by_id = {d.id: d for d in self.devices}
        self._sel = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._posted: list[tuple[Callable[..., None], tuple]] = []
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._pending_writes: set[Any] = set()
        self._blocked: set[Any] = set()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name="edgepack-simulator", daemon=True)
        self._stop = threading.Event()
        self._stopped = threading.Event()

    def _base_latency(self) -> float:
        try:
            from edgepack.agent.profiles import load_profile

            return float(load_profile(self.opts.target).budgets.p95_ms) * 0.12
        except (EdgepackError, AttributeError, ValueError):
            return 12.0

    # ---- public API (any thread)
    def start(self) -> Simulator:
        self._thread.start()
        return self

    def stop(self, graceful: bool = True, timeout: float = 15.0) -> None:
        """Disconnect every device: ``graceful`` publishes an offline state first (as a stopping
        agent does); otherwise the sockets just close and the broker sends each LWT."""
        if self._stopped.is_set() or not self._thread.is_alive():
            return
        self._command(lambda: self._shutdown(graceful))
        self._thread.join(timeout)

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def drop(self, device_id: str) -> None:
        """Cut a device's connection without DISCONNECT (the broker publishes its LWT) and keep
        it away until :meth:`revive`."""
        self._command(lambda: self._drop(self.by_id[device_id]))

    def revive(self, device_id: str) -> None:
        def go() -> None:
            d = self.by_id[device_id]
            d.closing = False
            d.attempt = 0
            d.connect()
        self._command(go)

    def online_count(self) -> int:
        return sum(d.connected for d in self.devices)

    def wait_online(self, n: int | None = None, timeout: float = 60.0) -> bool:
        """Block until ``n`` (default: all) devices are connected and announced."""
        want = self.opts.devices if n is None else n
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.online_count() >= want:
                return True
            time.sleep(0.05)
        return False

    def stats(self) -> dict[str, Any]:
        c = dict(self.counters)
        return {"devices": self.opts.devices, "online": self.online_count(),
                "failing_health": sum(d.fails_health for d in self.devices),
                "over_budget": sum(d.over_budget for d in self.devices),
                "telemetry_sent": c.get("telemetry", 0), "counters": c,
                "active": dict(Counter(d.active["version"] if d.active else "none"
                                       for d in self.devices))}

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        """Schedule ``fn`` on the loop thread (call only from the loop thread)."""
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), fn))

    # ---- loop internals
    def _command(self, fn: Callable[[], None]) -> None:
        self._commands.put(fn)
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        self._posted.append((fn, args))

    def _bind(self, c: Any) -> None:
        sel = self._sel
        pending = self._pending_writes

        def opened(client: Any, userdata: Any, sock: Any) -> None:
            with contextlib.suppress(KeyError, ValueError):
                sel.unregister(sock)
            sel.register(sock, selectors.EVENT_READ, client)

        def closed(client: Any, userdata: Any, sock: Any) -> None:
            pending.discard(client)
            with contextlib.suppress(KeyError, ValueError):
                sel.unregister(sock)

        # paho asks for a writable socket after every packet it queues: collect those clients
        # and write once per loop round, asking epoll only when the kernel buffer is full
        def want_write(client: Any, userdata: Any, sock: Any) -> None:
            pending.add(client)

        def no_write(client: Any, userdata: Any, sock: Any) -> None:
            pending.discard(client)
            if client in self._blocked:
                self._blocked.discard(client)
                with contextlib.suppress(KeyError, ValueError):
                    sel.modify(sock, selectors.EVENT_READ, client)

        c.on_socket_open = opened
        c.on_socket_close = closed
        c.on_socket_register_write = want_write
        c.on_socket_unregister_write = no_write

    def _flush_writes(self) -> None:
        while self._pending_writes:
            batch = list(self._pending_writes)
            self._pending_writes.clear()
            for client in batch:
                client.loop_write()
                sock = client.socket()
                if sock is not None and client.want_write() and client not in self._blocked:
                    self._blocked.add(client)  # kernel buffer full: wait for writability
                    with contextlib.suppress(KeyError, ValueError):
                        self._sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE,
                                         client)
            self._pending_writes -= self._blocked
            self._drain_posted()

    def _run(self) -> None:
        try:
            self._loop()
        except Exception:  # pragma: no cover - a bug: say so, then stop cleanly
            log.exception("simulator loop crashed")
            raise
        finally:
            self._stopped.set()

    def _loop(self) -> None:
        o = self.opts
        spacing = 1.0 / o.connect_rate if o.connect_rate > 0 else 0.0
        for k, d in enumerate(self.devices):
            self.call_later(k * spacing, d.connect)
            offset = k * spacing + 1.0 + d.rng.uniform(0, o.interval_s)
            self.call_later(offset, self._telemetry_timer(d))
        next_misc = time.monotonic() + 1.0
        while not self._stopped.is_set():
            self._flush_writes()
            now = time.monotonic()
            timeout = 0.5
            if self._timers:
                timeout = max(0.0, min(timeout, self._timers[0][0] - now))
            for key, mask in self._sel.select(timeout):
                client = key.data
                if client is None:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                    continue
                if mask & selectors.EVENT_READ:
                    client.loop_read(64)
                if mask & selectors.EVENT_WRITE:
                    client.loop_write()
            self._drain_posted()
            while True:
                try:
                    fn = self._commands.get_nowait()
                except queue.Empty:
                    break
                fn()
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _, _, fn = heapq.heappop(self._timers)
                fn()
                self._drain_posted()
            if now >= next_misc and not self._stop.is_set():
                next_misc = now + 1.0
                for d in self.devices:
                    if d.client is not None and d.client.socket() is not None:
                        d.client.loop_misc()
                    d.tick(now)
                self._drain_posted()
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def _drain_posted(self) -> None:
        while self._posted:
            posted, self._posted = self._posted, []
            for fn, args in posted:
                try:
                    fn(*args)
                except EdgepackError as exc:
                    log.warning("simulated device: %s", exc)

    def _telemetry_timer(self, d: SimDevice) -> Callable[[], None]:
        def fire() -> None:
            if self._stop.is_set():
                return
            d.send_telemetry()
            self.call_later(self.opts.interval_s, fire)
        return fire

    def _drop(self, d: SimDevice) -> None:
        d.closing = True
        d.connected = False
        sock = d.client.socket() if d.client is not None else None
        if sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(sock)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            d.client = None  # the old paho client is abandoned with its socket
            with contextlib.suppress(OSError):
                sock.close()

    def _shutdown(self, graceful: bool) -> None:
        self._stop.set()
        self._timers.clear()
        for d in self.devices:
            d.closing = True
            if d.client is None:
                continue
            if graceful and d.connected:
                d.publish(d.state_topic, d.state_payload(online=False), qos=1, retain=True)
                d.client.disconnect()
            else:
                self._drop(d)
        # give paho a moment to flush the offline states and DISCONNECTs
        deadline = time.monotonic() + 5.0

        def check() -> None:
            if time.monotonic() > deadline:
                for d in self.devices:
                    if d.client is not None and d.client.socket() is not None:
                        self._drop(d)
                self._stopped.set()
            elif any(d.client is not None and d.client.socket() is not None
                     for d in self.devices):
                self.call_later(0.05, check)
            else:
                self._stopped.set()
        self.call_later(0.05, check)


def _label(active: dict | None) -> str:
    if not active:
        return ""
    return f"{active.get('name')} {active.get('version')} ({str(active.get('bundle_id'))[:12]})"


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _version(v: Any) -> tuple:
    try:
        from edgepack.agent.bundle import parse_version

        return parse_version(str(v))
    except EdgepackError:
        return ()


