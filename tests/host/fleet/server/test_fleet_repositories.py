"""The typed repositories of the fleet database, on SQLite and on a real PostgreSQL: what each
table returns as frozen records, and the JSON those records give the API."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest

from edgepack.host.fleet.storage import (
    Batch,
    DeviceRecord,
    RolloutDeviceRecord,
    RolloutRecord,
    open_store,
)

BID = "cd" * 32


def _rollout(rid: str, now: float) -> tuple[RolloutRecord, list[RolloutDeviceRecord]]:
    r = RolloutRecord(id=rid, fleet="f", group_name="g", bundle_id=BID, bundle_name="kws",
                      bundle_version="2.0.0", target="rpi4", stages=(50.0, 100.0),
                      max_failures="1", soak_s=5.0, stage_timeout_s=60.0,
                      budgets={"p95_ms": 20.0}, allow_downgrade=True, created=now, updated=now,
                      previous_group_desired={"bundle_id": "ab" * 32, "version": "1.0.0"})
    devices = [RolloutDeviceRecord(rollout_id=rid, device_id=f"d{i}", stage=i // 2,
                                   deployment_id=f"{rid}-s{i // 2 + 1}", status="waiting",
                                   previous={"bundle_id": "ab" * 32, "version": "1.0.0"}
                                   if i else None)
               for i in range(4)]
    return r, devices


def test_rollout_repository(db_url):
    now = time.time()
    with open_store(db_url) as s:
        r, devices = _rollout("ro-1", now)
        s.rollouts.insert(r, devices, "planned")
        got = s.rollouts.get("ro-1")
        assert got == dataclasses.replace(r, updated=got.updated)  # a faithful round trip
        assert [d.device_id for d in s.rollouts.devices("ro-1")] == ["d0", "d1", "d2", "d3"]
        assert s.rollouts.devices("ro-1")[1].previous == {"bundle_id": "ab" * 32,
                                                          "version": "1.0.0"}
        # a guarded state change: only from the expected state
        assert s.rollouts.update("ro-1", expect_state="running", state="paused", log="paused")
        assert not s.rollouts.update("ro-1", expect_state="running", state="halting")
        assert s.rollouts.get("ro-1").state == "paused"
        s.rollouts.update_devices("ro-1", {"d0": {"status": "pending", "deployed_at": now},
                                           "d1": {"previous": {"bundle_id": BID}}})
        d0, d1 = s.rollouts.devices("ro-1")[:2]
        assert (d0.status, d0.deployed_at) == ("pending", pytest.approx(now))
        assert d1.previous == {"bundle_id": BID}
        s.rollouts.add_log("ro-1", "hello")
        assert [x.message for x in s.rollouts.log("ro-1")] == ["planned", "paused", "hello"]
        assert [x.message for x in s.rollouts.log("ro-1", limit=1)] == ["hello"]
        s.rollouts.insert(*_rollout("ro-2", now + 1), "planned")
        assert [x.id for x in s.rollouts.list("f")] == ["ro-2", "ro-1"]
        assert [x.id for x in s.rollouts.list(states=("paused",))] == ["ro-1"]
        # the JSON the API serves: every column, JSON columns decoded
        out = json.loads(json.dumps(s.rollouts.get("ro-1").to_json()))
        assert out["stages"] == [50.0, 100.0] and out["budgets"] == {"p95_ms": 20.0}
        assert out["allow_downgrade"] is True and out["stage"] == 0


def test_event_telemetry_desired_meta_repositories(db_url):
    now = time.time()
    with open_store(db_url) as s:
        b = Batch()
        for i, kind in enumerate(("download_started", "installed", "error", "error")):
            b.events.append(("f", "d1", now, {"kind": kind, "deployment_id": "dep-1",
                                              "bundle_id": BID, "ts": now + i,
                                              "detail": "giving up" if i == 3 else "x"}))
        b.events.append(("f", "d2", now, {"kind": "rejected", "deployment_id": "dep-2",
                                          "ts": now}))
        for i in range(4):
            b.telemetry.append(("f", "d1", now, {"ts": now + i, "bundle_id": BID,
                                                 "latency_ms": {"p95": 30.0 if i else 5.0},
                                                 "peak_rss_mb": 10.0, "inferences": 9}))
        b.desired.append(("f", "group", "g", now, {"deployment_id": "dep-1", "bundle_id": BID,
                                                   "name": "kws", "version": "1", "ts": now}))
        b.states.append(("f", "d1", now, {"online": True, "target": "rpi4", "groups": ["g"]}))
        s.write_batch(b)

        tallies = {(t.device_id, t.kind): t for t in s.events.tallies("f", ["dep-1", "dep-2"])}
        assert tallies[("d1", "error")].n == 2 and tallies[("d1", "error")].giving_up == 1
        assert tallies[("d2", "rejected")].deployment_id == "dep-2"
        assert [d.deployment_id for d in s.events.deployments("f")] in (["dep-1", "dep-2"],
                                                                        ["dep-2", "dep-1"])
        assert s.events.counts()[("f", "error")] == 2
        assert [e.kind for e in s.events.list("f", kinds=["rejected"])] == ["rejected"]
        newest = s.events.list("f", device_id="d1", limit=1)[0]
        assert newest.detail == "giving up"  # newest first
        assert [e.device_id for e in s.events.list("f", after_id=newest.id)] == ["d2"]

        over = s.telemetry.over_budget("f", BID, ["d1"], since=0, p95_ms=20.0,
                                       peak_rss_mb=100.0)
        assert [(t.device_id, t.n, t.bad, t.p95) for t in over] == [("d1", 4, 3, 30.0)]
        series = s.telemetry.series("f", "d1", since=now + 1)
        assert [t.ts for t in series] == [now + 1, now + 2, now + 3]

        assert s.desired.group("f", "g").bundle_id == BID and s.desired.group("f", "x") is None
        d = s.devices.get("f", "d1")
        assert isinstance(d, DeviceRecord) and d.groups == ("g",)
        assert d.telemetry["p95"] == 30.0 and s.devices.list("f", ids=["nope"]) == []
        assert json.loads(json.dumps(d.to_json()))["groups"] == ["g"]

        s.meta.beat("c1", {"connected": True})
        assert [x["connected"] for x in s.meta.alive()] == [True]
        assert s.meta.alive(within_s=-1) == []
        assert s.fleets() == ["f"]
