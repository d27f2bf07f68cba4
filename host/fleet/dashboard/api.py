"""The JSON behind every dashboard page (documented in ``docs/fleet-api.md``).

Pure functions of the fleet database (and, for ``health``, the running collector): the HTTP
server in :mod:`edgepack.host.fleet.dashboard.server` only routes to them.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace
from typing import Any

from edgepack.host.fleet.drift_status import drift_series, drift_status
from edgepack.host.fleet.rollout import FINAL_STATES, bundle_budgets, rollout_status
from edgepack.host.fleet.rollout.plan import EVENT_STATUS
from edgepack.host.fleet.storage import (
    TELEMETRY_COLUMNS,
    DeviceRecord,
    EventTally,
    RolloutRecord,
    Store,
    TelemetryRecord,
)

__all__ = ["FleetAPI", "NotFound", "health_of", "DEPLOYMENT_STATUSES"]

DEPLOYMENT_STATUSES = ("pending", "downloading", "installing", "installed", "failed",
                       "rolled_back")
_RANK = {"pending": 0, "downloading": 1, "installing": 2}
_SERIES = ("p50", "p95", "p99", "max_ms", "rss_mb", "peak_rss_mb", "cpu_percent",
           "temperature_c", "inferences", "errors")
_BUNDLE_LIST = ("fleet", "bundle_id", "name", "version", "target", "bytes", "chunk_size",
                "chunks", "signed_by", "published", "first_seen")


class NotFound(LookupError):
    """What the request names does not exist (HTTP 404)."""


def health_of(device: DeviceRecord, budgets: dict[str, float], now: float,
              stale_after_s: float = 180.0) -> tuple[str, str]:
    """``(health, why)``: healthy, degraded (over budget, inference errors), stale (online but
    silent), offline, unknown (no telemetry yet)."""
    if device.online is False:
        return "offline", device.offline_reason or "offline"
    t = device.telemetry
    if not t:
        return "unknown", "no telemetry yet"
    window = t.get("window_s") or 30.0
    if now - (t.get("received") or t.get("ts") or 0) > max(stale_after_s, 3 * window):
        return "stale", "no telemetry for " + _ago(now - (t.get("received") or 0))
    problems = []
    if budgets.get("p95_ms") and (t.get("p95") or 0) > budgets["p95_ms"]:
        problems.append(f"p95 {t['p95']:.1f} ms > budget {budgets['p95_ms']:g} ms")
    if budgets.get("peak_rss_mb") and (t.get("peak_rss_mb") or 0) > budgets["peak_rss_mb"]:
        problems.append(f"peak RSS {t['peak_rss_mb']:.0f} MB > budget "
                        f"{budgets['peak_rss_mb']:g} MB")
    inf, err = t.get("inferences") or 0, t.get("errors") or 0
    if err and err > 0.05 * max(inf + err, 1):
        problems.append(f"{err} inference errors of {inf + err}")
    return ("degraded", "; ".join(problems)) if problems else ("healthy", "")


def _outcome(kinds: dict[str, EventTally]) -> dict[str, Any]:
    """A device's status in a deployment from the kinds of events it sent for it."""
    def pick(kind: str, status: str, prefix: bool = False) -> dict[str, Any]:
        detail = kinds[kind].detail
        return {"status": status, "detail": f"{kind}: {detail or ''}" if prefix else detail}

    if "rolled_back" in kinds:
        return pick("rolled_back", "rolled_back")
    for kind in ("rejected", "health_failed"):
        if kind in kinds:
            return pick(kind, "failed", prefix=True)
    if "error" in kinds and kinds["error"].giving_up:
        return pick("error", "failed", prefix=True)
    if "installed" in kinds:
        return pick("installed", "installed")
    for kind in ("health_checking", "staged", "verified", "downloaded", "download_progress",
                 "download_started"):
        if kind in kinds:
            return pick(kind, EVENT_STATUS[kind])
    return {"status": "pending", "detail": None}


def _freshness(telemetry: dict[str, Any]) -> dict[str, Any]:
    """What the device last said about the control plane (protocol v2 §9.5): ``fresh``,
    ``stale`` (no freshness signature within its bound: withheld or frozen) or ``missing``, its
    age and the desired states it knows are withheld; None when it does not check."""
    f = telemetry.get("freshness")
    if not isinstance(f, dict) or not isinstance(f.get("status"), str):
        return {"freshness": None, "freshness_age_s": None, "freshness_behind": []}
    behind = f.get("behind") if isinstance(f.get("behind"), list) else []
    age = f.get("age_s") if isinstance(f.get("age_s"), int | float) else None
    return {"freshness": f["status"][:16], "freshness_age_s": age,
            "freshness_behind": [str(b)[:64] for b in behind[:10]]}


def _latency_when_serving(t: dict[str, Any]) -> dict[str, Any]:
    """Latency figures of a window without inferences are not measurements: blank them."""
    if t.get("inferences") == 0:
        return {**t, "p50": None, "p95": None, "p99": None, "max_ms": None}
    return t


def _serving(t: TelemetryRecord) -> TelemetryRecord:
    return replace(t, p50=None, p95=None, p99=None, max_ms=None) if t.inferences == 0 else t


def _ago(s: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.0f}{unit}"
    return f"{s:.0f}s"


class FleetAPI:
    """Answers for ``/api/…``; every method returns JSON-ready dicts."""

    def __init__(self, store: Store, fleets: list[str], *, collector: Any = None,
                 engine: Any = None, stale_after_s: float = 180.0,
                 signers: Any = None) -> None:
        self.store = store
        #: verified bundle signers (``SignerCheck``); None: every signer is "unverified"
        self.signers = signers
        self.fleets = list(fleets)
        self.collector = collector
        self.engine = engine
        self.stale_after_s = stale_after_s

    def fleet(self, name: str | None) -> str:
        if not name:
            return self.fleets[0] if self.fleets else "default"
        return name

    # -- fleets and overview
    def list_fleets(self) -> dict[str, Any]:
        known = sorted(set(self.fleets) | set(self.store.fleets()))
        return {"fleets": known, "default": self.fleet(None), "collecting": self.fleets}

    def _budgets(self, fleet: str, bundle_id: str | None) -> dict[str, float]:
        bundle = self.store.bundles.get(fleet, bundle_id) if bundle_id else None
        return bundle_budgets(bundle.manifest) if bundle else {}

    def device_rows(self, fleet: str) -> list[dict[str, Any]]:
        now = time.time()
        budgets = {b.bundle_id: bundle_budgets(b.manifest) for b in self.store.bundles.list(fleet)}
        drift = {(s.key, s.bundle_id): s for s in drift_status(self.store, fleet)}
        rows = []
        for d in self.store.devices.list(fleet):
            dr = drift.get((d.device_id, d.bundle_id))
            health, why = health_of(d, budgets.get(d.bundle_id or "", {}), now,
                                    self.stale_after_s)
            t = _latency_when_serving(d.telemetry or {})
            rows.append({
                "device": d.device_id, "online": d.online,
                "status": "online" if d.online else "offline" if d.online is False
                else "unknown",
                "board": d.board, "target": d.target, "agent_version": d.agent_version,
                "groups": list(d.groups), "bundle_id": d.bundle_id, "bundle_name": d.bundle_name,
                "bundle_version": d.bundle_version, "slot": d.slot, "phase": d.phase,
                "last_seen": d.last_seen,
                "age_s": None if d.last_seen is None else max(0.0, now - d.last_seen),
                "online_changed": d.online_changed, "health": health,
                "health_detail": why, "p50_ms": t.get("p50"), "p95_ms": t.get("p95"),
                "p99_ms": t.get("p99"), "rss_mb": t.get("rss_mb"),
                "peak_rss_mb": t.get("peak_rss_mb"), "cpu_percent": t.get("cpu_percent"),
                "temperature_c": t.get("temperature_c"),
                "drift_score": dr.score if dr else None, "drift_alert": bool(dr and dr.alert),
                "drift_note": dr.note if dr else "no drift windows",
                **_freshness(d.telemetry or {}),
                **_identity(d),
            })
        return rows

    def overview(self, fleet: str | None) -> dict[str, Any]:
        fleet = self.fleet(fleet)
        rows = self.device_rows(fleet)
        counts = {"devices": len(rows), "online": 0, "offline": 0, "unknown": 0}
        health: dict[str, int] = {h: 0 for h in ("healthy", "degraded", "stale", "offline",
                                                 "unknown")}
        by_target: dict[str, int] = {}
        by_bundle: dict[str, dict[str, Any]] = {}
        for r in rows:
            counts[r["status"]] += 1
            health[r["health"]] = health.get(r["health"], 0) + 1
            by_target[r["target"] or "?"] = by_target.get(r["target"] or "?", 0) + 1
            key = r["bundle_id"] or ""
            b = by_bundle.setdefault(key, {"bundle_id": r["bundle_id"],
                                           "name": r["bundle_name"],
                                           "version": r["bundle_version"], "devices": 0})
            b["devices"] += 1
        active = [self._rollout_brief(r) for r in self.store.rollouts.list(fleet, limit=20)
                  if r.state not in FINAL_STATES]
        return {"fleet": fleet, "generated": time.time(), "counts": counts, "health": health,
                "by_target": by_target,
                "by_bundle": sorted(by_bundle.values(), key=lambda b: -b["devices"]),
                "devices": rows, "active_rollouts": active,
                "collector": self.collector.stats() if self.collector else None}

    # -- one device
    def device(self, fleet: str | None, device_id: str) -> dict[str, Any]:
        fleet = self.fleet(fleet)
        d = self.store.devices.get(fleet, device_id)
        if d is None:
            raise NotFound(f"device {device_id} has not reported in fleet {fleet}")
        budgets = self._budgets(fleet, d.bundle_id)
        health, why = health_of(d, budgets, time.time(), self.stale_after_s)
        desired = {x.scope + ":" + x.name: x for x in self.store.desired.list(fleet)}
        own = desired.get(f"device:{device_id}")
        groups = [desired[f"group:{g}"] for g in d.groups if f"group:{g}" in desired]
        effective = own or max(groups, key=lambda x: x.ts or 0, default=None)
        return {"fleet": fleet, "device": device_id, "online": d.online,
                "online_changed": d.online_changed, "offline_reason": d.offline_reason,
                "board": d.board, "target": d.target, "agent_version": d.agent_version,
                "groups": list(d.groups), "bundle_id": d.bundle_id,
                "bundle_name": d.bundle_name, "bundle_version": d.bundle_version,
                "slot": d.slot, "phase": d.phase, "first_seen": d.first_seen,
                "last_seen": d.last_seen, "health": health, "health_detail": why,
                "budgets": budgets, "telemetry": d.telemetry, "state": d.state,
                "desired": effective.to_json() if effective else None,
                "in_sync": None if effective is None else effective.bundle_id == d.bundle_id,
                "events": [e.to_json() for e in self.store.events.list(
                    fleet, device_id=device_id, limit=50)], **_identity(d)}

    def telemetry(self, fleet: str | None, device_id: str, *, since: float | None = None,
                  until: float | None = None, points: int = 1500) -> dict[str, Any]:
        """Columnar series (``ts`` plus one list per metric), bucketed to ``points``."""
        fleet = self.fleet(fleet)
        now = time.time()
        if since is None:
            since = now - 3600.0
        elif since < 0:
            since = now + since  # relative: -600 = the last ten minutes
        rows = self.store.telemetry.series(fleet, device_id, since=since, until=until,
                                           limit=200_000)
        d = self.store.devices.get(fleet, device_id)
        if d is None and not rows:
            raise NotFound(f"device {device_id} has not reported in fleet {fleet}")
        series: dict[str, list] = {"ts": []}
        for k in _SERIES:
            series[k] = []
        step = max(1, -(-len(rows) // max(points, 1)))
        rows = [_serving(r) for r in rows]
        for i in range(0, len(rows), step):
            chunk = rows[i:i + step]
            series["ts"].append(chunk[-1].ts)
            for k in _SERIES:
                vals = [v for r in chunk if (v := getattr(r, k)) is not None]
                if not vals:
                    series[k].append(None)
                elif k in ("inferences", "errors"):
                    series[k].append(sum(vals))
                elif k in ("max_ms", "peak_rss_mb", "p99"):
                    series[k].append(max(vals))
                else:
                    series[k].append(sum(vals) / len(vals))
        return {"fleet": fleet, "device": device_id, "since": since, "until": until or now,
                "points": len(series["ts"]), "raw_points": len(rows), "bucket": step,
                "columns": list(TELEMETRY_COLUMNS), "series": series,
                "budgets": self._budgets(fleet, d.bundle_id if d else None)}

    def events(self, fleet: str | None, *, device_id: str | None = None,
               deployment_id: str | None = None, kind: str | None = None,
               after_id: int | None = None, limit: int = 200) -> dict[str, Any]:
        fleet = self.fleet(fleet)
        rows = self.store.events.list(fleet, device_id=device_id, deployment_id=deployment_id,
                                      kinds=[kind] if kind else None, after_id=after_id,
                                      limit=min(limit, 5000))
        return {"fleet": fleet, "events": [e.to_json() for e in rows]}

    # -- deployments and rollouts
    def _rollout_brief(self, r: RolloutRecord) -> dict[str, Any]:
        return rollout_status(self.store, r.id).to_json(devices=False, log_tail=5)

    def deployments(self, fleet: str | None) -> dict[str, Any]:
        """Rollouts (with per-stage counts) and plain deployments (device or group)."""
        fleet = self.fleet(fleet)
        rollouts = [self._rollout_brief(r) for r in self.store.rollouts.list(fleet, limit=50)]
        rollout_ids = [r["id"] for r in rollouts]
        seen: dict[str, dict[str, Any]] = {}
        for d in self.store.desired.list(fleet):
            dep = d.deployment_id
            if dep and not any(dep.startswith(rid) for rid in rollout_ids):
                seen.setdefault(dep, {"deployment_id": dep, "bundle_id": d.bundle_id,
                                      "name": d.bundle_name, "version": d.version,
                                      "ts": d.ts, "targets": []})
                seen[dep]["targets"].append({"scope": d.scope, "name": d.name})
        for s in self.store.events.deployments(fleet, limit=30):
            dep = s.deployment_id
            if any(dep.startswith(rid) for rid in rollout_ids) or dep.startswith("ro-"):
                continue
            if dep not in seen:
                seen[dep] = {"deployment_id": dep, "bundle_id": s.bundle_id, "name": None,
                             "version": None, "ts": s.first, "targets": []}
        plain = []
        devices = {d.device_id: d for d in self.store.devices.list(fleet)}
        for dep in sorted(seen.values(), key=lambda x: -(x["ts"] or 0))[:30]:
            detail = self.deployment(fleet, dep["deployment_id"], _known=dep, _devices=devices)
            detail.pop("devices", None)
            plain.append(detail)
        return {"fleet": fleet, "rollouts": rollouts, "deployments": plain}

    def deployment(self, fleet: str | None, deployment_id: str, *,
                   _known: dict[str, Any] | None = None,
                   _devices: dict[str, DeviceRecord] | None = None) -> dict[str, Any]:
        """One plain deployment: which devices it reached and how far each got."""
        fleet = self.fleet(fleet)
        tallies = self.store.events.tallies(fleet, [deployment_id])
        info = dict(_known or {})
        if not info:
            for d in self.store.desired.list(fleet):
                if d.deployment_id == deployment_id:
                    info.setdefault("deployment_id", deployment_id)
                    info.update(bundle_id=d.bundle_id, name=d.bundle_name, version=d.version,
                                ts=d.ts)
                    info.setdefault("targets", []).append({"scope": d.scope, "name": d.name})
            if not info and not tallies:
                raise NotFound(f"no deployment {deployment_id} in fleet {fleet}")
            info.setdefault("deployment_id", deployment_id)
            if "bundle_id" not in info:
                first = self.store.events.list(fleet, deployment_id=deployment_id, limit=1)
                info["bundle_id"] = first[0].bundle_id if first else None
            info.setdefault("targets", [])
        bundle_id = info.get("bundle_id")
        devices = _devices if _devices is not None else {
            d.device_id: d for d in self.store.devices.list(fleet)}
        reached: set[str] = set()
        for t in info.get("targets", []):
            if t["scope"] == "device":
                reached.add(t["name"])
            else:
                reached |= {k for k, d in devices.items() if t["name"] in d.groups}
        seen: dict[str, dict[str, EventTally]] = {}
        for row in tallies:
            seen.setdefault(row.device_id, {})[row.kind] = row
        per: dict[str, dict[str, Any]] = {}
        for dev in reached | set(seen):
            per[dev] = _outcome(seen.get(dev, {}))
            d = devices.get(dev)
            if d is not None and bundle_id and d.bundle_id == bundle_id \
                    and per[dev]["status"] in _RANK:
                per[dev]["status"] = "installed"
        counts = {s: 0 for s in DEPLOYMENT_STATUSES}
        for cur in per.values():
            counts[cur["status"]] += 1
        return {**info, "fleet": fleet, "counts": counts, "total": len(per),
                "devices": [{"device": k, **v} for k, v in sorted(per.items())]}

    def rollouts(self, fleet: str | None) -> dict[str, Any]:
        fleet = self.fleet(fleet)
        return {"fleet": fleet,
                "rollouts": [self._rollout_brief(r) for r in self.store.rollouts.list(fleet)]}

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        if self.store.rollouts.get(rollout_id) is None:
            raise NotFound(f"no rollout {rollout_id}")
        return rollout_status(self.store, rollout_id).to_json()

    # -- bundles
    def bundles(self, fleet: str | None) -> dict[str, Any]:
        fleet = self.fleet(fleet)
        running: dict[str, int] = {}
        for d in self.store.devices.list(fleet):
            if d.bundle_id:
                running[d.bundle_id] = running.get(d.bundle_id, 0) + 1
        out = []
        for b in self.store.bundles.list(fleet):
            m = b.manifest
            out.append({**{k: getattr(b, k) for k in _BUNDLE_LIST}, **self._signer(fleet, b),
                        "devices": running.get(b.bundle_id, 0), "budgets": bundle_budgets(m),
                        "metrics": m.get("metrics") or {},
                        "optimization": (m.get("optimization") or {}).get("mode")})
        return {"fleet": fleet, "bundles": out}

    def bundle(self, fleet: str | None, bundle_id: str) -> dict[str, Any]:
        fleet = self.fleet(fleet)
        b = self.store.bundles.get(fleet, bundle_id)
        if b is None:
            matches = [x for x in self.store.bundles.list(fleet)
                       if x.bundle_id.startswith(bundle_id)]
            if len(matches) != 1:
                raise NotFound(f"no bundle {bundle_id} published in fleet {fleet}")
            b = self.store.bundles.get(fleet, matches[0].bundle_id)
        devices = [d.device_id for d in self.store.devices.list(fleet)
                   if d.bundle_id == b.bundle_id]
        return {**b.to_json(), **self._signer(fleet, b), "fleet": fleet,
                "budgets": bundle_budgets(b.manifest),
                "metrics": b.manifest.get("metrics") or {}, "devices": devices,
                "report_status": "ready" if b.report is not None else
                ("unavailable" if b.report_error else "fetching"),
                "rollouts": [{"id": r.id, "state": r.state, "group": r.group_name,
                              "created": r.created}
                             for r in self.store.rollouts.list(fleet)
                             if r.bundle_id == b.bundle_id]}

    def _signer(self, fleet: str, b: Any) -> dict[str, Any]:
        """``signed_by`` only when this server verified the chunk table signature itself;
        ``signature``: verified, unverified or unsigned."""
        key_id, status = self.signers.status(fleet, b.bundle_id) if self.signers else \
            (None, "unverified")
        if status != "verified" and not b.signed_by:
            status = "unsigned"
        return {"signed_by": key_id, "signature": status}

    # -- drift
    def drift(self, fleet: str | None, *, device: str | None = None, bundle: str | None = None,
              group: str | None = None, since: float | None = None,
              until: float | None = None, points: int | None = None) -> dict[str, Any]:
        """Drift verdicts per device, bundle or group over a time range (``drift_status``);
        with ``points``, also the score over time (``drift_series``)."""
        fleet = self.fleet(fleet)
        if bundle:
            with contextlib.suppress(NotFound):  # a unique prefix of a published bundle too
                bundle = self.bundle(fleet, bundle)["bundle_id"]
        found = drift_status(self.store, fleet, device=device, bundle=bundle, group=group,
                             since=since, until=until)
        out: dict[str, Any] = {"fleet": fleet, "verdicts": [s.to_json() for s in found]}
        if points:
            out["series"] = drift_series(self.store, fleet, device=device, bundle=bundle,
                                         group=group, since=since, until=until, points=points)
        return out

    # -- collector
    def health(self) -> dict[str, Any]:
        c = self.collector.stats() if self.collector else None
        e = None
        if self.engine is not None:
            e = {"owner": self.engine.owner, "errors": self.engine.errors,
                 "last_error": self.engine.last_error}
        return {"ok": bool(c is None or c["connected"]), "collector": c, "rollouts": e,
                "database": self.store.kind, "fleets": self.fleets, "time": time.time()}


def _identity(d: Any) -> dict[str, Any]:
    """Whether a device's reports are authentic (signed by its enrolled key) and how many
    were refused; ``claimed_groups`` is what it says, ``groups`` what the inventory says."""
    return {"authenticated": d.authenticated, "key_id": d.key_id,
            "claimed_groups": list(d.claimed_groups), "unauthenticated": d.unauthenticated,
            "auth_error": d.auth_error}
