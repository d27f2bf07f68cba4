"""The soak's drift gate: a device whose drift on the new bundle alerts fails its stage.

During a stage's soak, each installed device's drift windows on the rollout's bundle (since it
installed) are judged against the bundle's ``drift.json`` (default thresholds, ``docs/drift.md``).
A device whose score reaches the rollout's ``max_drift_score`` (default 1.0: the verdict alerts)
fails — unless its previous bundle's windows alerted too over the
same length of time before the install: then the data moved, not the bundle. A failed device
counts against ``max_failures`` like any other, so the rollout halts and rolls the stage back.
Bundles without ``drift.json`` and devices without enough sketched rows are never failed here.
"""

from __future__ import annotations

from edgepack.host.fleet.drift_status import DriftStatus, drift_status
from edgepack.host.fleet.rollout.actions import Tick
from edgepack.host.fleet.storage import Store

__all__ = ["check_drift"]


def check_drift(store: Store, tick: Tick, k: int, threshold: float = 1.0) -> None:
    """Fail installed devices of stage ``k`` whose drift score on the new bundle reaches
    ``threshold`` (1.0, the alert threshold, unless the rollout's ``max_drift_score`` says
    otherwise; see above)."""
    r = tick.rollout
    ref = store.drift.reference(r.fleet, r.bundle_id)
    if ref is None or ref.reference is None:  # no drift.json (or not fetched yet): no gate
        return
    changes = {}
    for d in tick.stage_devices(k):
        if d.status != "installed":
            continue
        since = d.installed_at or r.soak_started or tick.now
        new = _on(drift_status(store, r.fleet, device=d.device_id, since=since,
                               until=tick.now + 1), r.bundle_id)
        if new is None or (new.score or 0.0) < threshold:
            continue
        previous = (d.previous or {}).get("bundle_id")
        span = max(tick.now - since, 60.0)
        before = _on(drift_status(store, r.fleet, device=d.device_id, since=since - span,
                                  until=since), previous) if previous else None
        if before is not None and (before.score or 0.0) >= threshold:
            continue
        figures = ", ".join(f.label for f in new.verdict.alerts) if new.verdict else ""
        changes[d.device_id] = {"status": "failed", "detail": f"drift on the new bundle: score "
                                f"{new.score or 0:.2f} ≥ {threshold:g} ({figures}) over "
                                f"{new.verdict.rows if new.verdict else 0} rows"}
    if changes:
        tick.apply(store, changes)
        store.rollouts.add_log(r.id, f"stage {k + 1}: {len(changes)} device(s) drift on the new "
                               "bundle during the soak")


def _on(found: list[DriftStatus], bundle_id: str | None) -> DriftStatus | None:
    return next((s for s in found if s.bundle_id == bundle_id and s.verdict is not None), None)
