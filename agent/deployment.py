"""One deployment being installed: the handlers of the install state machine.

:mod:`edgepack.agent.states` says which transitions exist; here each working state has a
handler that does its step and returns the next state (itself while it waits: a download in
flight, a backoff, a health check running). :meth:`Deployment.step` runs handlers until one
returns its own state or an outcome. Every transition is persisted by the installer before the
step goes on, so ``state.json`` always names the current state (see ``RESUME`` for restarts).

The agent loop calls :meth:`Deployment.start`, :meth:`on_message`, :meth:`on_connected`,
:meth:`on_disconnected`, :meth:`step` (every tick) and :meth:`cancel`; a deployment never
blocks and never touches the network but through the agent's connection.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from edgepack.agent.bundle import Bundle, read_bundle
from edgepack.agent.compat import DeviceFacts, check_compat
from edgepack.agent.config import AgentConfig
from edgepack.agent.crashpoint import crash_point
from edgepack.agent.errors import BundleError, EdgepackError, InstallError, SignatureError
from edgepack.agent.health import HealthCheck, HealthOptions
from edgepack.agent.inference import InferenceService, Model
from edgepack.agent.installer import Installer, SlotInfo
from edgepack.agent.mqtt import backoff_delay
from edgepack.agent.protocol import ChunkTable, DesiredState, Topics
from edgepack.agent.states import OUTCOMES, Candidate, Phase
from edgepack.agent.telemetry import LatencyStats
from edgepack.agent.transfer import Link, Rejected, Transfer
from edgepack.agent.trust import DesiredGate, FloorDecision

__all__ = ["Device", "Deployment", "label"]

log = logging.getLogger("edgepack.agent")


class Device(Protocol):
    """What a deployment uses of the agent."""

    cfg: AgentConfig
    topics: Topics
    keys: dict[str, Any]
    gate: DesiredGate
    installer: Installer
    facts: DeviceFacts
    service: InferenceService
    stats: LatencyStats
    net: Link
    connected: bool

    def event(self, kind: str, detail: str, *, desired: DesiredState | None = None,
              **extra: Any) -> None: ...

    def publish_state(self) -> None: ...

    def load_active(self) -> None: ...

    def open_model(self, slot_dir: Path) -> Model: ...


def label(info: SlotInfo | None) -> str:
    return f"{info.name} {info.version} ({info.bundle_id[:12]})" if info else ""


class Deployment:
    """Install ``desired`` on ``device``; :attr:`phase` is the machine's state."""

    def __init__(self, desired: DesiredState, device: Device,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.desired = desired
        self.dev = device
        self.clock = clock
        self.phase = Phase.IDLE
        self.transfer: Transfer | None = None
        self.health: HealthCheck | None = None
        self.slot: SlotInfo | None = None
        self.attempts = 0
        self.retry_at: float | None = None
        self.last_progress = 0.0
        self.floor: FloorDecision | None = None
        self._handlers: dict[Phase, Callable[[], Phase]] = {
            Phase.DOWNLOADING: self._downloading, Phase.WAITING: self._waiting,
            Phase.VERIFYING: self._verifying, Phase.STAGED: self._staged,
            Phase.HEALTH_CHECKING: self._health_checking}

    @property
    def finished(self) -> bool:
        return self.phase in OUTCOMES

    @property
    def candidate(self) -> Candidate:
        d = self.desired
        return Candidate(d.bundle_id, d.deployment_id, d.name, d.version,
                         attempts=self.attempts)

    # ---- driven by the agent loop
    def start(self) -> None:
        """idle → downloading."""
        self._download()
        self.step()

    def step(self) -> None:
        """Run handlers until one waits or the deployment ends."""
        while self.phase in self._handlers:
            if self.transfer is not None and not self.transfer.done:
                self.transfer.tick()
            nxt = self._handlers[self.phase]()
            if nxt == self.phase:
                return
            self.phase = nxt
        if self.finished and self.transfer is not None:
            self.transfer.cleanup()  # the agent forgets the deployment and publishes its state

    def wants(self, topic: str) -> bool:
        return self.transfer is not None and self.transfer.wants(topic)

    def on_message(self, topic: str, payload: bytes) -> None:
        if self.transfer is not None:
            self.transfer.on_message(topic, payload)
            self.step()

    def on_connected(self) -> None:
        if self.transfer is not None:
            self.transfer.on_connected()

    def on_disconnected(self) -> None:
        if self.transfer is not None:
            self.transfer.on_disconnected()

    def cancel(self, why: str) -> None:
        """A newer desired state, or it was cleared: back to idle, files kept for a resume."""
        log.info("cancelling deployment %s: %s", self.desired.deployment_id, why)
        self.stop()
        self.dev.installer.advance(Phase.IDLE)
        self.phase = Phase.IDLE

    def stop(self) -> None:
        """The agent stops: kill a health check, pause a download (state.json unchanged)."""
        if self.health is not None:
            self.health.kill()
        if self.transfer is not None and not self.transfer.done:
            self.transfer.cancel()

    # ---- downloading, waiting
    def _download(self) -> None:
        d, dev = self.desired, self.dev
        t = dev.cfg.transfer
        dev.installer.advance(Phase.DOWNLOADING, self.candidate)
        self.phase = Phase.DOWNLOADING
        self.transfer = Transfer(
            d.bundle_id, topics=dev.topics, directory=dev.installer.downloads, link=dev.net,
            keys=dev.keys, allow_unsigned=dev.cfg.allow_unsigned, window=t.window,
            chunk_timeout_s=t.chunk_timeout_s, manifest_timeout_s=t.manifest_timeout_s,
            max_bundle_mb=t.max_bundle_mb, min_free_mb=t.min_free_mb,
            precheck=self._precheck, on_started=self._on_started,
            on_progress=self._on_progress)
        dev.publish_state()
        self.transfer.start(dev.connected)

    def _precheck(self, table: ChunkTable) -> None:
        d = self.desired
        if d.length is not None and table.bytes != d.length:
            raise Rejected(f"the published chunk table says {table.bytes} bytes but the signed "
                           f"desired state names {d.length}: not the bundle that was deployed",
                           reason="tampered", bundle_id=d.bundle_id)
        # Unauthenticated until the bundle's own signature is checked: used only to refuse early.
        self.check(table.manifest)

    def check(self, manifest: dict) -> FloorDecision | None:
        """Target, runtime, budgets; then the downgrade rule: with a trusted root the rollback
        floor (a release-signed authorization allows going below it), else (development mode,
        v1) ``allow_downgrade``."""
        active = self.dev.installer.active
        gate = self.dev.gate
        floor = gate.verifier is not None and (self.desired.signed or gate.enforcing)
        check_compat(manifest, self.desired, self.dev.facts,
                     (active.name, active.version) if active and not floor else None)
        name, version = manifest.get("name"), manifest.get("version")
        if floor and isinstance(name, str) and isinstance(version, str):
            return gate.check_floor(name, version, self.desired.bundle_id)
        return None

    def _on_started(self, tr: Transfer) -> None:
        st = tr.stats
        resumed = f", resuming with {st.resumed_from} on disk" if st.resumed_from else ""
        self.dev.event("download_started", f"fetching {st.bytes} bytes in {st.chunks_total} "
                       f"chunks of {st.chunk_size} (window {st.window}){resumed}",
                       desired=self.desired, bytes=st.bytes, chunks_total=st.chunks_total,
                       chunk_size=st.chunk_size, resumed_chunks=st.resumed_from,
                       window=st.window)

    def _on_progress(self, tr: Transfer) -> None:
        now = self.clock()
        if now - self.last_progress < 1.0:
            return
        self.last_progress = now
        st = tr.stats
        self.dev.event("download_progress", f"{st.chunks_done}/{st.chunks_total} chunks",
                       desired=self.desired, chunks_done=st.chunks_done,
                       chunks_total=st.chunks_total, received=st.received)

    def _downloading(self) -> Phase:
        tr, dev, d = self.transfer, self.dev, self.desired
        assert tr is not None
        if not tr.done:
            return Phase.DOWNLOADING
        if tr.state == "done":
            dev.event("downloaded", f"{tr.stats.bytes} bytes, sha256 matches the bundle id",
                      desired=d, stats=tr.stats.to_dict())
            dev.installer.advance(Phase.VERIFYING)
            crash_point("verifying")
            return Phase.VERIFYING
        exc = tr.error
        if isinstance(exc, (Rejected, BundleError)):
            return self._reject(exc)
        self.attempts += 1
        t = dev.cfg.transfer
        if self.attempts > t.max_retries:
            dev.event("error", f"{exc}; giving up after {self.attempts} attempts (deploy again "
                      "to retry)", desired=d)
            dev.installer.abandon(d.deployment_id, d.bundle_id, "transfer_failed", str(exc))
            return Phase.FAILED
        delay = backoff_delay(self.attempts - 1, t.retry_s, t.retry_s * 16)
        dev.event("error", f"{exc}; retrying in {delay:.0f}s", desired=d,
                  attempt=self.attempts)
        self.retry_at = self.clock() + delay
        self.transfer = None
        dev.installer.advance(Phase.WAITING, self.candidate)
        return Phase.WAITING

    def _waiting(self) -> Phase:
        if self.retry_at is not None and self.clock() < self.retry_at:
            return Phase.WAITING
        self.retry_at = None
        self._download()
        return Phase.DOWNLOADING

    # ---- verifying, staged
    def _verifying(self) -> Phase:
        d, dev = self.desired, self.dev
        assert self.transfer is not None
        try:
            bundle: Bundle = read_bundle(self.transfer.result_path, bundle_id=d.bundle_id)
            key = bundle.verify(dev.keys, allow_unsigned=dev.cfg.allow_unsigned)
            if d.signed and (bundle.name, bundle.version) != (d.name, d.version):
                raise Rejected(f"the bundle is {bundle.name} {bundle.version} but the signed "
                               f"desired state names {d.name} {d.version}", reason="invalid",
                               bundle_id=d.bundle_id)
            self.floor = self.check(bundle.manifest)
        except (Rejected, BundleError) as exc:
            return self._reject(exc)
        signer = f"signed by key {key}" if key else "unsigned (allow_unsigned)"
        dev.event("verified", f"{bundle.name} {bundle.version} for {bundle.target}: {signer}; "
                  "target, runtime, budgets and version checked", desired=d, key_id=key,
                  name=bundle.name, version=bundle.version)
        try:
            self.slot = dev.installer.stage(bundle, d.deployment_id)
        except (OSError, EdgepackError) as exc:
            dev.event("error", f"cannot unpack the bundle: {exc}", desired=d)
            dev.installer.abandon(d.deployment_id, d.bundle_id, "install_failed", str(exc))
            return Phase.FAILED
        dev.event("staged", f"unpacked into slot {self.slot.slot}", desired=d,
                  slot=self.slot.slot)
        return Phase.STAGED

    def _staged(self) -> Phase:
        d, dev = self.desired, self.dev
        assert self.slot is not None
        h = dev.cfg.health
        dev.installer.advance(Phase.HEALTH_CHECKING)
        self.phase = Phase.HEALTH_CHECKING
        dev.event("health_checking", "loading the model, running golden.npz, timing p95 and "
                  "peak RSS in a child process", desired=d, slot=self.slot.slot)
        self.health = HealthCheck(dev.installer.slot_dir(self.slot.slot), HealthOptions(
            threads=dev.cfg.runtime.threads, warmup=h.warmup_runs, runs=h.latency_runs,
            enforce_budgets=h.enforce_budgets, timeout_s=h.timeout_s))
        crash_point("health_checking")
        dev.publish_state()
        return Phase.HEALTH_CHECKING

    # ---- health_checking → committed | rolled_back | failed
    def _health_checking(self) -> Phase:
        assert self.health is not None and self.slot is not None
        report = self.health.poll()
        if report is None:
            return Phase.HEALTH_CHECKING
        d, dev, inst = self.desired, self.dev, self.dev.installer
        slot = self.slot.slot
        old = inst.active
        if not report.passed:
            dev.event("health_failed", report.summary(), desired=d, health=report.to_dict())
            inst.abandon(d.deployment_id, d.bundle_id, "health_failed",
                         "; ".join(report.failures), slot=slot)
            dev.event("rolled_back", f"{label(old)} stays active" if old else
                      "no bundle was active; none is", desired=d, reason="health_failed",
                      active=old.public() if old else None)
            return Phase.ROLLED_BACK
        try:
            info = inst.commit(slot)
        except InstallError as exc:  # the state file cannot be written: nothing changed
            dev.event("error", f"cannot commit {d.name} {d.version}: {exc} "
                      f"{label(old) or 'No bundle'} stays active; deploy again to retry.",
                      desired=d)
            inst.abandon(d.deployment_id, d.bundle_id, "install_failed", str(exc), slot=slot)
            return Phase.FAILED
        try:
            model = dev.open_model(inst.slot_dir(slot))
        except EdgepackError as exc:
            back = inst.rollback("load_failed", str(exc))
            dev.event("health_failed", f"passed in the health check but the agent cannot "
                      f"load it: {exc}", desired=d, health=report.to_dict())
            dev.event("rolled_back", f"{label(back)} is active again" if back else
                      "no previous bundle", desired=d, reason="load_failed")
            dev.load_active()
            return Phase.ROLLED_BACK
        dev.service.swap(model)
        dev.gate.record_install(info.name, info.version,
                                downgrade=self.floor is not None and self.floor.downgrade)
        dev.event("installed", f"{info.name} {info.version} committed in slot {slot} "
                  f"({report.summary()})", desired=d, slot=slot, health=report.to_dict(),
                  previous=old.public() if old else None)
        inst.mark_handled(d.deployment_id)
        return Phase.COMMITTED

    def _reject(self, exc: EdgepackError) -> Phase:
        d = self.desired
        reason = getattr(exc, "reason", None) or (
            "signature" if isinstance(exc, SignatureError) else "invalid")
        self.dev.event("rejected", str(exc), desired=d, reason=reason)
        self.dev.installer.abandon(d.deployment_id, d.bundle_id, f"rejected:{reason}", str(exc))
        return Phase.REJECTED
