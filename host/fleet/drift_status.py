"""Drift verdicts from the fleet database: per device, per bundle or per group over a time range.

The collector stores each device's ``drift/1`` windows (``store.drift``) and each published
bundle's ``drift.json``. :func:`drift_status` selects the windows, merges them per device,
bundle or group *and bundle* (windows of different bundles answer to different references),
and judges each merged window with :func:`edgepack.host.fleet.drift.judge`. The fleet API
(``GET /api/drift``), ``/metrics`` (``edgepack_drift_score``) and the dashboard read it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from edgepack.agent.errors import DataError, EdgepackError
from edgepack.host.fleet.drift import (
    DriftThresholds,
    DriftVerdict,
    Reference,
    decode_window,
    judge,
    load_reference,
    merge_windows,
)
from edgepack.host.fleet.storage import DriftWindowRecord, Store

__all__ = ["DEFAULT_RANGE_S", "DriftStatus", "drift_series", "drift_status"]

# Verdicts cover the last hour unless asked otherwise: at the default 1 % rate a device serving
# 10 inferences/s sketches ~360 rows an hour, just over the 300 rows a figure needs to be judged.
DEFAULT_RANGE_S = 3600.0
_SCOPES = ("device", "bundle", "group")


@dataclass(frozen=True)
class DriftStatus:
    """The drift of one device, bundle or group on one bundle over ``since``..``until``.

    ``verdict`` is None when there is nothing to judge; ``note`` then says why (no windows, the
    bundle has no ``drift.json``, its reference is not fetched yet).
    """

    scope: str
    key: str
    bundle_id: str | None
    since: float
    until: float
    windows: int
    devices: tuple[str, ...]
    verdict: DriftVerdict | None
    note: str = ""

    @property
    def score(self) -> float | None:
        return self.verdict.score if self.verdict is not None and self.verdict.judged else None

    @property
    def alert(self) -> bool:
        return bool(self.verdict is not None and self.verdict.alert)

    def to_json(self) -> dict[str, Any]:
        return {"scope": self.scope, self.scope: self.key, "bundle_id": self.bundle_id,
                "since": self.since, "until": self.until, "windows": self.windows,
                "devices": list(self.devices), "score": self.score, "alert": self.alert,
                "note": self.note,
                "verdict": self.verdict.to_dict() if self.verdict is not None else None}


def drift_status(store: Store, fleet: str, *, device: str | None = None,
                 bundle: str | None = None, group: str | None = None,
                 since: float | None = None, until: float | None = None,
                 thresholds: DriftThresholds | None = None) -> list[DriftStatus]:
    """Verdicts of ``fleet`` over ``since``..``until`` (default: the last hour; a negative
    ``since`` counts back from now).

    With ``device=``: that device (one status per bundle it ran). With ``bundle=``: the bundle's
    windows merged across devices. With ``group=``: the group's devices merged, per bundle.
    With none: one status per device and bundle. Raises :class:`DataError` when more than one is
    given.
    """
    given = [s for s, v in zip(_SCOPES, (device, bundle, group), strict=True) if v]
    if len(given) > 1:
        raise DataError(f"pass one of `device=`, `bundle=` or `group=`, not {' and '.join(given)}",
                        field=given[1])
    now = time.time()
    since = now - DEFAULT_RANGE_S if since is None else (now + since if since < 0 else since)
    until = now if until is None else until
    scope = given[0] if given else "device"
    device_ids: list[str] | None = None
    if device:
        device_ids = [device]
    elif group:
        device_ids = [d.device_id for d in store.devices.list(fleet) if group in d.groups]
    records = store.drift.windows(fleet, device_ids=device_ids, bundle_id=bundle, since=since,
                                  until=until)
    buckets: dict[tuple[str, str | None], list[DriftWindowRecord]] = {}
    for r in records:
        key = {"device": r.device_id, "bundle": r.bundle_id or "", "group": group or ""}[scope]
        buckets.setdefault((key, r.bundle_id), []).append(r)
    if device and not buckets:
        d = store.devices.get(fleet, device)
        buckets[(device, d.bundle_id if d else None)] = []
    references: dict[str, Reference | str] = {}
    return [_judge_bucket(store, fleet, scope, key, bundle_id, rows, since, until, thresholds,
                          references)
            for (key, bundle_id), rows in sorted(buckets.items(), key=lambda kv: (
                kv[0][0], kv[1][-1].ts if kv[1] else 0.0))]


def _reference(store: Store, fleet: str, bundle_id: str | None,
               cache: dict[str, Reference | str]) -> Reference | str:
    """The bundle's parsed reference, or why there is none."""
    if not bundle_id:
        return "the windows name no bundle"
    if bundle_id not in cache:
        rec = store.drift.reference(fleet, bundle_id)
        if rec is None:
            cache[bundle_id] = "the bundle's drift reference is not fetched yet"
        elif rec.reference is None:
            cache[bundle_id] = rec.error or "the bundle has no drift.json"
        else:
            try:
                cache[bundle_id] = load_reference(rec.reference)
            except EdgepackError as exc:
                cache[bundle_id] = f"unreadable drift.json: {exc}"
    return cache[bundle_id]


def _judge_bucket(store: Store, fleet: str, scope: str, key: str, bundle_id: str | None,
                  rows: Sequence[DriftWindowRecord], since: float, until: float,
                  thresholds: DriftThresholds | None,
                  cache: dict[str, Reference | str]) -> DriftStatus:
    devices = tuple(sorted({r.device_id for r in rows}))

    def status(verdict: DriftVerdict | None, note: str, n: int) -> DriftStatus:
        return DriftStatus(scope, key, bundle_id, since, until, n, devices, verdict, note)

    if not rows:
        return status(None, "no drift windows in this time range", 0)
    ref = _reference(store, fleet, bundle_id, cache)
    if isinstance(ref, str):
        return status(None, ref, len(rows))
    mine = [r for r in rows if r.ref == ref.id]
    note = "" if len(mine) == len(rows) else \
        f"{len(rows) - len(mine)} window(s) of another reference left out"
    if not mine:
        return status(None, note, 0)
    try:
        merged = merge_windows(decode_window(r.payload) for r in mine)
        verdict = judge(ref, merged, thresholds=thresholds)
    except EdgepackError as exc:  # windows were validated on arrival; a reference may disagree
        return status(None, f"cannot judge: {exc}", len(mine))
    if not verdict.judged:
        note = (note + "; " if note else "") + \
            f"{verdict.rows} rows sketched, fewer than the {verdict.thresholds.min_rows} a " \
            "verdict needs"
    return status(verdict, note, len(mine))


def drift_series(store: Store, fleet: str, *, device: str | None = None,
                 bundle: str | None = None, group: str | None = None,
                 since: float | None = None, until: float | None = None,
                 points: int = 30) -> dict[str, list]:
    """The score over time for a chart: the range cut into ``points`` equal buckets, each
    judged on its own windows (per bucket, the bundle with the most windows).

    ``{"ts": [bucket end…], "score": [… or None], "alert": […], "rows": […],
    "confidence_drop": [… or None]}``; a bucket with fewer rows than a verdict needs has
    ``score`` None.
    """
    now = time.time()
    since = now - DEFAULT_RANGE_S if since is None else (now + since if since < 0 else since)
    until = now if until is None else until
    points = max(1, min(int(points), 200))
    step = max((until - since) / points, 1e-6)
    out: dict[str, list] = {"ts": [], "score": [], "alert": [], "rows": [],
                            "confidence_drop": []}
    for i in range(points):
        lo, hi = since + i * step, since + (i + 1) * step
        found = [s for s in drift_status(store, fleet, device=device, bundle=bundle,
                                         group=group, since=lo, until=hi) if s.windows]
        best = max(found, key=lambda s: s.windows, default=None)
        v = best.verdict if best is not None else None
        drops = [f.confidence_drop for f in v.figures if f.confidence_drop is not None] \
            if v is not None else []
        out["ts"].append(hi)
        out["score"].append(round(best.score, 4) if best and best.score is not None else None)
        out["alert"].append(bool(best and best.alert))
        out["rows"].append(v.rows if v is not None else 0)
        out["confidence_drop"].append(round(max(drops), 4) if drops else None)
    return out
