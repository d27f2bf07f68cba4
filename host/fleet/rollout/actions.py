"""What the rollout engine does on the broker: deploy a stage, hand a completed rollout over to
the group, pin devices back to their previous bundle, and clear pins that became redundant.

Every action publishes retained desired states first and records the decision after, so a
restart in between publishes them again (they are idempotent).

Protocol v2: desired states are signed with the release key given at ``rollout start`` (its
path is remembered in the database, so the fleet server must be able to read it); a pin back to
an older bundle is preceded by a release-signed downgrade authorization for that device, and a
desired state is cleared with a signed empty one. Without a release key they are v1, unsigned
(development devices only).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from typing import Any

from edgepack.agent.mqtt import BrokerConfig
from edgepack.agent.protocol import DesiredState, Topics, encode
from edgepack.host.fleet.client import SyncClient
from edgepack.host.fleet.storage import RolloutDeviceRecord, RolloutRecord, Store

__all__ = ["Tick", "deploy_stage", "complete", "start_rollback", "finish_rollback",
           "remember_release_key", "record_halt"]


@dataclass
class Tick:
    """One engine step of one rollout: the rollout and its devices as this step changes them."""

    rollout: RolloutRecord
    devices: list[RolloutDeviceRecord]
    now: float

    def stage_devices(self, k: int) -> list[RolloutDeviceRecord]:
        return [d for d in self.devices if d.stage == k]

    def apply(self, store: Store, changes: dict[str, dict[str, Any]]) -> None:
        """Store ``{device_id: {field: value}}`` and see it in :attr:`devices`."""
        store.rollouts.update_devices(self.rollout.id, changes)
        self.devices = [replace(d, **changes[d.device_id]) if d.device_id in changes else d
                        for d in self.devices]

    def set_state(self, state: str) -> None:
        self.rollout = replace(self.rollout, state=state)


def remember_release_key(store: Store, rollout_id: str, key_path: Any) -> None:
    """Remember where the release key of ``rollout_id`` is (the engine signs with it)."""
    from edgepack.host.fleet.trust import release_key_path

    path = release_key_path(key_path)
    if path is not None:
        store.meta.set(f"rollout-key:{rollout_id}", str(path))


class _Signing:
    """Desired states of one rollout action: signed when the rollout has a release key."""

    def __init__(self, store: Store, c: SyncClient, r: RolloutRecord) -> None:
        from edgepack.host.fleet.trust import release_signer

        self.c, self.r, self.topics = c, r, Topics(r.fleet)
        path = store.meta.get(f"rollout-key:{r.id}")
        self.signer = release_signer(path) if path else None
        self._lengths: dict[str, int] = {}

    def _target(self, b: dict[str, Any]) -> Any:
        from edgepack.agent.trust import Target

        bid = b["bundle_id"]
        if bid not in self._lengths:
            topic = self.topics.bundle_manifest(bid)
            raw = self.c.retained(topic, settle=0.2).get(topic)
            self._lengths[bid] = json.loads(raw)["bytes"] if raw else 0
        return Target(bid, self._lengths[bid], b.get("name") or "", b.get("version") or "")

    def desired(self, deployment_id: str, *, device: str | None = None,
                bundle: dict[str, Any] | None = None,
                allow_downgrade: bool | None = None) -> bytes:
        r = self.r
        b = bundle or {"bundle_id": r.bundle_id, "name": r.bundle_name,
                       "version": r.bundle_version}
        if self.signer is None:
            ds = DesiredState(deployment_id=deployment_id, bundle_id=b["bundle_id"],
                              name=b.get("name") or "", version=b.get("version") or "",
                              allow_downgrade=r.allow_downgrade if allow_downgrade is None
                              else allow_downgrade, ts=time.time())
            return encode(ds.to_payload())
        from edgepack.host.fleet.trust import sign_desired

        return sign_desired(self.signer, r.fleet, target=self._target(b),
                            deployment_id=deployment_id, device=device,
                            group=None if device else r.group_name)

    def set(self, device_id: str, payload: bytes | None) -> int:
        """Retain ``payload`` (None clears) as the device's desired state; the message id."""
        if payload is None and self.signer is not None:
            from edgepack.host.fleet.trust import sign_desired

            payload = sign_desired(self.signer, self.r.fleet, target=None, deployment_id=None,
                                   device=device_id)
        return self.c.publish(self.topics.desired(device_id), payload or b"", qos=1,
                              retain=True, wait=False)

    def stage(self, devices: list[RolloutDeviceRecord], deployment_id: str) -> list[int]:
        if self.signer is None:
            payload = self.desired(deployment_id)
            return [self.set(d.device_id, payload) for d in devices]
        return [self.set(d.device_id, self.desired(deployment_id, device=d.device_id))
                for d in devices]

    def pin(self, d: RolloutDeviceRecord) -> int:
        """Back to the device's previous bundle (a downgrade it is authorized for)."""
        if self.signer is not None:
            from edgepack.host.fleet.trust import sign_downgrade

            self.c.publish(self.topics.downgrade(d.device_id), sign_downgrade(
                self.signer, self.r.fleet, device=d.device_id,
                target=self._target(d.previous)), qos=1, retain=True)
        return self.set(d.device_id, self.desired(f"{self.r.id}-rb", device=d.device_id,
                                                  bundle=d.previous, allow_downgrade=True))


def deploy_stage(store: Store, cfg: BrokerConfig, tick: Tick,
                 devices: list[RolloutDeviceRecord], k: int) -> None:
    """A device-level desired state naming the bundle for each device of stage ``k``."""
    r = tick.rollout
    deployment_id = f"{r.id}-s{k + 1}"
    with SyncClient(cfg, timeout=30) as c:
        c.wait_published(_Signing(store, c, r).stage(devices, deployment_id))
    now = time.time()
    tick.apply(store, {d.device_id: {"status": "pending", "deployment_id": deployment_id,
                                     "deployed_at": now, "detail": None} for d in devices})


def complete(store: Store, cfg: BrokerConfig, tick: Tick) -> None:
    """After the last stage: the group names the bundle (at 100 %), installed devices follow
    their group again, failed ones stay pinned to their previous bundle."""
    r = tick.rollout
    topics = Topics(r.fleet)
    full = r.stages[-1] >= 100
    with SyncClient(cfg, timeout=30) as c:
        s = _Signing(store, c, r)
        mids = []
        if full:
            c.publish(topics.group_desired(r.group_name), s.desired(f"{r.id}-group"), qos=1,
                      retain=True)
            mids += [s.set(d.device_id, None) for d in tick.devices
                     if d.status == "installed"]
        mids += [s.pin(d) for d in tick.devices
                 if d.status == "failed" and d.previous]
        c.wait_published(mids)
    ok = sum(d.status == "installed" for d in tick.devices)
    failed = sum(d.status == "failed" for d in tick.devices)
    store.rollouts.update(
        r.id, expect_state="running", state="completed", finished=time.time(),
        detail=f"{ok} installed, {failed} failed",
        log=f"completed: {ok} device(s) run {r.bundle_name} {r.bundle_version}, "
            f"{failed} failed" + (f"; group {r.group_name} now names the bundle"
                                  if full else ""))


def record_halt(store: Store, tick: Tick, k: int, why: str) -> None:
    """A ``rollout_halted`` event (in the fleet's event table) for each device of stage ``k``
    the rollout reached, naming the stage's deployment and the reason."""
    from edgepack.host.fleet.storage import event_row

    r = tick.rollout
    now = time.time()
    rows = [event_row(r.fleet, d.device_id, now, {
        "kind": "rollout_halted", "ts": now, "deployment_id": d.deployment_id,
        "bundle_id": r.bundle_id, "detail": f"rollout {r.id} halted at stage {k + 1}: {why}",
        "rollout_id": r.id}) for d in tick.stage_devices(k) if d.status != "waiting"]
    if rows:
        with store.db.transaction() as cur:
            store.events.write(cur, rows)


def start_rollback(store: Store, cfg: BrokerConfig, tick: Tick,
                   devices: list[RolloutDeviceRecord], *, then: str) -> None:
    """Pin ``devices`` to their previous bundle, then move the rollout to ``then``.

    Idempotent (retained desired states): a restart in between publishes them again.
    """
    r = tick.rollout
    targets = [d for d in devices if d.status not in ("waiting", "rolled_back")]
    running = {d.device_id: d.bundle_id for d in store.devices.list(
        r.fleet, ids=[t.device_id for t in targets])}
    group = r.previous_group_desired or {}
    fallback = None
    if group.get("bundle_id") and group["bundle_id"] != r.bundle_id:
        # a device that ran nothing before goes back to what its group named
        fallback = {"bundle_id": group["bundle_id"], "name": group.get("bundle_name"),
                    "version": group.get("version")}
    changes: dict[str, dict[str, Any]] = {}
    kept = 0
    with SyncClient(cfg, timeout=30) as c:
        s = _Signing(store, c, r)
        mids = []
        for d in targets:
            runs_new = running.get(d.device_id) == r.bundle_id
            if d.status == "failed" and not runs_new:
                # failed on the device (rejected, health check): it kept what it ran
                mids.append(s.pin(d) if d.previous else s.set(d.device_id, None))
                continue
            if not d.previous and fallback is not None:
                d = replace(d, previous=fallback)
                changes[d.device_id] = {"previous": fallback}
            if d.previous:
                mids.append(s.pin(d))
                if d.status == "rolling_back":
                    continue
                back = f"back to {d.previous.get('version')}"
                changes.setdefault(d.device_id, {}).update(
                    status="rolling_back", detail=f"{d.detail}; {back}"
                    if d.status == "failed" and d.detail else back)
            else:
                # nothing to go back to: the device keeps the new bundle and follows its group
                # again (no failure of its own)
                mids.append(s.set(d.device_id, None))
                kept += 1
                if d.status != "failed":
                    changes[d.device_id] = {
                        "detail": "no previous bundle to roll back to: keeps the new one"}
        c.wait_published(mids)
    tick.apply(store, changes)
    sent = sum(ch.get("status") == "rolling_back" for ch in changes.values())
    store.rollouts.update(
        r.id, expect_state=r.state, state=then, stage_started=time.time(),
        log=f"rollback: {sent} device(s) sent back to their previous bundle"
            + (f"; {kept} had none and keep the new one" if kept else ""))
    tick.set_state(then)


def finish_rollback(store: Store, cfg: BrokerConfig, tick: Tick) -> None:
    """Once the devices sent back confirm (or time out): end the rollout halted or aborted."""
    r = tick.rollout
    back = [d for d in tick.devices if d.status == "rolling_back"]
    started = r.stage_started or tick.now
    if back and tick.now - started <= r.stage_timeout_s:
        return
    if back:
        # stored, not applied to the tick: a device that never confirmed keeps its pin
        store.rollouts.update_devices(r.id, {d.device_id: {
            "status": "failed", "detail": "did not confirm the rollback in time"} for d in back})
    _unpin(store, cfg, tick)
    final = "aborted" if r.state == "aborting" else "halted"
    n = sum(d.status == "rolled_back" for d in tick.devices)
    store.rollouts.update(r.id, state=final, finished=time.time(),
                          log=f"{final}: {n} device(s) rolled back"
                              + (f", {len(back)} did not confirm" if back else ""))


def _unpin(store: Store, cfg: BrokerConfig, tick: Tick) -> None:
    """Clear rollback pins the group's own desired state makes redundant."""
    r = tick.rollout
    group = store.desired.group(r.fleet, r.group_name)
    if group is None:
        return
    redundant = [d for d in tick.devices if d.status in ("rolled_back", "failed")
                 and (d.previous or {}).get("bundle_id") == group.bundle_id]
    if not redundant:
        return
    with SyncClient(cfg, timeout=30) as c:
        s = _Signing(store, c, r)
        c.wait_published([s.set(d.device_id, None) for d in redundant])
