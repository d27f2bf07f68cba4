"""Staged rollouts: a bundle reaches a group stage by stage, and stops — and rolls back — on
failures (``edgepack deploy … --group G --stages 1,10,50,100 --max-failures 5% --soak 10m``).

How a rollout runs (all of its state lives in the fleet database, so ``fleet serve`` resumes it
after a restart, and pause / resume / abort work from any process that reaches the database):

1. **Plan** (:func:`start_rollout`, :mod:`.plan`): the group's members are the devices whose
   retained state lists the group (as stored by the collector). They are ordered — online
   devices first, in an order drawn from the rollout id so canaries differ between rollouts —
   and cut into cumulative stages: ``1,10,50,100`` puts 1 % (at least one device) in stage 1,
   up to 10 % by stage 2, …. Each device's currently active bundle is recorded, to roll back to.
2. **Deploy a stage** (:class:`RolloutEngine`, :mod:`.actions`): a *device-level* desired state
   (deployment id ``<rollout>-s<stage>``) for each device of the stage. Device-level desired
   states win over the group's, so the rest of the group keeps what it runs.
3. **Watch**: each device's events for that deployment move it through ``pending →
   downloading → installing → installed``, or to ``failed`` (rejected, health check failed,
   transfer given up, no answer within ``stage_timeout``).
4. **Soak**: once every device of the stage has installed or failed, the stage soaks for
   ``soak`` seconds; a device whose telemetry on the new bundle goes over the bundle's budgets
   (p95 latency, peak RSS) in more than a quarter of its reports fails, and so does a device
   whose drift on the new bundle alerts while its previous bundle's did not (:mod:`.drift_gate`).
   Every few seconds the stage is also compared (:mod:`.comparison`, thresholds in
   :class:`RolloutChecks`) with its devices' previous bundle and a baseline group: p95 latency
   regression, error-rate rise, drift score, confidence drop. Beyond a threshold against every
   reference with enough samples, the rollout halts with that reason (``docs/rollouts.md``).
5. **Halt** when the failures among all devices deployed so far exceed ``max_failures`` (an
   absolute count, or a percentage of the devices deployed so far) or a comparison says so;
   with ``rollback_on_halt`` (the default) the stage's devices get a
   device-level desired state naming their previous bundle (with ``allow_downgrade``), and the
   rollout ends ``halted`` once they report it active again. ``abort`` does the same for every
   stage deployed so far. A device that ran nothing before goes back to the bundle its group
   named when the rollout started, or keeps the new one; a device that failed on its own
   (rejected, health check) still runs its old bundle and is left alone.
6. **Complete**: after the last stage (100 %) the group's desired state names the bundle, so
   devices joining the group later get it, and the device-level desired states of the devices
   that installed it are cleared (they follow their group again). Devices that failed stay pinned
   to their previous bundle.

Rolled-back devices stay pinned to their previous bundle by a device-level desired state unless
their group's desired state names that same bundle; the next deploy to the device (or a new
rollout) replaces the pin.
"""

from __future__ import annotations

from edgepack.host.fleet.rollout.checks import RolloutChecks
from edgepack.host.fleet.rollout.comparison import MetricCheck, StageComparison
from edgepack.host.fleet.rollout.control import (
    abort_rollout,
    pause_rollout,
    resume_rollout,
    start_rollout,
)
from edgepack.host.fleet.rollout.engine import RolloutEngine
from edgepack.host.fleet.rollout.plan import (
    ACTIVE_STATES,
    DEVICE_STATUSES,
    FINAL_STATES,
    RolloutError,
    allowed_failures,
    bundle_budgets,
    parse_duration,
    parse_max_failures,
    parse_stages,
    stage_sizes,
)
from edgepack.host.fleet.rollout.status import RolloutStatus, StageStatus, rollout_status

__all__ = [
    "RolloutError",
    "RolloutEngine",
    "RolloutStatus",
    "StageStatus",
    "RolloutChecks",
    "StageComparison",
    "MetricCheck",
    "start_rollout",
    "rollout_status",
    "pause_rollout",
    "resume_rollout",
    "abort_rollout",
    "parse_stages",
    "parse_max_failures",
    "parse_duration",
    "allowed_failures",
    "stage_sizes",
    "bundle_budgets",
    "ACTIVE_STATES",
    "FINAL_STATES",
    "DEVICE_STATUSES",
]
