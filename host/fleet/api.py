"""The fleet's Python front door: publish, deploy, staged rollouts and fleet queries.

Every function takes the broker as a URL string (``mqtt://host:1883``, ``mqtts://…``) or a
:class:`~edgepack.agent.mqtt.BrokerConfig` (TLS files, credentials), and the fleet database as
a URL (``sqlite:///fleet.db``, ``postgresql://user@host/db``) or an open
:class:`~edgepack.host.fleet.storage.Store`. Results are frozen dataclasses with ``to_json()``;
errors are :class:`~edgepack.agent.errors.EdgepackError` subclasses naming the argument at fault
(``field=``). Nothing here prints or exits.

    from edgepack.host.fleet.api import publish, deploy, fleet_status, rollout_start

    pub = publish("dist/kws.edgepack", broker="mqtt://localhost", key="fleet.key")
    dep = deploy(pub.bundle_id, device="pi-kitchen", broker="mqtt://localhost", wait=120)
    for d in fleet_status(broker="mqtt://localhost"):
        print(d.device, d.status, d.bundle_version)
    ro = rollout_start("dist/kws-2.edgepack", group="pis", broker="mqtt://localhost",
                       db="sqlite:///fleet.db", key="fleet.key", stages="10,50,100")
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

from edgepack.agent.mqtt import BrokerConfig
from edgepack.host.fleet import rollout as _rollout
from edgepack.host.fleet.deploy import DeployResult, deploy
from edgepack.host.fleet.publish import PublishResult, publish
from edgepack.host.fleet.rollout import RolloutStatus
from edgepack.host.fleet.status import DeviceStatus, fleet_status
from edgepack.host.fleet.storage import DeviceRecord, RolloutRecord, Store, open_store

__all__ = [
    "publish",
    "deploy",
    "fleet_status",
    "devices",
    "device",
    "rollout_start",
    "rollout_status",
    "rollout_pause",
    "rollout_resume",
    "rollout_abort",
    "rollouts",
    "collectors_alive",
    "PublishResult",
    "DeployResult",
    "DeviceStatus",
    "DeviceRecord",
    "RolloutRecord",
    "RolloutStatus",
]


@contextlib.contextmanager
def _store(db: str | Store) -> Iterator[Store]:
    """``db`` as an open store: a URL is opened (and closed after), a Store is lent."""
    if isinstance(db, Store):
        yield db
        return
    with open_store(db) as store:
        yield store


def devices(*, db: str | Store, fleet: str = "default") -> list[DeviceRecord]:
    """Every device of ``fleet`` the collector (``fleet serve``) has stored, by device id."""
    with _store(db) as store:
        return store.devices.list(fleet)


def device(device_id: str, *, db: str | Store, fleet: str = "default") -> DeviceRecord | None:
    """One stored device (presence, what it runs, its last state and telemetry), or None."""
    with _store(db) as store:
        return store.devices.get(fleet, device_id)


def rollout_start(bundle: str | os.PathLike, *, group: str, broker: str | BrokerConfig,
                  db: str | Store, fleet: str = "default",
                  stages: str | Sequence[float] = "1,10,50,100", max_failures: str = "5%",
                  soak: str | float = "10m", stage_timeout: str | float = "30m",
                  key: str | os.PathLike | None = None, allow_downgrade: bool = False,
                  devices: Sequence[str] | None = None,
                  rollout_id: str | None = None,
                  max_latency_regression: str | float | None = None,
                  max_error_rate_rise: str | float | None = None,
                  max_drift_score: str | float | None = None,
                  max_confidence_drop: str | float | None = None,
                  baseline_group: str | None = None,
                  rollback_on_halt: bool = True) -> RolloutStatus:
    """Plan a staged rollout of ``bundle`` to ``group`` into the database ``db``.

    ``bundle`` is a ``.edgepack`` file (published first, its chunk table signed with ``key``)
    or a published bundle id (or unique prefix). ``stages`` are cumulative percentages of the
    group; ``max_failures`` a device count (``"3"``) or a share of the devices deployed so far
    (``"5%"``); ``soak`` and ``stage_timeout`` durations (``"10m"``, ``"30s"``, seconds).
    ``devices`` replaces the group's membership as the devices report it. A ``fleet serve``
    running on the same database advances the rollout.

    Each stage is compared with its devices' previous bundle and a baseline group
    (``baseline_group``, default the group's devices not yet reached) and halts beyond
    ``max_latency_regression`` (p95, default ``"20%"``), ``max_error_rate_rise`` (``"1pt"``),
    ``max_drift_score`` (1.0) or ``max_confidence_drop`` (``"5pt"``); ``rollback_on_halt``
    (default True) sends the halted stage back to its previous bundle (docs/rollouts.md).
    """
    with _store(db) as store:
        return _rollout.start_rollout(
            store, broker, bundle, group=group, fleet=fleet, stages=stages,
            max_failures=max_failures, soak=soak, stage_timeout=stage_timeout, key_path=key,
            allow_downgrade=allow_downgrade, devices=devices, rollout_id=rollout_id,
            max_latency_regression=max_latency_regression,
            max_error_rate_rise=max_error_rate_rise, max_drift_score=max_drift_score,
            max_confidence_drop=max_confidence_drop, baseline_group=baseline_group,
            rollback_on_halt=rollback_on_halt)


def rollout_status(rollout_id: str, *, db: str | Store) -> RolloutStatus:
    """A rollout (by id or unique prefix): stages with device counts by status, devices, log."""
    with _store(db) as store:
        return _rollout.rollout_status(store, rollout_id)


def rollout_pause(rollout_id: str, *, db: str | Store) -> RolloutStatus:
    """Stop advancing a running rollout (devices already deploying carry on)."""
    with _store(db) as store:
        return _rollout.pause_rollout(store, rollout_id)


def rollout_resume(rollout_id: str, *, db: str | Store) -> RolloutStatus:
    """Continue a paused rollout; the current stage's soak starts over."""
    with _store(db) as store:
        return _rollout.resume_rollout(store, rollout_id)


def rollout_abort(rollout_id: str, *, db: str | Store, rollback: bool = True) -> RolloutStatus:
    """Stop a rollout and roll back every device it deployed to (unless ``rollback=False``)."""
    with _store(db) as store:
        return _rollout.abort_rollout(store, rollout_id, rollback=rollback)


def rollouts(*, db: str | Store, fleet: str | None = None) -> list[RolloutRecord]:
    """Rollouts, newest first (of one fleet if given)."""
    with _store(db) as store:
        return store.rollouts.list(fleet)


def collectors_alive(*, db: str | Store, within_s: float = 60.0) -> int:
    """How many collectors (``fleet serve``) wrote a heartbeat to ``db`` within ``within_s``
    seconds: a rollout advances only while one runs on its database."""
    with _store(db) as store:
        return len(store.meta.alive(within_s))
