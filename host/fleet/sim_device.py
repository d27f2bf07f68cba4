"""One simulated device of ``edgepack fleet simulate``: the protocol as ``edgepack-agent`` speaks
it (every report signed by the device's own, in-memory key), with the agent's own reconcile, compatibility checks and chunk transfer (chunks hashed in
memory, never written); the health check, the model and the telemetry figures are simulated.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from edgepack.agent.chunkstore import MemoryChunks
from edgepack.agent.compat import DeviceFacts, check_compat
from edgepack.agent.errors import BrokerError, BundleError, EdgepackError
from edgepack.agent.identity import DeviceIdentity
from edgepack.agent.mqtt import MqttClient, MqttError
from edgepack.agent.protocol import ChunkTable, DesiredState, parse_desired
from edgepack.agent.reconcile import Action, decide, effective_desired
from edgepack.agent.states import Phase
from edgepack.agent.transfer import Rejected, Transfer

if TYPE_CHECKING:
    from edgepack.host.fleet.simulator import Simulator

__all__ = ["SimDevice", "SIM_RUNTIMES"]

log = logging.getLogger("edgepack.simulator")
_MB = 1024 * 1024
SIM_RUNTIMES = {"onnxruntime": "1.20.1"}


class _Job:
    """A deployment on a simulated device: the agent's transfer, then a simulated install."""

    def __init__(self, desired: DesiredState, transfer: Transfer) -> None:
        self.desired = desired
        self.transfer = transfer
        self.phase = Phase.DOWNLOADING
        self.last_progress = 0.0


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
        self.downgrade_topic = t.downgrade(device_id)
        self.group_topics = {t.group_desired(g): g for g in o.groups}
        self.facts = DeviceFacts(o.target, runtimes=SIM_RUNTIMES)
        self.client: MqttClient | None = None
        self.connected = False
        self.closing = False
        self.attempt = 0
        self.active: dict | None = None
        self.previous: dict | None = None
        self.slot: str | None = None
        self.manifests: dict[str, dict] = {}  # bundle id -> manifest of installed bundles
        self.desired_device: DesiredState | None = None
        self.desired_groups: dict[str, DesiredState] = {}
        self.downgrade_to: str | None = None  # bundle id a (v2) downgrade authorization names
        self.handled: set[str] = set()
        self.failed: set[tuple[str, str]] = set()
        self.job: _Job | None = None
        self.started = time.time()
        self.peak_rss = 0.0
        self.base_latency = sim.base_latency_ms * rng.uniform(0.85, 1.15)
        self.base_rss = 48.0 + rng.uniform(0, 12)
        self.disk_free = 20000.0 + rng.uniform(-3000, 3000)
        self.telemetry_sent = 0
        self.identity = DeviceIdentity.ephemeral()  # enrolled by Simulator.enroll

    # ---- MQTT plumbing
    def make_client(self) -> MqttClient:
        o = self.sim.opts
        will = (self.state_topic, self.encode({"online": False, "device_id": self.id,
                                               "reason": "connection lost"}), 1, True)
        self.client = MqttClient(self.sim.cfg, f"edgepack-{o.fleet}-{self.id}",
                                 handler=lambda event: self.sim.post(self._on_event, event),
                                 clean_session=o.clean_session, will=will,
                                 keepalive=o.keepalive, sockets=self.sim)
        return self.client

    def connect(self) -> None:
        if self.closing:
            return
        c = self.client or self.make_client()
        try:
            c.connect()
        except MqttError as exc:
            self.sim.counters["connect_failed"] += 1
            log.debug("%s: connect failed: %s", self.id, exc)
            self._retry_later()

    def _retry_later(self) -> None:
        self.attempt += 1
        delay = min(30.0, 0.5 * 2 ** min(self.attempt, 6)) * self.rng.uniform(0.5, 1.0)
        self.sim.call_later(delay, self.connect)

    def _on_event(self, event: tuple) -> None:
        kind = event[0]
        if kind == "message":
            self._on_message(event[1], event[2])
        elif kind == "connected":
            self._on_connect()
        elif kind == "refused":
            self.sim.counters["refused"] += 1  # paho closes the socket: "disconnected" follows
        elif kind == "disconnected":
            self._on_disconnect()

    def _on_connect(self) -> None:
        self.connected = True
        self.attempt = 0
        self.sim.counters["connects"] += 1
        self.publish_state()
        self.subscribe([self.downgrade_topic, self.desired_topic, *self.group_topics])
        if self.job is not None:
            self.job.transfer.on_connected()

    def _on_disconnect(self) -> None:
        was = self.connected
        self.connected = False
        if was:
            self.sim.counters["disconnects"] += 1
        if self.job is not None:
            self.job.transfer.on_disconnected()
        if not self.closing:
            self._retry_later()

    # the transfer's Link
    def subscribe(self, topics: list[str], qos: int = 1) -> None:
        if self.client is None:
            raise BrokerError(f"{self.id} has no connection")
        self.client.subscribe(topics, qos)

    def unsubscribe(self, topics: list[str]) -> None:
        if self.client is None:
            raise BrokerError(f"{self.id} has no connection")
        self.client.unsubscribe(topics)

    def publish(self, topic: str, body: dict, *, qos: int = 1, retain: bool = False) -> None:
        if self.client is None or not self.connected:
            return
        payload = self.encode(body)
        try:
            self.client.publish(topic, payload, qos=qos, retain=retain)
        except BrokerError:
            self.sim.counters["publish_failed"] += 1

    def encode(self, body: dict) -> bytes:
        """A report as the agent publishes it: ``ts`` added when missing, signed by the
        device key."""
        return self.identity.encode(body if "ts" in body else {**body, "ts": time.time()})

    # ---- protocol
    def state_payload(self, online: bool = True) -> dict:
        o = self.sim.opts
        job = self.job
        return {
            "online": online, "device_id": self.id, "agent_version": self.sim.agent_version,
            "board": o.board or o.target, "target": o.target, "fleet": o.fleet,
            "groups": list(o.groups), "runtimes": dict(SIM_RUNTIMES),
            "active": self.active, "previous": self.previous, "slot": self.slot,
            "phase": job.phase.value if job else "idle",
            "deployment": {"deployment_id": job.desired.deployment_id,
                           "bundle_id": job.desired.bundle_id, "phase": job.phase.value}
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
            elif topic == self.downgrade_topic:
                self.downgrade_to = _downgrade_target(payload)
            elif topic in self.group_topics:
                ds = parse_desired(payload)
                g = self.group_topics[topic]
                if ds is None:
                    self.desired_groups.pop(g, None)
                else:
                    self.desired_groups[g] = ds
                self._reconcile()
            elif self.job is not None and self.job.transfer.wants(topic):
                self.job.transfer.on_message(topic, payload)
                self._after_transfer(self.job)
        except EdgepackError as exc:
            self.event("error", str(exc))

    def effective_desired(self) -> DesiredState | None:
        return effective_desired(self.desired_device, self.desired_groups, self.sim.opts.groups)

    def _reconcile(self) -> None:
        job = self.job
        active = self.active.get("bundle_id") if self.active else None
        plan = decide(self.effective_desired(), working=job.desired if job else None,
                      active_bundle=active, reported=self.handled.__contains__,
                      failed=lambda dep, bid: (dep, bid) in self.failed)
        if plan.cancel is not None and job is not None:
            job.transfer.cancel()
            self.job = None
        want = plan.desired
        if want is None:
            return
        if plan.action == Action.CARRY_ON and job is not None:
            job.desired = want
        elif plan.action == Action.REPORT and self.active is not None:
            self.handled.add(want.deployment_id)
            self.event("installed", f"{self.active.get('name')} {self.active.get('version')} "
                       "is already active", want, slot=self.slot, already_active=True)
            self.publish_state()
        elif plan.action == Action.INSTALL:
            self._start(want)

    # ---- install: the agent's transfer into memory, then a simulated install
    def _start(self, want: DesiredState) -> None:
        o = self.sim.opts

        def precheck(table: ChunkTable) -> None:
            a = self.active
            authorized = replace(want, allow_downgrade=True) \
                if self.downgrade_to == want.bundle_id else want
            check_compat(table.manifest, authorized, self.facts,
                         (str(a.get("name")), str(a.get("version"))) if a else None)

        tr = Transfer(want.bundle_id, topics=self.sim.topics, store=MemoryChunks(), link=self,
                      keys=self.sim.keys, allow_unsigned=not self.sim.keys, window=o.window,
                      chunk_timeout_s=o.chunk_timeout_s, manifest_timeout_s=o.chunk_timeout_s,
                      max_bundle_mb=1e6, min_free_mb=0,
                      precheck=precheck, on_started=self._on_started,
                      on_progress=self._on_progress)
        self.job = _Job(want, tr)
        tr.start(self.connected)
        self.publish_state()
        self._after_transfer(self.job)

    def _on_started(self, tr: Transfer) -> None:
        st = tr.stats
        assert self.job is not None
        self.event("download_started", f"fetching {st.bytes} bytes in {st.chunks_total} chunks "
                   f"of {st.chunk_size} (window {st.window})", self.job.desired, bytes=st.bytes,
                   chunks_total=st.chunks_total, chunk_size=st.chunk_size, window=st.window)

    def _on_progress(self, tr: Transfer) -> None:
        job = self.job
        now = time.monotonic()
        st = tr.stats
        if job is None or st.chunks_done >= st.chunks_total or now - job.last_progress < 1.0:
            return
        job.last_progress = now
        self.event("download_progress", f"{st.chunks_done}/{st.chunks_total} chunks",
                   job.desired, chunks_done=st.chunks_done, chunks_total=st.chunks_total)

    def tick(self, now: float) -> None:
        """Transfer timeouts (called about once a second)."""
        job = self.job
        if job is not None and job.phase == Phase.DOWNLOADING:
            job.transfer.tick()
            self._after_transfer(job)

    def _after_transfer(self, job: _Job) -> None:
        tr = job.transfer
        if self.job is not job or job.phase != Phase.DOWNLOADING or not tr.done:
            return
        d = job.desired
        if tr.state == "done":
            self._downloaded(job)
            return
        exc = tr.error
        if isinstance(exc, (Rejected, BundleError)):
            self.event("rejected", str(exc), d, reason=getattr(exc, "reason", "invalid"))
        else:
            self.event("error", f"{exc}; giving up", d)
        self.failed.add((d.deployment_id, d.bundle_id))
        self.job = None
        self.publish_state()

    def _downloaded(self, job: _Job) -> None:
        tr = job.transfer
        assert tr.table is not None
        d = job.desired
        m = tr.table.manifest
        self.event("downloaded", f"{tr.stats.bytes} bytes, sha256 matches the bundle id", d,
                   stats=tr.stats.to_dict())
        signer = (tr.table.table_sig or {}).get("key_id")
        self.event("verified", f"{m.get('name')} {m.get('version')} for {m.get('target')}"
                   + (f": signed by key {signer}" if signer else ""), d, key_id=signer,
                   name=m.get("name"), version=m.get("version"))
        new_slot = "B" if self.slot == "A" else "A"
        self.event("staged", f"unpacked into slot {new_slot}", d, slot=new_slot)
        job.phase = Phase.HEALTH_CHECKING
        self.event("health_checking", "loading the model, running golden.npz (simulated)", d,
                   slot=new_slot)
        self.publish_state()
        self.sim.call_later(self.sim.opts.install_s * self.rng.uniform(0.7, 1.3),
                            lambda: self._health_done(job, new_slot))

    def _health_done(self, job: _Job, new_slot: str) -> None:
        if self.job is not job:
            return
        d = job.desired
        table = job.transfer.table
        m = table.manifest if table else {}
        size = table.bytes if table else 0
        budgets = m.get("budgets") or {}
        p95 = round(self._latency_for(m)[1], 3)
        rss = round(self._rss_for(size), 1)
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
        self.manifests[d.bundle_id] = {"budgets": budgets, "bytes": size, "name": m.get("name")}
        self.slot = new_slot
        self.handled.add(d.deployment_id)
        self.job = None
        health = {"passed": True, "failures": [], "latency_ms": {"p95": p95},
                  "peak_rss_mb": rss}
        self.event("installed", f"{self.active['name']} {self.active['version']} committed in "
                   f"slot {new_slot} (p95 {p95} ms, peak RSS {rss} MB)", d, slot=new_slot,
                   health=health, previous=self.previous)
        self.publish_state()

    def shutdown(self, graceful: bool) -> None:
        """Publish the offline state and DISCONNECT (graceful), or leave it to the caller to
        cut the socket."""
        self.closing = True
        if self.job is not None:
            self.job.transfer.cancel()
        if graceful and self.connected and self.client is not None:
            self.publish(self.state_topic, self.state_payload(online=False), qos=1, retain=True)
            with contextlib.suppress(BrokerError):
                self.client.disconnect()
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


def _label(active: dict | None) -> str:
    if not active:
        return ""
    return f"{active.get('name')} {active.get('version')} ({str(active.get('bundle_id'))[:12]})"


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _downgrade_target(payload: bytes) -> str | None:
    """The bundle a downgrade authorization names (simulated devices do not verify it)."""
    from edgepack.agent.trust import parse_control

    try:
        t = parse_control(payload).target
    except EdgepackError:
        return None
    return t.bundle_id if t is not None else None
