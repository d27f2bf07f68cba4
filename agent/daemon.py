"""``edgepack-agent --config agent.toml``: the on-device daemon.

Threads and who does what:

* a small *connector* thread owns the MQTT connection: it connects with a stable client id and a
  persistent session (``clean_session = False``), sets the LWT (``{"online": false}``, retained,
  on ``devices/{id}/state``) and reconnects with exponential backoff and jitter;
* paho's network thread (one per connection) only puts what arrives into the agent's inbox;
* the *agent loop* (:meth:`Agent.run`, the main thread) does all the work: desired states,
  transfers, verification, install, health gate, telemetry, the outbox;
* the inference endpoint serves applications from its own threads.

SIGTERM or SIGINT: the loop stops, a transfer in progress keeps its files for a later resume, a
running health check is killed (the install is redone next start), the retained state says
``online: false``, and the process exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import queue
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

from edgepack.agent import __version__
from edgepack.agent.capture import Capture
from edgepack.agent.compat import DeviceFacts
from edgepack.agent.config import AgentConfig, load_config
from edgepack.agent.controls import ControlDesk
from edgepack.agent.deployment import Deployment, label
from edgepack.agent.drift import load_sketcher
from edgepack.agent.errors import BrokerError, EdgepackError, InstallError
from edgepack.agent.health import HealthOptions, run_health_check
from edgepack.agent.identity import DeviceIdentity
from edgepack.agent.inbox import Inbox
from edgepack.agent.inference import InferenceServer, InferenceService, Model
from edgepack.agent.installer import Installer
from edgepack.agent.mqtt import Connection
from edgepack.agent.outbox import Outbox
from edgepack.agent.profiler import Profiler
from edgepack.agent.protocol import DesiredState, Topics
from edgepack.agent.reconcile import Action, decide, effective_desired
from edgepack.agent.runtimes import available_runtimes, runtime_version
from edgepack.agent.signing import load_public_keys
from edgepack.agent.states import Phase
from edgepack.agent.system import lock_data_dir, ram_mb, return_freed_memory, sd_notify
from edgepack.agent.telemetry import LatencyStats, SystemSampler
from edgepack.agent.trust import ControlRefused, DesiredGate

__all__ = ["Agent", "main"]

log = logging.getLogger("edgepack.agent")
_MB = 1024 * 1024
_MAX_INFLIGHT = 32
#: profile job refusals anyone can provoke without a key: at most _JOB_ANSWERS answers a minute
#: (an operator's mistakes still get their answers; a storm of junk jobs is counted instead)
_STORM_REFUSALS = ("malformed", "signature", "duplicate", "expired")
_JOB_ANSWERS = 8


class Agent:
    """The device agent. ``run()`` blocks until :meth:`request_stop` (or SIGTERM via main)."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self._lock_fd = lock_data_dir(Path(cfg.data_dir))
        self.topics = Topics(cfg.fleet)
        self.keys = load_public_keys(cfg.trusted_keys) if cfg.trusted_keys else {}
        self.gate = DesiredGate(cfg.data_dir, device_id=cfg.device_id, fleet=cfg.fleet,
                                groups=cfg.groups, trusted_keys=cfg.trusted_keys,
                                root_file=cfg.trust_root, allow_unsigned=cfg.allow_unsigned)
        self._freshness: tuple[str, tuple[str, ...]] | None = None  # last reported
        self.installer = Installer(cfg.data_dir)
        # the device key (made by ``agent init``, or here on first start) signs every report
        self.identity = DeviceIdentity.load_or_create(cfg.data_dir)
        self.outbox = Outbox(Path(cfg.data_dir) / "outbox.sqlite",
                             cfg.telemetry.outbox_max_bytes, encode=self.identity.encode)
        self.stats = LatencyStats()
        self.service = InferenceService(self.stats)
        self.sampler = SystemSampler(cfg.data_dir)
        self.inbox = Inbox(max_bytes=int(cfg.broker.inbox_max_mb * _MB))
        self.runtimes = {name: runtime_version(name) for name in available_runtimes()}
        self.facts = DeviceFacts(cfg.target, tuple(cfg.compatible_targets), self.runtimes,
                                 ram_mb())
        self.connected = False
        self.desired_device: DesiredState | None = None
        self.desired_groups: dict[str, DesiredState] = {}
        self.job: Deployment | None = None
        self.server: InferenceServer | None = None
        self._stop = threading.Event()
        self._inflight: dict[tuple[int, int], int] = {}
        self._sent_upto = 0
        self._next_telemetry = time.monotonic() + cfg.telemetry.interval_s
        self._next_watchdog = 0.0
        self._started = time.time()
        self.state_topic = self.topics.state(cfg.device_id)
        self.events_topic = self.topics.events(cfg.device_id)
        self.telemetry_topic = self.topics.telemetry(cfg.device_id)
        self.desired_topic = self.topics.desired(cfg.device_id)
        self.downgrade_topic = self.topics.downgrade(cfg.device_id)
        self.group_topics = {self.topics.group_desired(g): g for g in cfg.groups}
        self.capture = Capture(cfg.data_dir, device_id=cfg.device_id)  # off unless asked
        self.capture_topic = self.topics.device(cfg.device_id, "capture")
        self.controls = ControlDesk(self.gate, self.keys, self.topics, self.capture,
                                    self.capture_topic, self.event)
        self.refused, self.errors = self.controls.refused, self.controls.errors  # telemetry
        # a burst on these keeps only the newest message per topic (one verification)
        self.inbox.keep_latest([self.desired_topic, *self.group_topics, self.downgrade_topic,
                                self.topics.freshness, self.capture_topic])
        will = (self.state_topic, self.signed({"online": False, "device_id": cfg.device_id,
                                               "reason": "connection lost"}), 1, True)
        b = cfg.broker
        self.net = Connection(cfg.broker_config(), f"edgepack-{cfg.fleet}-{cfg.device_id}",
                              will, self.inbox, b.reconnect_min_s, b.reconnect_max_s,
                              protocol=b.protocol, max_packet_size=b.max_packet_kb * 1024,
                              session_expiry_s=b.session_expiry_s)
        # Profile jobs run in the profiler's thread; its answers come back through the inbox
        # because only this loop writes the outbox.
        self.profiler = Profiler(cfg, self.topics, link=self.net, keys=self.keys,
                                 emit=lambda topic, body: self.inbox.put(("emit", 0, topic, body)),
                                 busy=lambda: self.job is not None, gate=self.gate,
                                 refused=self.controls.control_refused)

    # ------------------------------------------------------------------ lifecycle
    def request_stop(self) -> None:
        """Ask the loop to finish (thread-safe; safe from a signal handler)."""
        self._stop.set()
        self.inbox.put(("stop", 0))

    def run(self) -> int:
        """Boot, serve and work until stopped; returns the process exit status."""
        cfg = self.cfg
        boot = self.installer.boot(crash_window_s=cfg.health.crash_window_s,
                                   max_crashes=cfg.health.max_crashes)
        if boot.interrupted:
            cand = boot.interrupted.candidate
            log.warning("install of %s was interrupted in phase %s; resuming: %s",
                        cand.bundle_id[:12] if cand else "?", boot.interrupted.phase,
                        boot.resume.value)
        if boot.unclean and boot.crashes:
            log.warning("unclean restart %d within the crash window after the last commit",
                        boot.crashes)
        if boot.rolled_back is not None:
            rb = boot.rolled_back
            active = self.installer.active
            self.event("rolled_back", f"{rb.name} {rb.version} crashed the agent "
                        f"{cfg.health.max_crashes} times within {cfg.health.crash_window_s:g}s "
                        f"of its commit; back to {active.name} {active.version}" if active else
                        "back to no bundle", deployment_id=rb.deployment_id,
                        bundle_id=rb.bundle_id, reason="crash_loop")
        if self.outbox.recovered:
            self.event("error", self.outbox.recovered, reason="outbox_recovered")
        if self.installer.damaged:
            self._recover_state(self.installer.damaged)
        self.load_active()
        active = self.installer.active
        if active is not None:  # a crash between a commit and its floor leaves it lower
            self.gate.record_install(active.name, active.version)
        if cfg.socket_path is not None or cfg.serve.http:
            self.server = InferenceServer(self.service, socket_path=cfg.socket_path,
                                          http=cfg.serve.http).start()
        self.net.start()
        sd_notify("READY=1")
        log.info("edgepack-agent %s: device %s, fleet %s, target %s, active %s", __version__,
                 cfg.device_id, cfg.fleet, cfg.target,
                 label(self.installer.active) or "none")
        try:
            self._loop()
        finally:
            self._shutdown()
        return 0

    def _loop(self) -> None:
        while not self._stop.is_set():
            busy = self.job is not None and self.job.phase in (Phase.HEALTH_CHECKING,
                                                               Phase.DOWNLOADING)
            wait = min(0.05 if busy else 0.5, self._next_telemetry - time.monotonic())
            try:
                item = self.inbox.get(timeout=max(0.001, wait))
            except queue.Empty:
                item = None
            handled = 0
            while item is not None:
                try:
                    self._handle(item)
                except EdgepackError as exc:  # a bad message must not stop the agent
                    log.warning("%s", exc)
                    if not self.controls.quiet((item[0], type(exc).__name__), self.errors,
                                       type(exc).__name__):
                        self.event("error", str(exc))
                handled += 1
                if handled >= 256 or self._stop.is_set():
                    break
                try:
                    item = self.inbox.get_nowait()
                except queue.Empty:
                    item = None
            self._tick()

    def _shutdown(self) -> None:
        sd_notify("STOPPING=1")
        if self.job is not None:
            self.job.stop()
        self.profiler.close()
        self.net.close((self.state_topic, self.signed(self._state_payload(online=False))),
                       self.connected)
        if self.server is not None:
            self.server.close()
        self.installer.clean_exit()
        self.outbox.close()
        os.close(self._lock_fd)
        log.info("edgepack-agent stopped")

    # ------------------------------------------------------------------ inbox
    def _handle(self, item: tuple) -> None:
        kind, gen = item[0], item[1]
        if kind == "message":
            self._on_message(item[2], item[3])
        elif kind == "puback":
            rid = self._inflight.pop((gen, item[2]), None)
            if rid is not None:
                self.outbox.ack(rid)
        elif kind == "connected" and gen == self.net.gen:
            self._on_connected()
        elif kind == "disconnected" and gen == self.net.gen:
            if self.connected:
                log.warning("disconnected from %s (%s); reconnecting", self.net.cfg.url, item[2])
            self._on_disconnected()
        elif kind in ("connect_failed", "refused") and gen == self.net.gen:
            self._on_disconnected()
            log.warning("cannot connect to %s: %s", self.net.cfg.url, item[2])
        elif kind == "emit":  # a profile job's answer, from the profiler thread
            reason = item[3].get("reason") if item[3].get("kind") == "refused" else None
            if reason in _STORM_REFUSALS and self.controls.quiet(
                    ("job",), self.refused, f"job_{reason}", burst=_JOB_ANSWERS):
                return  # a storm of junk jobs: counted, not answered one by one
            try:
                self.outbox.put(item[2], item[3], qos=1)
            except sqlite3.Error as exc:
                log.error("cannot queue %s: %s", item[2], exc)

    def _on_connected(self) -> None:
        self.connected = True
        self._inflight.clear()
        self._sent_upto = 0
        log.info("connected to %s", self.net.cfg.url)
        self.publish_state()
        try:
            # the downgrade before the desired states it allows
            self.net.subscribe([self.controls.root_prefix + "+", self.downgrade_topic,
                                self.topics.freshness])
            self.net.subscribe([self.desired_topic, *self.group_topics])
            self.net.subscribe([self.profiler.jobs_topic, self.capture_topic])
        except BrokerError as exc:  # the connection dropped again: the next one subscribes
            log.warning("%s", exc)
        self.profiler.on_connected()
        if self.job is not None:
            self.job.on_connected()
        self._flush_outbox()

    def _on_disconnected(self) -> None:
        self.connected = False
        self._inflight.clear()
        self._sent_upto = 0
        self.profiler.on_disconnected()
        if self.job is not None:
            self.job.on_disconnected()

    def _on_message(self, topic: str, payload: bytes) -> None:
        if self.profiler.wants(topic):  # its jobs, and chunks it fetches (maybe an install's too)
            self.profiler.on_message(topic, payload)
        if topic == self.desired_topic or topic in self.group_topics:
            try:
                ds = self.gate.desired(payload)
            except ControlRefused as exc:  # the previous verified desired state stays
                self.controls.control_refused(topic, "desired", exc)
                return
            if topic == self.desired_topic:
                self.desired_device = ds
            elif ds is None:
                self.desired_groups.pop(self.group_topics[topic], None)
            else:
                self.desired_groups[self.group_topics[topic]] = ds
            self._reconcile()
        elif topic in (self.downgrade_topic, self.topics.freshness):
            kind = "downgrade" if topic == self.downgrade_topic else "freshness"
            try:
                (self.gate.downgrade if kind == "downgrade" else self.gate.freshness)(payload)
            except ControlRefused as exc:
                self.controls.control_refused(topic, kind, exc)
        elif self.controls.wants_root(topic):
            self.controls.on_root(topic, payload)
        elif topic == self.capture_topic:
            self.controls.on_capture(payload, self.net)
        elif self.job is not None and self.job.wants(topic):
            self.job.on_message(topic, payload)
            self._forget_finished()

    # ------------------------------------------------------------------ timers
    def _tick(self) -> None:
        now = time.monotonic()
        if self.job is not None:
            self.job.step()
            self._forget_finished()
        if now >= self._next_telemetry:
            self._next_telemetry = now + self.cfg.telemetry.interval_s
            self.capture.expire()
            self._telemetry()
        if self.connected:
            self._flush_outbox()
        if now >= self._next_watchdog:
            self._next_watchdog = now + 5.0
            sd_notify("WATCHDOG=1")

    # ------------------------------------------------------------------ desired state
    def effective_desired(self) -> DesiredState | None:
        """The device's own desired state wins; otherwise the newest of its groups'."""
        return effective_desired(self.desired_device, self.desired_groups, self.cfg.groups)

    def _reconcile(self) -> None:
        inst = self.installer
        job = self.job
        active = inst.active
        plan = decide(self.effective_desired(), working=job.desired if job else None,
                      active_bundle=active.bundle_id if active else None,
                      reported=lambda dep: inst.handled == dep,
                      failed=lambda dep, bid: inst.is_failed(dep, bid) is not None)
        if plan.cancel is not None and job is not None:
            job.cancel(plan.cancel)  # keep running what is active
            self.job = None
            self.publish_state()
        want = plan.desired
        if plan.action == Action.CARRY_ON and job is not None and want is not None:
            job.desired = want  # same bundle, maybe a new deployment id: carry on
        elif plan.action == Action.REPORT and active is not None and want is not None:
            # the event first: a kill between commit and report leaves "handled" unset, so
            # the restarted agent still reports the install (at least once, via the outbox)
            mine = active.deployment_id == want.deployment_id
            self.event("installed", f"{active.name} {active.version} "
                       + ("was committed before the agent restarted" if mine
                          else "is already active"),
                       desired=want, slot=active.slot, already_active=not mine)
            inst.mark_handled(want.deployment_id)
            self.publish_state()
        elif plan.action == Action.SKIP and want is not None:
            failed = inst.is_failed(want.deployment_id, want.bundle_id) or {}
            log.info("deployment %s of %s already failed (%s); waiting for a new deployment",
                     want.deployment_id, want.bundle_id[:12], failed.get("kind"))
        elif plan.action == Action.INSTALL and want is not None:
            self.job = Deployment(want, self)
            self.job.start()
            self._forget_finished()

    def _forget_finished(self) -> None:
        if self.job is not None and self.job.finished:
            self.job = None
            self.publish_state()

    def load_active(self) -> None:
        """Load the committed bundle for serving; fall back to the previous slot if it fails."""
        for _ in range(2):
            d = self.installer.active_dir()
            if d is None:
                self.service.swap(None)
                return
            try:
                if not self.installer.slot_intact(self.installer.state["active"]):
                    raise InstallError(f"slot {d.name} is damaged: its model is missing or does "
                                       "not match the manifest's sha256")
                self.service.swap(self.open_model(d))
                return
            except EdgepackError as exc:
                bad = self.installer.active
                log.error("cannot load the active bundle %s: %s", label(bad), exc)
                try:
                    back = self.installer.rollback("load_failed", str(exc))
                except InstallError:
                    back = None
                if back is None:
                    # nothing to return to: forget it, so the desired state installs it afresh
                    self.installer.deactivate()
                self.event("rolled_back", f"active bundle {label(bad)} cannot be loaded ({exc})"
                            + (f"; back to {label(back)}" if back else "; no previous bundle: "
                               "it is fetched again from the broker"),
                            bundle_id=bad.bundle_id if bad else None, reason="load_failed")
                if back is None:
                    self.service.swap(None)
                    return

    def _recover_state(self, why: str) -> None:
        """state.json was lost or damaged: serve again what a slot holds, once it passes the
        health gate (a slot may hold a candidate that was never checked)."""
        h = self.cfg.health
        opts = HealthOptions(threads=self.cfg.runtime.threads, warmup=h.warmup_runs,
                             runs=h.latency_runs, enforce_budgets=h.enforce_budgets,
                             timeout_s=h.timeout_s)
        for info in self.installer.recovery_candidates():
            report = run_health_check(self.installer.slot_dir(info.slot), opts)
            if not report.passed:
                log.warning("slot %s (%s) fails the health check: %s", info.slot, label(info),
                            report.summary())
                continue
            try:
                self.installer.adopt(info)
            except InstallError as exc:
                log.error("%s", exc)
                break
            self.event("error", f"{why}; recovered: {label(info)} in slot {info.slot} passed "
                        "the health check and is active again", bundle_id=info.bundle_id,
                        reason="state_recovered", slot=info.slot)
            return
        self.event("error", f"{why}; no slot holds a bundle that passes the health check, so "
                    "none is active until the desired state installs one",
                    reason="state_recovered")

    # ------------------------------------------------------------------ outgoing
    def _state_payload(self, online: bool = True) -> dict[str, Any]:
        cfg = self.cfg
        active, previous = self.installer.active, self.installer.previous
        job = self.job
        return {
            "online": online, "device_id": cfg.device_id, "agent_version": __version__,
            "board": cfg.board, "target": cfg.target, "fleet": cfg.fleet,
            "groups": list(cfg.groups), "runtimes": self.runtimes,
            "active": active.public() if active else None,
            "previous": previous.public() if previous else None,
            "slot": active.slot if active else None,
            "phase": job.phase.value if job else "idle",
            "deployment": {"deployment_id": job.desired.deployment_id,
                           "bundle_id": job.desired.bundle_id, "phase": job.phase.value}
            if job else None,
            "started_at": self._started,
            "endpoint": {"socket": str(cfg.socket_path) if cfg.socket_path else None,
                         "http": cfg.serve.http or None},
        }

    def signed(self, report: dict[str, Any]) -> bytes:
        """A state message as published: ``ts`` added when missing, signed by the device key
        (events, telemetry and profile results are signed by the outbox, with their ``seq``)."""
        return self.identity.encode({"ts": time.time(), **report})

    def publish_state(self) -> None:
        if self.connected:
            with contextlib.suppress(BrokerError):  # sent again on the next connection
                self.net.publish(self.state_topic, self.signed(self._state_payload()), qos=1,
                                 retain=True)

    def event(self, kind: str, detail: str, *, desired: DesiredState | None = None,
               **extra: Any) -> None:
        body: dict[str, Any] = {"kind": kind, "device_id": self.cfg.device_id, "detail": detail,
                                "deployment_id": desired.deployment_id if desired else None,
                                "bundle_id": desired.bundle_id if desired else None}
        for k, v in extra.items():
            if v is not None or k not in body:
                body[k] = v
        level = logging.WARNING if kind in ("rejected", "health_failed", "rolled_back",
                                            "error", "control_refused") else logging.INFO
        log.log(level, "%s: %s", kind, detail)
        try:
            self.outbox.put(self.events_topic, body, qos=1)
        except sqlite3.Error as exc:  # a full or failing disk must not stop the agent
            log.error("cannot queue event %s: %s", kind, exc)

    def open_model(self, slot_dir: Path) -> Model:
        """Load an installed slot for serving, with drift sketches when its bundle has
        drift.json and ``[drift] enabled``."""
        model = Model.open(slot_dir, threads=self.cfg.runtime.threads, stats=self.stats)
        model.capture = self.capture
        if self.cfg.drift.enabled:
            try:
                model.drift = load_sketcher(slot_dir, sample_rate=self.cfg.drift.sample_rate)
            except EdgepackError as exc:  # serving goes on without drift telemetry
                log.warning("drift telemetry off for this bundle: %s", exc)
        return model

    def _check_freshness(self) -> dict[str, Any] | None:
        """Event ``freshness`` when the status or the withheld keys change."""
        st = self.gate.freshness_status(self.cfg.freshness_bound_s)
        if st is None:
            return None
        now = (st.status, st.behind)
        if now != self._freshness:
            self._freshness = now
            age = f"{st.age_s:.0f}s old" if st.age_s is not None else "never received"
            self.event("freshness", f"control plane {st.status}: the fleet server's last "
                       f"freshness signature is {age} (bound {st.bound_s:g}s)"
                       + (f"; newer desired states withheld: {', '.join(st.behind)}"
                          if st.behind else ""), status=st.status, age_s=st.age_s,
                       bound_s=st.bound_s, behind=list(st.behind), key_ids=list(st.key_ids))
        return {"status": st.status, "age_s": None if st.age_s is None else round(st.age_s, 1),
                "behind": list(st.behind)}

    def _telemetry(self) -> None:
        freshness = self._check_freshness()
        w = self.stats.drain()
        active = self.installer.active
        body = {"device_id": self.cfg.device_id, "window_s": round(w.window_s, 3),
                "inferences": w.inferences, "errors": w.errors, "latency_ms": w.latency(),
                **self.sampler.sample(),
                "bundle_id": active.bundle_id if active else None,
                "bundle": {"name": active.name, "version": active.version} if active else None,
                "phase": self.job.phase.value if self.job else "idle",
                "outbox_dropped": self.outbox.dropped, "outbox_pending": len(self.outbox),
                "control_refused": dict(self.refused), "freshness": freshness,
                "inbox": {"dropped": self.inbox.dropped, "replaced": self.inbox.replaced,
                          "errors": dict(self.errors)}}
        model = self.service.model
        if model is not None and model.drift is not None:
            body["drift"] = model.drift.take_window()
        try:
            self.outbox.put(self.telemetry_topic, body, qos=self.cfg.telemetry.qos)
        except sqlite3.Error as exc:
            log.error("cannot queue telemetry: %s", exc)

    def _flush_outbox(self) -> None:
        room = _MAX_INFLIGHT - len(self._inflight)
        if room <= 0:
            return
        for row in self.outbox.peek(room, after_id=self._sent_upto):
            try:
                sent = self.net.publish(row.topic, row.payload, qos=row.qos, retain=row.retain)
            except BrokerError:
                return
            self._sent_upto = row.id
            if row.qos == 0:
                self.outbox.ack(row.id)
            else:
                self._inflight[sent] = row.id


def main(argv: list[str] | None = None) -> int:
    """Console script ``edgepack-agent``."""
    return_freed_memory()
    p = argparse.ArgumentParser(prog="edgepack-agent",
                                description="edgepack on-device agent: pulls bundles over MQTT, "
                                "verifies, installs behind a health gate, serves inference and "
                                "reports telemetry.")
    p.add_argument("--config", "-c", default=os.environ.get("EDGEPACK_AGENT_CONFIG",
                                                             "/etc/edgepack/agent.toml"),
                   help="agent.toml (default: $EDGEPACK_AGENT_CONFIG or "
                   "/etc/edgepack/agent.toml)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   help="overrides log_level in the config")
    p.add_argument("--version", action="version", version=f"edgepack-agent {__version__}")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except EdgepackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=(args.log_level or cfg.log_level).upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("paho").setLevel(logging.WARNING)
    try:
        agent = Agent(cfg)
    except EdgepackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def _on_signal(signum: int, frame: Any) -> None:
        agent.request_stop()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    return agent.run()


if __name__ == "__main__":
    sys.exit(main())
