"""The rollout engine: a thread that advances every active rollout of the database one step
per tick — observe the devices' events and states, then deploy, soak, halt or complete.

Several ``fleet serve`` processes may share a database: the one holding the ``rollouts`` lease
drives. Every step reads its inputs from the database (events and telemetry the collector
stored) and writes its decisions back before acting, so a restart resumes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from typing import Any

from edgepack.agent.errors import BrokerError, ProtocolError
from edgepack.agent.mqtt import BrokerConfig, parse_broker_url
from edgepack.host.fleet.rollout import actions
from edgepack.host.fleet.rollout.actions import Tick, record_halt
from edgepack.host.fleet.rollout.checks import RolloutChecks
from edgepack.host.fleet.rollout.comparison import StageComparison, compare_stage
from edgepack.host.fleet.rollout.drift_gate import check_drift
from edgepack.host.fleet.rollout.plan import ACTIVE_STATES, EVENT_STATUS, allowed_failures
from edgepack.host.fleet.storage import (
    DeviceRecord,
    EventTally,
    RolloutDeviceRecord,
    RolloutRecord,
    Store,
)

__all__ = ["RolloutEngine"]

log = logging.getLogger("edgepack.rollout")

_RANK = {"waiting": 0, "pending": 1, "downloading": 2, "installing": 3, "installed": 4}
_TERMINAL = ("installed", "failed", "rolled_back")
_FAILED_KINDS = ("rejected", "health_failed")


def device_status(d: RolloutDeviceRecord, kinds: dict[str, EventTally],
                  state: DeviceRecord | None, r: RolloutRecord) -> dict[str, Any] | None:
    """A device's new status (and detail) from the events it sent for its deployment and the
    bundle it reports active; None when nothing changed."""
    if d.status == "rolling_back":
        prev = (d.previous or {}).get("bundle_id")
        if state is not None and prev and state.bundle_id == prev:
            return {"status": "rolled_back",
                    "detail": d.detail or f"back on {(d.previous or {}).get('version')}"}
        return None
    for kind in _FAILED_KINDS:
        if kind in kinds:
            return {"status": "failed", "detail": f"{kind}: {kinds[kind].detail or ''}"[:500]}
    if "rolled_back" in kinds:  # e.g. a crash loop after the commit
        return {"status": "failed", "detail": "rolled back by the device: "
                f"{kinds['rolled_back'].detail or ''}"[:500]}
    if "error" in kinds and kinds["error"].giving_up:
        return {"status": "failed", "detail": f"error: {kinds['error'].detail or ''}"[:500]}
    new = d.status
    for kind, st in EVENT_STATUS.items():
        if kind in kinds and _RANK[st] > _RANK.get(new, 0):
            new = st
    installed_at = d.installed_at
    if "installed" in kinds:
        installed_at = installed_at or kinds["installed"].last
    if state is not None and state.bundle_id == r.bundle_id:
        new = "installed"
    if new == "installed":
        installed_at = installed_at or time.time()
    if new == d.status:
        return None
    out: dict[str, Any] = {"status": new, "detail": None}
    if new == "installed":
        out["installed_at"] = installed_at
    return out


class RolloutEngine:
    """Drives every active rollout of the database, one step per ``tick_s`` (a thread)."""

    def __init__(self, store: Store, broker: BrokerConfig | str, *, tick_s: float = 1.0,
                 owner: str | None = None) -> None:
        self.store = store
        self.cfg = parse_broker_url(broker) if isinstance(broker, str) else broker
        self.tick_s = tick_s
        self.owner = owner or f"engine-{uuid.uuid4().hex[:8]}"
        self.errors = 0
        self.last_error: str | None = None
        self.compare_s = max(tick_s, 2.0)
        self._compared: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> RolloutEngine:
        self._thread = threading.Thread(target=self._run, name="edgepack-rollouts", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with contextlib.suppress(Exception):  # the lease expires by itself anyway
            self.store.meta.release_lease("rollouts", self.owner)

    def _run(self) -> None:
        while not self._stop.wait(self.tick_s):
            try:
                self.step_all()
            except Exception as exc:  # noqa: BLE001 - a database or broker hiccup: next tick
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("rollout step failed: %s", self.last_error)

    def step_all(self) -> None:
        """One step of every active rollout (if this engine holds the lease)."""
        if not self.store.meta.acquire_lease("rollouts", self.owner, max(15.0, 5 * self.tick_s)):
            return
        for r in self.store.rollouts.list(states=(*ACTIVE_STATES, "paused"), limit=1000):
            try:
                self.step(r)
            except (BrokerError, ProtocolError) as exc:
                self.errors += 1
                self.last_error = str(exc)
                log.warning("rollout %s: %s (retrying)", r.id, exc)

    def step(self, r: RolloutRecord) -> None:
        tick = Tick(rollout=r, devices=self.store.rollouts.devices(r.id), now=time.time())
        self._observe(tick)
        if r.state == "running":
            self._run_stage(tick)
        elif r.state == "halting":
            actions.start_rollback(self.store, self.cfg, tick, tick.stage_devices(r.stage),
                                   then="rolling_back")
        elif r.state == "abort_requested":
            actions.start_rollback(self.store, self.cfg, tick, tick.devices, then="aborting")
        elif r.state in ("rolling_back", "aborting"):
            actions.finish_rollback(self.store, self.cfg, tick)

    # -- observation: events and device states -> device statuses
    def _observe(self, tick: Tick) -> None:
        r = tick.rollout
        watched = [d for d in tick.devices
                   if d.status not in ("waiting", "failed", "rolled_back")]
        if not watched:
            return
        dep_ids = sorted({d.deployment_id for d in watched if d.deployment_id})
        kinds: dict[tuple[str, str], dict[str, EventTally]] = {}
        for t in self.store.events.tallies(r.fleet, dep_ids):
            kinds.setdefault((t.device_id, t.deployment_id), {})[t.kind] = t
        states = {d.device_id: d for d in self.store.devices.list(
            r.fleet, ids=[w.device_id for w in watched])}
        changes = {}
        for d in watched:
            new = device_status(d, kinds.get((d.device_id, d.deployment_id or ""), {}),
                                states.get(d.device_id), r)
            if new is not None and (new["status"], new.get("detail")) != (d.status, d.detail):
                changes[d.device_id] = new
        tick.apply(self.store, changes)

    # -- running
    def _run_stage(self, tick: Tick) -> None:
        r = tick.rollout
        k = r.stage
        rollouts = self.store.rollouts
        stage_devs = tick.stage_devices(k)
        if not stage_devs:  # a small group: this percentage adds no device
            if k + 1 < len(r.stages):
                rollouts.update(r.id, expect_state="running", stage=k + 1, stage_started=None,
                                soak_started=None, log=f"stage {k + 1} has no device of its own")
            else:
                actions.complete(self.store, self.cfg, tick)
            return
        waiting = [d for d in stage_devs if d.status == "waiting"]
        if waiting:
            actions.deploy_stage(self.store, self.cfg, tick, waiting, k)
            rollouts.update(r.id, stage_started=tick.now, soak_started=None,
                            log=f"stage {k + 1}/{len(r.stages)} ({r.stages[k]:g}%): deployed "
                                f"to {len(waiting)} device(s)")
            return
        if r.stage_started is None:  # resumed from a state written before the deploy
            rollouts.update(r.id, stage_started=tick.now)
            return
        if self._over_limit(tick):
            return
        pending = [d for d in stage_devs if d.status not in _TERMINAL]
        if pending:
            if tick.now - r.stage_started > r.stage_timeout_s:
                tick.apply(self.store, {d.device_id: {
                    "status": "failed", "detail": f"no outcome within {r.stage_timeout_s:g}s "
                                                  f"(last: {d.status})"} for d in pending})
                rollouts.add_log(r.id, f"stage {k + 1}: {len(pending)} device(s) timed out")
                self._over_limit(tick)
            return
        if r.soak_started is None:
            ok = sum(d.status == "installed" for d in stage_devs)
            rollouts.update(r.id, soak_started=tick.now,
                            log=f"stage {k + 1}: {ok}/{len(stage_devs)} installed; soaking for "
                                f"{r.soak_s:g}s")
            return
        checks = RolloutChecks.from_json(rollouts.checks(r.id).checks)
        self._check_budgets(tick, k)
        check_drift(self.store, tick, k, checks.max_drift_score)
        if self._over_limit(tick):
            return
        soak_end = r.soak_started + r.soak_s
        soaked = tick.now >= soak_end
        # at the end of the soak, one comparison at once; after an unconfirmed excess, the
        # next one (a comparison interval later) decides
        comparison = self._compare(tick, k, checks, force=soaked and self._compared.get(
            r.id, 0.0) < soak_end)
        if comparison is not None and comparison.halt is not None:
            self._halt(tick, comparison.halt.message, stored=True)
            return
        if not soaked or comparison is None or comparison.unconfirmed:
            return
        passed = f"stage {k + 1} passed ({comparison.summary()})"
        if k + 1 < len(r.stages):
            rollouts.update(r.id, expect_state="running", stage=k + 1, stage_started=None,
                            soak_started=None, log=passed)
            return
        rollouts.add_log(r.id, passed)
        actions.complete(self.store, self.cfg, tick)

    def _compare(self, tick: Tick, k: int, checks: RolloutChecks, *,
                 force: bool) -> StageComparison | None:
        """Compare stage ``k`` with its references (every twentieth of the soak, 2 to 30 s,
        and at the end of the soak); stored for the status. None when not compared now."""
        r = tick.rollout
        every = min(max(self.compare_s, r.soak_s / 20), 30.0)
        if not force and tick.now - self._compared.get(r.id, 0.0) < every:
            return None
        self._compared[r.id] = tick.now
        before = self.store.rollouts.checks(r.id).comparison
        comparison = compare_stage(self.store, tick, k, checks).confirmed(before)
        halt = comparison.halt
        self.store.rollouts.set_comparison(
            r.id, comparison.to_json(), halt={**halt.to_json(), "stage": k + 1,
                                              "compared_with": comparison.compared_with,
                                              "at": tick.now} if halt else None)
        return comparison

    def _halt(self, tick: Tick, why: str, *, stored: bool = False) -> None:
        """Halt at the current stage: roll its devices back (``rollback_on_halt``, the
        default) or leave them on the new bundle; a ``rollout_halted`` event per device.
        ``stored``: the comparison stored the halt reason already (else: failed devices)."""
        r = tick.rollout
        k = r.stage
        record = self.store.rollouts.checks(r.id)
        checks = RolloutChecks.from_json(record.checks)
        if not stored:
            self.store.rollouts.set_comparison(r.id, record.comparison or {}, halt={
                "metric": "failures", "verdict": "halt", "stage": k + 1, "message": why,
                "devices": [d.device_id for d in tick.devices if d.status == "failed"],
                "at": tick.now})
        if checks.rollback_on_halt:
            state, changes = "halting", {}
            log = f"halting at stage {k + 1}: {why}; rolling back the stage"
        else:
            state, changes = "halted", {"finished": tick.now}
            log = (f"halted at stage {k + 1}: {why}; the stage keeps the new bundle (no "
                   "rollback asked)")
        if not self.store.rollouts.update(r.id, expect_state="running", state=state,
                                          detail=f"halted at stage {k + 1}: {why}", log=log,
                                          **changes):
            return
        record_halt(self.store, tick, k, why)
        tick.set_state(state)
        if checks.rollback_on_halt:
            actions.start_rollback(self.store, self.cfg, tick, tick.stage_devices(k),
                                   then="rolling_back")

    def _over_limit(self, tick: Tick) -> bool:
        r = tick.rollout
        deployed = [d for d in tick.devices if d.status != "waiting"]
        failed = [d for d in deployed if d.status == "failed"]
        allowed = allowed_failures(r.max_failures, len(deployed))
        if len(failed) <= allowed:
            return False
        why = (f"{len(failed)} failed device(s) among {len(deployed)} deployed, over the "
               f"limit of {r.max_failures} ({allowed} allowed)")
        self._halt(tick, why)
        return True

    def _check_budgets(self, tick: Tick, k: int) -> None:
        """Fail installed devices of stage ``k`` whose telemetry on the new bundle went over
        its budgets in more than a quarter of their reports (at least two) during the soak."""
        r = tick.rollout
        installed = [d for d in tick.stage_devices(k) if d.status == "installed"]
        if not r.budgets or not installed:
            return
        since = min(d.installed_at or r.soak_started or tick.now for d in installed)
        p95 = r.budgets.get("p95_ms", 1e18)
        rss = r.budgets.get("peak_rss_mb", 1e18)
        over = {t.device_id: t for t in self.store.telemetry.over_budget(
            r.fleet, r.bundle_id, [d.device_id for d in installed], since=since, p95_ms=p95,
            peak_rss_mb=rss) if t.bad and t.bad >= 2 and t.bad * 4 > t.n}
        if not over:
            return
        changes = {}
        for device_id, t in over.items():
            parts = []
            if t.p95 is not None and t.p95 > p95:
                parts.append(f"p95 {t.p95:.1f} ms > budget {p95:g} ms")
            if t.rss is not None and t.rss > rss:
                parts.append(f"peak RSS {t.rss:.0f} MB > budget {rss:g} MB")
            changes[device_id] = {"status": "failed", "detail": f"over budget in {t.bad}/{t.n} "
                                  "telemetry reports: " + ", ".join(parts)}
        tick.apply(self.store, changes)
        self.store.rollouts.add_log(r.id, f"stage {k + 1}: {len(changes)} device(s) over the "
                                    "bundle's budgets during the soak")
