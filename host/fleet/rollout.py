"""Staged rollouts: a bundle reaches a group stage by stage, and stops — and rolls back — on
failures (``edgepack deploy … --group G --stages 1,10,50,100 --max-failures 5% --soak 10m``).

How a rollout runs (all of its state lives in the fleet database, so ``fleet serve`` resumes it
after a restart, and ``rollout pause|resume|abort`` work from any shell that reaches the
database):

1. **Plan** (:func:`start_rollout`): the group's members are the devices whose retained state
   lists the group (as stored by the collector). They are ordered — online devices first, in an
   order drawn from the rollout id so canaries differ between rollouts — and cut into cumulative
   stages: ``1,10,50,100`` puts 1 % (at least one device) in stage 1, up to 10 % by stage 2, ….
   Each device's currently active bundle is recorded, to roll back to.
2. **Deploy a stage** (:class:`RolloutEngine`): a *device-level* desired state (deployment id
   ``<rollout>-s<stage>``) for each device of the stage. Device-level desired states win over the
   group's, so the rest of the group keeps what it runs.
3. **Watch**: each device's events for that deployment move it through ``pending →
   downloading → installing → installed``, or to ``failed`` (rejected, health check failed,
   transfer given up, no answer within ``stage_timeout``).
4. **Soak**: once every device of the stage has installed or failed, the stage soaks for
   ``soak`` seconds; a device whose telemetry on the new bundle goes over the bundle's budgets
   (p95 latency, peak RSS) in more than a quarter of its reports fails.
5. **Halt** when the failures among all devices deployed so far exceed ``max_failures`` (an
   absolute count, or a percentage of the devices deployed so far): the stage's devices get a
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

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.agent.errors import BrokerError, EdgepackError, ProtocolError
from edgepack.agent.mqtt import BrokerConfig, SyncClient, parse_broker_url
from edgepack.agent.protocol import DesiredState, Topics, check_id, decode, encode
from edgepack.host.fleet.storage import Storage

__all__ = [
    "RolloutError",
    "RolloutEngine",
    "start_rollout",
    "rollout_status",
    "pause_rollout",
    "resume_rollout",
    "abort_rollout",
    "parse_stages",
    "parse_max_failures",
    "parse_duration",
    "allowed_failures",
    "bundle_budgets",
    "ACTIVE_STATES",
    "DEVICE_STATUSES",
]

log = logging.getLogger("edgepack.rollout")

ACTIVE_STATES = ("running", "halting", "rolling_back", "abort_requested", "aborting")
FINAL_STATES = ("completed", "halted", "aborted")
DEVICE_STATUSES = ("waiting", "pending", "downloading", "installing", "installed", "failed",
                   "rolling_back", "rolled_back")
_RANK = {"waiting": 0, "pending": 1, "downloading": 2, "installing": 3, "installed": 4}
_TERMINAL = ("installed", "failed", "rolled_back")
_EVENT_STATUS = {"download_started": "downloading", "download_progress": "downloading",
                 "downloaded": "installing", "verified": "installing", "staged": "installing",
                 "health_checking": "installing", "installed": "installed"}
_FAILED_KINDS = ("rejected", "health_failed")
_DUR = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


class RolloutError(EdgepackError):
    """A rollout cannot be planned, found or changed."""


# ----------------------------------------------------------------------------------- parsing

def parse_stages(text: str | list | tuple) -> list[float]:
    """``"1,10,50,100"`` -> ``[1.0, 10.0, 50.0, 100.0]``: increasing percentages in (0, 100]."""
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        stages = [float(str(s).strip().rstrip("%")) for s in items if str(s).strip()]
    except ValueError:
        raise RolloutError(f"--stages {text!r} must be comma-separated percentages, e.g. "
                           "1,10,50,100") from None
    if not stages:
        raise RolloutError("--stages needs at least one percentage, e.g. 1,10,50,100")
    if any(not 0 < s <= 100 for s in stages) or any(b <= a for a, b in zip(stages, stages[1:], strict=False)):
        raise RolloutError(f"--stages {text!r} must be increasing percentages between 0 and 100, "
                           "e.g. 1,10,50,100")
    return stages


def parse_max_failures(text: str | int) -> str:
    """``"5%"`` (of the devices deployed so far) or ``"3"`` (devices); returned normalised."""
    s = str(text).strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", s)
    if m and 0 <= float(m.group(1)) <= 100:
        return f"{float(m.group(1)):g}%"
    if s.isdigit():
        return str(int(s))
    raise RolloutError(f"--max-failures {text!r} must be a device count (3) or a percentage of "
                       "the devices deployed so far (5%)")


def parse_duration(text: str | float | int) -> float:
    """``"10m"``, ``"30s"``, ``"1h"``, ``"250ms"`` or plain seconds -> seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    m = _DUR.match(text)
    if not m:
        raise RolloutError(f"duration {text!r} must look like 30s, 10m, 1h or 2d")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600,
                                "d": 86400}[m.group(2)]


def allowed_failures(max_failures: str, deployed: int) -> int:
    """How many failed devices a rollout tolerates among ``deployed`` devices."""
    if max_failures.endswith("%"):
        return math.floor(float(max_failures[:-1]) / 100.0 * deployed + 1e-9)
    return int(max_failures)


def stage_sizes(stages: list[float], n: int) -> list[int]:
    """Cumulative device counts per stage: each stage adds at least one device while any are
    left, and a 100 % stage takes them all."""
    out: list[int] = []
    prev = 0
    for p in stages:
        k = n if p >= 100 else min(n, max(prev + 1, math.ceil(p / 100.0 * n - 1e-9)))
        out.append(k)
        prev = k
    return out


def bundle_budgets(manifest: dict | None) -> dict[str, float]:
    """p95 latency and peak RSS budgets a bundle's manifest sets (positive numbers only)."""
    b = (manifest or {}).get("budgets") or {}
    out = {}
    p95 = b.get("p95_ms", b.get("p95_latency_ms"))
    rss = b.get("peak_rss_mb", b.get("rss_mb"))
    if isinstance(p95, (int, float)) and p95 > 0:
        out["p95_ms"] = float(p95)
    if isinstance(rss, (int, float)) and rss > 0:
        out["peak_rss_mb"] = float(rss)
    return out


def _new_id() -> str:
    return f"ro-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"


# ----------------------------------------------------------------------------------- planning

def _resolve_bundle(storage: Storage, cfg: BrokerConfig, fleet: str, bundle: str | os.PathLike,
                    key_path: str | os.PathLike | None) -> dict[str, Any]:
    """Publish a bundle file if needed (or find a published id); record it; return the table."""
    topics = Topics(fleet)
    path = Path(bundle)
    if path.suffix == ".edgepack" or path.exists():
        from edgepack.agent.bundle import read_bundle
        from edgepack.host.fleet.publish import publish_bundle

        b = read_bundle(path)
        publish_bundle(path, cfg, key_path=key_path, fleet=fleet)
        with SyncClient(cfg, timeout=15) as c:
            raw = c.retained(topics.bundle_manifest(b.bundle_id), settle=0.3)
        table = decode(raw[topics.bundle_manifest(b.bundle_id)], "bundle manifest message") \
            if raw else {"bundle_id": b.bundle_id, "manifest": b.manifest, "bytes": b.size}
        report = None
        try:
            report = json.loads(b.read_member("report.json"))
        except (EdgepackError, KeyError, ValueError):
            report = None
        storage.add_bundle(fleet, table, report)
        return table
    prefix = str(bundle)
    if not re.fullmatch(r"[0-9a-f]{6,64}", prefix):
        raise RolloutError(f"{bundle} is neither a .edgepack file nor a bundle id")
    with SyncClient(cfg, timeout=15) as c:
        found = c.retained(topics.prefix + "bundles/+/manifest", settle=0.4)
    ids = {t.split("/")[-2]: p for t, p in found.items() if t.split("/")[-2].startswith(prefix)}
    if len(ids) != 1:
        why = "no published bundle" if not ids else f"{len(ids)} published bundles"
        raise RolloutError(f"{why} in fleet {fleet!r} on {cfg.url} match {prefix}: publish the "
                           "bundle (edgepack publish FILE) or give more digits")
    (bid, payload), = ids.items()
    table = decode(payload, "bundle manifest message")
    storage.add_bundle(fleet, table)
    return table


def start_rollout(storage: Storage, broker: BrokerConfig | str, bundle: str | os.PathLike, *,
                  group: str, fleet: str = "default", stages: str | list = "1,10,50,100",
                  max_failures: str = "5%", soak: str | float = "10m",
                  stage_timeout: str | float = "30m", key_path: str | os.PathLike | None = None,
                  allow_downgrade: bool = False, devices: list[str] | None = None,
                  rollout_id: str | None = None) -> dict[str, Any]:
    """Plan a staged rollout of ``bundle`` to ``group`` and store it; ``fleet serve`` runs it.

    ``bundle`` is a ``.edgepack`` file (published first, signed with ``key_path``) or the id
    (or unique prefix) of a published bundle. ``devices`` overrides the group's membership as
    reported by the devices. Returns :func:`rollout_status`.
    """
    cfg = parse_broker_url(broker) if isinstance(broker, str) else broker
    check_id(group, "group name")
    check_id(fleet, "fleet name")
    stage_list = parse_stages(stages)
    mf = parse_max_failures(max_failures)
    soak_s = parse_duration(soak)
    timeout_s = parse_duration(stage_timeout)
    rid = rollout_id or _new_id()
    check_id(rid, "rollout id")
    if storage.rollout(rid) is not None:
        raise RolloutError(f"rollout {rid} exists already")
    table = _resolve_bundle(storage, cfg, fleet, bundle, key_path)
    manifest = table.get("manifest") or {}
    bid = table["bundle_id"]
    rows = storage.devices(fleet)
    if devices is not None:
        known = {r["device_id"]: r for r in rows}
        members = [known.get(d) or {"device_id": check_id(d), "online": None}
                   for d in devices]
    else:
        members = [r for r in rows if group in (r.get("groups") or [])]
    if not members:
        raise RolloutError(
            f"no device of group {group!r} in fleet {fleet!r} is known to the fleet database "
            f"{storage.safe_url}. Devices list their groups in their state; is 'edgepack fleet "
            "serve' collecting this fleet into this database?")
    members.sort(key=lambda r: (r.get("online") is not True, hashlib.sha256(
        f"{rid}/{r['device_id']}".encode()).hexdigest()))
    sizes = stage_sizes(stage_list, len(members))
    plan = []
    prev = 0
    for k, upto in enumerate(sizes):
        for r in members[prev:upto]:
            active = None
            if r.get("bundle_id"):
                active = {"bundle_id": r["bundle_id"], "name": r.get("bundle_name"),
                          "version": r.get("bundle_version")}
            plan.append({"rollout_id": rid, "device_id": r["device_id"], "stage": k,
                         "deployment_id": f"{rid}-s{k + 1}", "status": "waiting",
                         "previous": json.dumps(active) if active else None,
                         "deployed_at": None, "installed_at": None, "updated": time.time(),
                         "detail": None})
        prev = upto
    group_desired = next((d for d in storage.desired(fleet)
                          if d["scope"] == "group" and d["name"] == group), None)
    now = time.time()
    row = {
        "id": rid, "fleet": fleet, "group_name": group, "bundle_id": bid,
        "bundle_name": manifest.get("name"), "bundle_version": manifest.get("version"),
        "target": manifest.get("target"), "stages": json.dumps(stage_list), "max_failures": mf,
        "soak_s": soak_s, "stage_timeout_s": timeout_s, "budgets": json.dumps(bundle_budgets(manifest)),
        "allow_downgrade": int(allow_downgrade), "state": "running", "stage": 0,
        "stage_started": None, "soak_started": None, "created": now, "updated": now,
        "finished": None, "detail": None,
        "previous_group_desired": json.dumps(group_desired, default=str) if group_desired
        else None,
    }
    counts = ", ".join(f"{p:g}%→{n}" for p, n in zip(stage_list, sizes, strict=True))
    storage.insert_rollout(row, plan, f"planned {manifest.get('name')} "
                           f"{manifest.get('version')} ({bid[:12]}) for {len(members)} devices "
                           f"of group {group}: stages {counts}; max failures {mf}; soak "
                           f"{soak_s:g}s")
    return rollout_status(storage, rid)


# ----------------------------------------------------------------------------------- control

def _get(storage: Storage, rollout_id: str) -> dict[str, Any]:
    r = storage.rollout(rollout_id)
    if r is None:
        matches = [x for x in storage.rollouts(limit=1000) if x["id"].startswith(rollout_id)]
        if len(matches) == 1:
            return matches[0]
        raise RolloutError(f"no rollout {rollout_id!r} in {storage.safe_url}"
                           + (" (ambiguous prefix)" if matches else "")
                           + ": 'edgepack rollout list' shows them")
    return r


def pause_rollout(storage: Storage, rollout_id: str) -> dict[str, Any]:
    """Stop advancing (devices already deploying carry on); ``resume`` continues."""
    r = _get(storage, rollout_id)
    if r["state"] != "running":
        raise RolloutError(f"rollout {r['id']} is {r['state']}: only a running rollout pauses")
    storage.update_rollout(r["id"], expect_state="running", state="paused",
                           log="paused by the operator")
    return rollout_status(storage, r["id"])


def resume_rollout(storage: Storage, rollout_id: str) -> dict[str, Any]:
    r = _get(storage, rollout_id)
    if r["state"] != "paused":
        raise RolloutError(f"rollout {r['id']} is {r['state']}: only a paused rollout resumes")
    fields: dict[str, Any] = {"state": "running"}
    if r.get("soak_started"):
        fields["soak_started"] = time.time()  # the soak starts over: a pause is a doubt
    if r.get("stage_started"):
        fields["stage_started"] = time.time()
    storage.update_rollout(r["id"], expect_state="paused", log="resumed by the operator"
                           + ("; the soak starts over" if r.get("soak_started") else ""),
                           **fields)
    return rollout_status(storage, r["id"])


def abort_rollout(storage: Storage, rollout_id: str, *, rollback: bool = True) -> dict[str, Any]:
    """Stop the rollout and roll back every device it deployed to (unless ``rollback=False``)."""
    r = _get(storage, rollout_id)
    if r["state"] in FINAL_STATES:
        raise RolloutError(f"rollout {r['id']} is already {r['state']}")
    if rollback:
        storage.update_rollout(r["id"], expect_state=r["state"], state="abort_requested",
                               detail="aborted by the operator",
                               log="aborted by the operator: rolling back every deployed device")
    else:
        storage.update_rollout(r["id"], expect_state=r["state"], state="aborted",
                               finished=time.time(), detail="aborted by the operator",
                               log="aborted by the operator (no rollback)")
    return rollout_status(storage, r["id"])


def rollout_status(storage: Storage, rollout_id: str) -> dict[str, Any]:
    """The rollout with per-stage device counts by status, its devices and its log."""
    r = _get(storage, rollout_id)
    devs = storage.rollout_devices(r["id"])
    stages = []
    for k, pct in enumerate(r["stages"]):
        mine = [d for d in devs if d["stage"] == k]
        counts = {s: 0 for s in DEVICE_STATUSES}
        for d in mine:
            counts[d["status"]] = counts.get(d["status"], 0) + 1
        if k < r["stage"] or r["state"] == "completed":
            phase = "passed"
        elif k == r["stage"]:
            phase = {"running": "soaking" if r.get("soak_started") else
                     "deploying" if r.get("stage_started") else "starting",
                     "paused": "paused", "rolling_back": "rolling back",
                     "halting": "rolling back", "abort_requested": "rolling back",
                     "aborting": "rolling back", "halted": "halted",
                     "aborted": "aborted"}.get(r["state"], r["state"])
        else:
            phase = "waiting"
        stages.append({"stage": k + 1, "percent": pct, "devices": len(mine),
                       "deployment_id": f"{r['id']}-s{k + 1}", "phase": phase,
                       "counts": counts})
    deployed = [d for d in devs if d["status"] != "waiting"]
    failed = sum(d["status"] == "failed" for d in devs)
    out = dict(r)
    out.update(stage=r["stage"] + 1, stage_count=len(r["stages"]), stages=stages,
               devices=devs, log=storage.rollout_log(r["id"]), failures=failed,
               deployed=len(deployed),
               allowed_failures=allowed_failures(r["max_failures"], len(deployed)))
    if r.get("soak_started") and r["state"] == "running":
        out["soak_left_s"] = max(0.0, r["soak_s"] - (time.time() - r["soak_started"]))
    return out


# ----------------------------------------------------------------------------------- engine

@dataclass
class _Ctx:
    rollout: dict[str, Any]
    devices: list[dict[str, Any]]
    now: float


class RolloutEngine:
    """Drives every active rollout of the database, one step per ``tick_s`` (a thread).

    Several ``fleet serve`` processes may share a database: the one holding the ``rollouts``
    lease drives. Every step reads its inputs from the database (events and telemetry the
    collector stored) and writes its decisions back before acting, so a restart resumes.
    """

    def __init__(self, storage: Storage, broker: BrokerConfig | str, *, tick_s: float = 1.0,
                 owner: str | None = None) -> None:
        self.storage = storage
        self.cfg = parse_broker_url(broker) if isinstance(broker, str) else broker
        self.tick_s = tick_s
        self.owner = owner or f"engine-{uuid.uuid4().hex[:8]}"
        self.errors = 0
        self.last_error: str | None = None
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
            self.storage.release_lease("rollouts", self.owner)

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
        if not self.storage.acquire_lease("rollouts", self.owner, max(15.0, 5 * self.tick_s)):
            return
        for r in self.storage.rollouts(states=(*ACTIVE_STATES, "paused"), limit=1000):
            try:
                self.step(r)
            except (BrokerError, ProtocolError) as exc:
                self.errors += 1
                self.last_error = str(exc)
                log.warning("rollout %s: %s (retrying)", r["id"], exc)

    def step(self, r: dict[str, Any]) -> None:
        ctx = _Ctx(rollout=r, devices=self.storage.rollout_devices(r["id"]), now=time.time())
        self._observe(ctx)
        state = r["state"]
        if state == "running":
            self._run_stage(ctx)
        elif state == "halting":
            self._start_rollback(ctx, [d for d in ctx.devices if d["stage"] == r["stage"]],
                                 then="rolling_back")
        elif state == "abort_requested":
            self._start_rollback(ctx, ctx.devices, then="aborting")
        elif state in ("rolling_back", "aborting"):
            self._rolling_back(ctx)

    # -- observation: events and device states -> device statuses
    def _observe(self, ctx: _Ctx) -> None:
        r = ctx.rollout
        fleet = r["fleet"]
        watched = [d for d in ctx.devices if d["status"] not in ("waiting", "failed",
                                                                  "rolled_back")]
        if not watched:
            return
        dep_ids = sorted({d["deployment_id"] for d in watched if d["deployment_id"]})
        kinds: dict[tuple[str, str], dict[str, dict]] = {}
        for row in self.storage.event_kinds(fleet, dep_ids):
            kinds.setdefault((row["device_id"], row["deployment_id"]), {})[row["kind"]] = row
        states = {d["device_id"]: d for d in self.storage.devices(
            fleet, ids=[w["device_id"] for w in watched])}
        updates = []
        for d in watched:
            new = self._status(d, kinds.get((d["device_id"], d["deployment_id"]), {}),
                               states.get(d["device_id"]), r)
            if new is not None and (new["status"], new.get("detail")) != (d["status"],
                                                                          d.get("detail")):
                new["device_id"] = d["device_id"]
                updates.append(new)
                d.update(new)
        self.storage.update_rollout_devices(r["id"], updates)

    def _status(self, d: dict, kinds: dict[str, dict], state: dict | None,
                r: dict) -> dict[str, Any] | None:
        """The device's new status from the kinds of events it sent for its deployment."""
        status = d["status"]
        if status == "rolling_back":
            prev = (d.get("previous") or {}).get("bundle_id")
            if state is not None and prev and state.get("bundle_id") == prev:
                return {"status": "rolled_back", "detail": d.get("detail")
                        or f"back on {(d.get('previous') or {}).get('version')}"}
            return None
        for kind in _FAILED_KINDS:
            if kind in kinds:
                return {"status": "failed",
                        "detail": f"{kind}: {kinds[kind].get('detail') or ''}"[:500]}
        if "rolled_back" in kinds:  # e.g. a crash loop after the commit
            return {"status": "failed", "detail": "rolled back by the device: "
                    f"{kinds['rolled_back'].get('detail') or ''}"[:500]}
        if "error" in kinds and kinds["error"].get("giving_up"):
            return {"status": "failed",
                    "detail": f"error: {kinds['error'].get('detail') or ''}"[:500]}
        new = status
        for kind, st in _EVENT_STATUS.items():
            if kind in kinds and _RANK[st] > _RANK.get(new, 0):
                new = st
        installed_at = d.get("installed_at")
        if "installed" in kinds:
            installed_at = installed_at or kinds["installed"].get("last")
        if state is not None and state.get("bundle_id") == r["bundle_id"]:
            new = "installed"
        if new == "installed":
            installed_at = installed_at or time.time()
        if new == status:
            return None
        out: dict[str, Any] = {"status": new, "detail": None}
        if new == "installed":
            out["installed_at"] = installed_at
        return out

    # -- running
    def _run_stage(self, ctx: _Ctx) -> None:
        r = ctx.rollout
        k = r["stage"]
        stage_devs = [d for d in ctx.devices if d["stage"] == k]
        if not stage_devs:  # a small group: this percentage adds no device
            if k + 1 < len(r["stages"]):
                self.storage.update_rollout(r["id"], expect_state="running", stage=k + 1,
                                            stage_started=None, soak_started=None,
                                            log=f"stage {k + 1} has no device of its own")
            else:
                self._complete(ctx)
            return
        waiting = [d for d in stage_devs if d["status"] == "waiting"]
        if waiting:
            self._deploy(r, waiting, k)
            self.storage.update_rollout(
                r["id"], stage_started=ctx.now, soak_started=None,
                log=f"stage {k + 1}/{len(r['stages'])} ({r['stages'][k]:g}%): deployed to "
                    f"{len(waiting)} device(s)")
            return
        if r.get("stage_started") is None:  # resumed from a state written before the deploy
            self.storage.update_rollout(r["id"], stage_started=ctx.now)
            return
        if self._over_limit(ctx):
            return
        pending = [d for d in stage_devs if d["status"] not in _TERMINAL]
        if pending:
            if ctx.now - r["stage_started"] > r["stage_timeout_s"]:
                self.storage.update_rollout_devices(r["id"], [
                    {"device_id": d["device_id"], "status": "failed",
                     "detail": f"no outcome within {r['stage_timeout_s']:g}s (last: "
                               f"{d['status']})"} for d in pending])
                for d in pending:
                    d["status"] = "failed"
                self.storage.add_rollout_log(
                    r["id"], f"stage {k + 1}: {len(pending)} device(s) timed out")
                self._over_limit(ctx)
            return
        if r.get("soak_started") is None:
            ok = sum(d["status"] == "installed" for d in stage_devs)
            self.storage.update_rollout(
                r["id"], soak_started=ctx.now,
                log=f"stage {k + 1}: {ok}/{len(stage_devs)} installed; soaking for "
                    f"{r['soak_s']:g}s")
            return
        self._check_budgets(ctx, stage_devs)
        if self._over_limit(ctx):
            return
        if ctx.now - r["soak_started"] < r["soak_s"]:
            return
        if k + 1 < len(r["stages"]):
            self.storage.update_rollout(r["id"], expect_state="running", stage=k + 1,
                                        stage_started=None, soak_started=None,
                                        log=f"stage {k + 1} passed")
            return
        self._complete(ctx)

    def _over_limit(self, ctx: _Ctx) -> bool:
        r = ctx.rollout
        deployed = [d for d in ctx.devices if d["status"] != "waiting"]
        failed = [d for d in deployed if d["status"] == "failed"]
        allowed = allowed_failures(r["max_failures"], len(deployed))
        if len(failed) <= allowed:
            return False
        k = r["stage"]
        why = (f"{len(failed)} failed device(s) among {len(deployed)} deployed, over "
               f"--max-failures {r['max_failures']} ({allowed} allowed)")
        if self.storage.update_rollout(r["id"], expect_state="running", state="halting",
                                       detail=f"halted at stage {k + 1}: {why}",
                                       log=f"halting at stage {k + 1}: {why}; rolling back "
                                           "the stage"):
            r["state"] = "halting"
            self._start_rollback(ctx, [d for d in ctx.devices if d["stage"] == k],
                                 then="rolling_back")
        return True

    def _check_budgets(self, ctx: _Ctx, stage_devs: list[dict]) -> None:
        r = ctx.rollout
        budgets = r.get("budgets") or {}
        if not budgets:
            return
        installed = [d for d in stage_devs if d["status"] == "installed"]
        if not installed:
            return
        since = min(d.get("installed_at") or r["soak_started"] for d in installed)
        p95 = budgets.get("p95_ms", 1e18)
        rss = budgets.get("peak_rss_mb", 1e18)
        ids = [d["device_id"] for d in installed]
        over: dict[str, dict] = {}
        for i in range(0, len(ids), 500):
            part = ids[i:i + 500]
            rows = self.storage.query(
                "SELECT device_id, COUNT(*) AS n, SUM(CASE WHEN p95 > ? OR peak_rss_mb > ? "
                "THEN 1 ELSE 0 END) AS bad, MAX(p95) AS p95, MAX(peak_rss_mb) AS rss "
                "FROM telemetry WHERE fleet = ? AND bundle_id = ? AND ts >= ? AND device_id IN "
                f"({', '.join('?' * len(part))}) GROUP BY device_id",
                [p95, rss, r["fleet"], r["bundle_id"], since, *part])
            for row in rows:
                if row["bad"] and row["bad"] >= 2 and row["bad"] * 4 > row["n"]:
                    over[row["device_id"]] = row
        if not over:
            return
        updates = []
        for d in installed:
            row = over.get(d["device_id"])
            if row is None:
                continue
            parts = []
            if row["p95"] is not None and row["p95"] > p95:
                parts.append(f"p95 {row['p95']:.1f} ms > budget {p95:g} ms")
            if row["rss"] is not None and row["rss"] > rss:
                parts.append(f"peak RSS {row['rss']:.0f} MB > budget {rss:g} MB")
            detail = (f"over budget in {row['bad']}/{row['n']} telemetry reports: "
                      + ", ".join(parts))
            updates.append({"device_id": d["device_id"], "status": "failed", "detail": detail})
            d.update(status="failed", detail=detail)
        self.storage.update_rollout_devices(r["id"], updates)
        self.storage.add_rollout_log(r["id"], f"stage {r['stage'] + 1}: {len(updates)} "
                                     "device(s) over the bundle's budgets during the soak")

    def _complete(self, ctx: _Ctx) -> None:
        r = ctx.rollout
        topics = Topics(r["fleet"])
        full = r["stages"][-1] >= 100
        with SyncClient(self.cfg, timeout=30) as c:
            mids = []
            if full:
                ds = DesiredState(deployment_id=f"{r['id']}-group", bundle_id=r["bundle_id"],
                                  name=r["bundle_name"] or "", version=r["bundle_version"] or "",
                                  allow_downgrade=r["allow_downgrade"], ts=time.time())
                c.publish(topics.group_desired(r["group_name"]), encode(ds.to_payload()), qos=1,
                          retain=True)
                for d in ctx.devices:
                    if d["status"] == "installed":
                        mids.append(c.publish(topics.desired(d["device_id"]), b"", qos=1,
                                              retain=True, wait=False))
            for d in ctx.devices:
                if d["status"] == "failed" and d.get("previous"):
                    mids.append(self._pin(c, topics, r, d))
            c.wait_published(mids)
        ok = sum(d["status"] == "installed" for d in ctx.devices)
        failed = sum(d["status"] == "failed" for d in ctx.devices)
        self.storage.update_rollout(
            r["id"], expect_state="running", state="completed", finished=time.time(),
            detail=f"{ok} installed, {failed} failed",
            log=f"completed: {ok} device(s) run {r['bundle_name']} {r['bundle_version']}, "
                f"{failed} failed" + (f"; group {r['group_name']} now names the bundle"
                                      if full else ""))

    # -- deploying and rolling back
    def _deploy(self, r: dict, devices: list[dict], k: int) -> None:
        topics = Topics(r["fleet"])
        ds = DesiredState(deployment_id=f"{r['id']}-s{k + 1}", bundle_id=r["bundle_id"],
                          name=r["bundle_name"] or "", version=r["bundle_version"] or "",
                          allow_downgrade=r["allow_downgrade"], ts=time.time())
        payload = encode(ds.to_payload())
        with SyncClient(self.cfg, timeout=30) as c:
            mids = [c.publish(topics.desired(d["device_id"]), payload, qos=1, retain=True,
                              wait=False) for d in devices]
            c.wait_published(mids)
        now = time.time()
        self.storage.update_rollout_devices(r["id"], [
            {"device_id": d["device_id"], "status": "pending", "deployment_id": ds.deployment_id,
             "deployed_at": now, "detail": None} for d in devices])
        for d in devices:
            d.update(status="pending", deployment_id=ds.deployment_id, deployed_at=now)

    def _pin(self, c: SyncClient, topics: Topics, r: dict, d: dict) -> int:
        prev = d["previous"]
        ds = DesiredState(deployment_id=f"{r['id']}-rb", bundle_id=prev["bundle_id"],
                          name=prev.get("name") or "", version=prev.get("version") or "",
                          allow_downgrade=True, ts=time.time())
        return c.publish(topics.desired(d["device_id"]), encode(ds.to_payload()), qos=1,
                         retain=True, wait=False)

    def _start_rollback(self, ctx: _Ctx, devices: list[dict], *, then: str) -> None:
        """Pin ``devices`` to their previous bundle, then move the rollout to ``then``.

        Idempotent (retained desired states): a restart in between publishes them again.
        """
        r = ctx.rollout
        topics = Topics(r["fleet"])
        targets = [d for d in devices if d["status"] not in ("waiting", "rolled_back")]
        running = {d["device_id"]: d.get("bundle_id") for d in self.storage.devices(
            r["fleet"], ids=[t["device_id"] for t in targets])}
        group = r.get("previous_group_desired") or {}
        fallback = None
        if group.get("bundle_id") and group["bundle_id"] != r["bundle_id"]:
            # a device that ran nothing before goes back to what its group named
            fallback = {"bundle_id": group["bundle_id"], "name": group.get("bundle_name"),
                        "version": group.get("version")}
        updates: list[dict[str, Any]] = []
        kept = 0
        with SyncClient(self.cfg, timeout=30) as c:
            mids = []
            for d in targets:
                runs_new = running.get(d["device_id"]) == r["bundle_id"]
                if d["status"] == "failed" and not runs_new:
                    # failed on the device (rejected, health check): it kept what it ran
                    mids.append(self._pin(c, topics, r, d) if d.get("previous") else
                                c.publish(topics.desired(d["device_id"]), b"", qos=1,
                                          retain=True, wait=False))
                    continue
                if not d.get("previous") and fallback is not None:
                    d["previous"] = fallback
                    updates.append({"device_id": d["device_id"],
                                    "previous": json.dumps(fallback)})
                if d.get("previous"):
                    mids.append(self._pin(c, topics, r, d))
                    if d["status"] == "rolling_back":
                        continue
                    back = f"back to {d['previous'].get('version')}"
                    updates.append({"device_id": d["device_id"], "status": "rolling_back",
                                    "detail": f"{d['detail']}; {back}" if d["status"] == "failed"
                                    and d.get("detail") else back})
                else:
                    # nothing to go back to: the device keeps the new bundle and follows its
                    # group again (no failure of its own)
                    mids.append(c.publish(topics.desired(d["device_id"]), b"", qos=1,
                                          retain=True, wait=False))
                    kept += 1
                    if d["status"] != "failed":
                        updates.append({"device_id": d["device_id"], "detail":
                                        "no previous bundle to roll back to: keeps the new one"})
            c.wait_published(mids)
        self.storage.update_rollout_devices(r["id"], updates)
        for u in updates:
            dev = next(d for d in ctx.devices if d["device_id"] == u["device_id"])
            dev.update({k: v for k, v in u.items() if k != "previous"})
        self.storage.update_rollout(
            r["id"], expect_state=r["state"], state=then, stage_started=time.time(),
            log=f"rollback: {sum(u.get('status') == 'rolling_back' for u in updates)} "
                "device(s) sent back to their previous bundle"
                + (f"; {kept} had none and keep the new one" if kept else ""))
        r["state"] = then

    def _rolling_back(self, ctx: _Ctx) -> None:
        r = ctx.rollout
        back = [d for d in ctx.devices if d["status"] == "rolling_back"]
        started = r.get("stage_started") or ctx.now
        if back and ctx.now - started <= r["stage_timeout_s"]:
            return
        if back:
            self.storage.update_rollout_devices(r["id"], [
                {"device_id": d["device_id"], "status": "failed",
                 "detail": "did not confirm the rollback in time"} for d in back])
        self._unpin(ctx)
        final = "aborted" if r["state"] == "aborting" else "halted"
        n = sum(d["status"] == "rolled_back" for d in ctx.devices)
        self.storage.update_rollout(r["id"], state=final, finished=time.time(),
                                    log=f"{final}: {n} device(s) rolled back"
                                        + (f", {len(back)} did not confirm" if back else ""))

    def _unpin(self, ctx: _Ctx) -> None:
        """Clear rollback pins the group's own desired state makes redundant."""
        r = ctx.rollout
        group = next((d for d in self.storage.desired(r["fleet"])
                      if d["scope"] == "group" and d["name"] == r["group_name"]), None)
        if group is None:
            return
        redundant = [d for d in ctx.devices if d["status"] in ("rolled_back", "failed")
                     and (d.get("previous") or {}).get("bundle_id") == group["bundle_id"]]
        if not redundant:
            return
        topics = Topics(r["fleet"])
        with SyncClient(self.cfg, timeout=30) as c:
            c.wait_published([c.publish(topics.desired(d["device_id"]), b"", qos=1, retain=True,
                                        wait=False) for d in redundant])
