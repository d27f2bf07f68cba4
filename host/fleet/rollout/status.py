"""What a rollout looks like now: per-stage device counts by status, its devices and its log."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from edgepack.host.fleet.rollout.checks import RolloutChecks
from edgepack.host.fleet.rollout.plan import DEVICE_STATUSES, RolloutError, allowed_failures
from edgepack.host.fleet.storage import (
    RolloutDeviceRecord,
    RolloutLogEntry,
    RolloutRecord,
    Store,
)

__all__ = ["RolloutStatus", "StageStatus", "rollout_status", "find_rollout"]

_PHASES = {"paused": "paused", "rolling_back": "rolling back", "halting": "rolling back",
           "abort_requested": "rolling back", "aborting": "rolling back", "halted": "halted",
           "aborted": "aborted"}


@dataclass(frozen=True)
class StageStatus:
    """One stage: number (from 1), percentage, devices, phase and device counts by status."""

    stage: int
    percent: float
    devices: int
    deployment_id: str
    phase: str
    counts: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RolloutStatus:
    """A rollout with its stages, devices and log (``rollout.stage`` counts from 0,
    :attr:`stage` from 1); ``checks`` are its comparison thresholds, ``comparison`` the current
    stage's last comparison with its references and ``halt`` the reason it halted (metric,
    measured vs previous vs baseline, threshold, devices), all JSON."""

    rollout: RolloutRecord
    stages: tuple[StageStatus, ...]
    devices: tuple[RolloutDeviceRecord, ...]
    log: tuple[RolloutLogEntry, ...]
    failures: int
    deployed: int
    allowed_failures: int
    soak_left_s: float | None = None
    checks: dict[str, Any] = field(default_factory=dict)
    comparison: dict[str, Any] | None = None
    halt: dict[str, Any] | None = None

    @property
    def id(self) -> str:
        return self.rollout.id

    @property
    def state(self) -> str:
        return self.rollout.state

    @property
    def stage(self) -> int:
        """The current stage, counted from 1."""
        return self.rollout.stage + 1

    def to_json(self, *, devices: bool = True, log_tail: int | None = None) -> dict[str, Any]:
        """The JSON of ``/api/rollouts/ID`` and ``rollout status --json``."""
        out = self.rollout.to_json()
        log = self.log if log_tail is None else self.log[-log_tail:]
        out.update(stage=self.stage, stage_count=len(self.stages),
                   stages=[s.to_json() for s in self.stages], log=[x.to_json() for x in log],
                   failures=self.failures, deployed=self.deployed,
                   allowed_failures=self.allowed_failures)
        if devices:
            out["devices"] = [d.to_json() for d in self.devices]
        if self.soak_left_s is not None:
            out["soak_left_s"] = self.soak_left_s
        out.update(checks=self.checks, comparison=self.comparison, halt=self.halt)
        return out


def find_rollout(store: Store, rollout_id: str) -> RolloutRecord:
    """The rollout with this id, or the only one whose id starts with it."""
    r = store.rollouts.get(rollout_id)
    if r is not None:
        return r
    matches = [x for x in store.rollouts.list(limit=1000) if x.id.startswith(rollout_id)]
    if len(matches) == 1:
        return matches[0]
    raise RolloutError(f"no rollout {rollout_id!r} in {store.safe_url}"
                       + (" (ambiguous prefix)" if matches else "")
                       + ": 'edgepack rollout list' shows them", rollout_id=rollout_id)


def _phase(r: RolloutRecord, k: int) -> str:
    if k < r.stage or r.state == "completed":
        return "passed"
    if k > r.stage:
        return "waiting"
    if r.state == "running":
        return "soaking" if r.soak_started else "deploying" if r.stage_started else "starting"
    return _PHASES.get(r.state, r.state)


def rollout_status(store: Store, rollout_id: str) -> RolloutStatus:
    """The rollout (by id or unique prefix) with per-stage counts, devices and log."""
    r = find_rollout(store, rollout_id)
    devs = store.rollouts.devices(r.id)
    stages = []
    for k, pct in enumerate(r.stages):
        mine = [d for d in devs if d.stage == k]
        counts = {s: 0 for s in DEVICE_STATUSES}
        for d in mine:
            counts[d.status] = counts.get(d.status, 0) + 1
        stages.append(StageStatus(stage=k + 1, percent=pct, devices=len(mine),
                                  deployment_id=f"{r.id}-s{k + 1}", phase=_phase(r, k),
                                  counts=counts))
    deployed = sum(d.status != "waiting" for d in devs)
    soak_left = None
    if r.soak_started and r.state == "running":
        soak_left = max(0.0, r.soak_s - (time.time() - r.soak_started))
    checks = store.rollouts.checks(r.id)
    return RolloutStatus(
        rollout=r, stages=tuple(stages), devices=tuple(devs),
        log=tuple(store.rollouts.log(r.id)), failures=sum(d.status == "failed" for d in devs),
        deployed=deployed, allowed_failures=allowed_failures(r.max_failures, deployed),
        soak_left_s=soak_left,
        checks=RolloutChecks.from_json(checks.checks).to_json(),
        comparison=checks.comparison or None, halt=checks.halt)
