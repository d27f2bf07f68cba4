"""Starting and steering rollouts: plan one into the database (``fleet serve`` runs it), pause,
resume or abort it. Each returns the rollout's :class:`RolloutStatus`."""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgepack.agent.errors import EdgepackError
from edgepack.agent.mqtt import BrokerConfig, parse_broker_url
from edgepack.agent.protocol import Topics, check_id, decode
from edgepack.host.fleet.client import SyncClient
from edgepack.host.fleet.rollout.checks import RolloutChecks
from edgepack.host.fleet.rollout.plan import (
    FINAL_STATES,
    RolloutError,
    bundle_budgets,
    parse_duration,
    parse_max_failures,
    parse_stages,
    plan_devices,
)
from edgepack.host.fleet.rollout.status import RolloutStatus, find_rollout, rollout_status
from edgepack.host.fleet.storage import DeviceRecord, RolloutRecord, Store

__all__ = ["start_rollout", "pause_rollout", "resume_rollout", "abort_rollout"]


def _new_id() -> str:
    return f"ro-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def _resolve_bundle(store: Store, cfg: BrokerConfig, fleet: str, bundle: str | os.PathLike,
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
        try:
            report = json.loads(b.read_member("report.json"))
        except (EdgepackError, KeyError, ValueError):
            report = None
        store.bundles.add(fleet, table, report)
        return table
    prefix = str(bundle)
    if not re.fullmatch(r"[0-9a-f]{6,64}", prefix):
        raise RolloutError(f"{bundle} is neither a .edgepack file nor a bundle id",
                           field="bundle")
    with SyncClient(cfg, timeout=15) as c:
        found = c.retained(topics.prefix + "bundles/+/manifest", settle=0.4)
    ids = {t.split("/")[-2]: p for t, p in found.items() if t.split("/")[-2].startswith(prefix)}
    if len(ids) != 1:
        why = "no published bundle" if not ids else f"{len(ids)} published bundles"
        raise RolloutError(f"{why} in fleet {fleet!r} on {cfg.url} match {prefix}: publish the "
                           "bundle first or give more digits", field="bundle")
    (_, payload), = ids.items()
    table = decode(payload, "bundle manifest message")
    store.bundles.add(fleet, table)
    return table


def start_rollout(store: Store, broker: BrokerConfig | str, bundle: str | os.PathLike, *,
                  group: str, fleet: str = "default", stages: str | Sequence[float] = "1,10,50,100",
                  max_failures: str = "5%", soak: str | float = "10m",
                  stage_timeout: str | float = "30m", key_path: str | os.PathLike | None = None,
                  allow_downgrade: bool = False, devices: Sequence[str] | None = None,
                  rollout_id: str | None = None, checks: RolloutChecks | None = None,
                  **thresholds: Any) -> RolloutStatus:
    """Plan a staged rollout of ``bundle`` to ``group`` and store it; ``fleet serve`` runs it.

    ``bundle`` is a ``.edgepack`` file (published first, signed with ``key_path``) or the id
    (or unique prefix) of a published bundle. ``devices`` overrides the group's membership as
    reported by the devices. ``checks`` (or its fields as keywords, in the operator's spelling:
    ``max_latency_regression="20%"``, ``max_error_rate_rise="1pt"``, ``max_drift_score=1``,
    ``max_confidence_drop="5pt"``, ``baseline_group=``, ``rollback_on_halt=``) sets what each
    stage is compared on (:class:`RolloutChecks`, defaults in ``docs/rollouts.md``).
    """
    cfg = parse_broker_url(broker) if isinstance(broker, str) else broker
    check_id(group, "group name")
    check_id(fleet, "fleet name")
    stage_list = parse_stages(stages)
    mf = parse_max_failures(max_failures)
    soak_s = parse_duration(soak, name="soak")
    timeout_s = parse_duration(stage_timeout, name="stage_timeout")
    checks = checks or RolloutChecks.parse(**thresholds)
    if checks.baseline_group:
        check_id(checks.baseline_group, "baseline group")
    rid = rollout_id or _new_id()
    check_id(rid, "rollout id")
    if store.rollouts.get(rid) is not None:
        raise RolloutError(f"rollout {rid} exists already", rollout_id=rid)
    table = _resolve_bundle(store, cfg, fleet, bundle, key_path)
    manifest = table.get("manifest") or {}
    rows = store.devices.list(fleet)
    if devices is not None:
        known = {r.device_id: r for r in rows}
        members = [known.get(d) or DeviceRecord(fleet=fleet, device_id=check_id(d))
                   for d in devices]
    else:
        members = [r for r in rows if group in r.groups]
    if not members:
        raise RolloutError(
            f"no device of group {group!r} in fleet {fleet!r} is known to the fleet database "
            f"{store.safe_url}. Groups come from the fleet's inventory: a device is a member "
            "once enrolled in the group ('edgepack fleet enroll') and its signed state has "
            "arrived; is 'edgepack fleet serve' collecting this fleet into this database?",
            field="group")
    plan, sizes = plan_devices(rid, members, stage_list)
    group_desired = store.desired.group(fleet, group)
    now = time.time()
    rollout = RolloutRecord(
        id=rid, fleet=fleet, group_name=group, bundle_id=table["bundle_id"],
        bundle_name=manifest.get("name"), bundle_version=manifest.get("version"),
        target=manifest.get("target"), stages=tuple(stage_list), max_failures=mf,
        soak_s=soak_s, stage_timeout_s=timeout_s, budgets=bundle_budgets(manifest),
        allow_downgrade=allow_downgrade, created=now, updated=now,
        previous_group_desired=group_desired.to_json() if group_desired else None)
    from edgepack.host.fleet.rollout.actions import remember_release_key

    remember_release_key(store, rid, key_path)
    counts = ", ".join(f"{p:g}%→{n}" for p, n in zip(stage_list, sizes, strict=True))
    store.rollouts.insert(rollout, plan, f"planned {manifest.get('name')} "
                          f"{manifest.get('version')} ({rollout.bundle_id[:12]}) for "
                          f"{len(members)} devices of group {group}: stages {counts}; max "
                          f"failures {mf}; soak {soak_s:g}s; halts past p95 latency "
                          f"+{checks.max_latency_regression:.0%}, error rate "
                          f"+{checks.max_error_rate_rise * 100:g}pt, drift score "
                          f"{checks.max_drift_score:g}, confidence "
                          f"-{checks.max_confidence_drop * 100:g}pt vs the previous bundle and "
                          + (f"group {checks.baseline_group}" if checks.baseline_group
                             else "the devices not yet reached")
                          + ("" if checks.rollback_on_halt else " (no rollback on halt)"),
                          checks.to_json())
    return rollout_status(store, rid)


def pause_rollout(store: Store, rollout_id: str) -> RolloutStatus:
    """Stop advancing (devices already deploying carry on); ``resume`` continues."""
    r = find_rollout(store, rollout_id)
    if r.state != "running":
        raise RolloutError(f"rollout {r.id} is {r.state}: only a running rollout pauses",
                           rollout_id=r.id)
    store.rollouts.update(r.id, expect_state="running", state="paused",
                          log="paused by the operator")
    return rollout_status(store, r.id)


def resume_rollout(store: Store, rollout_id: str) -> RolloutStatus:
    """Continue a paused rollout; the current soak starts over (a pause is a doubt)."""
    r = find_rollout(store, rollout_id)
    if r.state != "paused":
        raise RolloutError(f"rollout {r.id} is {r.state}: only a paused rollout resumes",
                           rollout_id=r.id)
    changes: dict[str, Any] = {"state": "running"}
    if r.soak_started:
        changes["soak_started"] = time.time()
    if r.stage_started:
        changes["stage_started"] = time.time()
    store.rollouts.update(r.id, expect_state="paused", log="resumed by the operator"
                          + ("; the soak starts over" if r.soak_started else ""), **changes)
    return rollout_status(store, r.id)


def abort_rollout(store: Store, rollout_id: str, *, rollback: bool = True) -> RolloutStatus:
    """Stop the rollout and roll back every device it deployed to (unless ``rollback=False``)."""
    r = find_rollout(store, rollout_id)
    if r.state in FINAL_STATES:
        raise RolloutError(f"rollout {r.id} is already {r.state}", rollout_id=r.id)
    if rollback:
        store.rollouts.update(r.id, expect_state=r.state, state="abort_requested",
                              detail="aborted by the operator",
                              log="aborted by the operator: rolling back every deployed device")
    else:
        store.rollouts.update(r.id, expect_state=r.state, state="aborted",
                              finished=time.time(), detail="aborted by the operator",
                              log="aborted by the operator (no rollback)")
    return rollout_status(store, r.id)
