"""What a rollout stage is compared on: the thresholds' spelling, the comparison's decisions
on telemetry stored in a real fleet database (SQLite and PostgreSQL), and the stored halt
reason. The end-to-end halt with real agents is in test_fleet_rollout_halts.py."""

from __future__ import annotations

import time

import pytest

from edgepack.host.fleet.rollout import RolloutChecks, RolloutError
from edgepack.host.fleet.rollout.actions import Tick
from edgepack.host.fleet.rollout.checks import parse_points, parse_share
from edgepack.host.fleet.rollout.comparison import compare_stage
from edgepack.host.fleet.storage import (
    Batch,
    RolloutDeviceRecord,
    RolloutRecord,
    open_store,
)

OLD, NEW = "ab" * 32, "cd" * 32


def test_thresholds_are_spelled_as_operators_write_them():
    assert parse_share("20%") == pytest.approx(0.2) and parse_share("0.5") == 0.5
    assert parse_points("1pt") == pytest.approx(0.01) and parse_points("2%") == pytest.approx(0.02)
    assert parse_points("0.05") == 0.05
    for bad, fn in (("fast", parse_share), ("-5%", parse_share), ("3", parse_points),
                    ("0pt", parse_points)):
        with pytest.raises(RolloutError) as e:
            fn(bad, "max_x")
        assert e.value.context.get("field") == "max_x" and "`max_x=`" in str(e.value)
    c = RolloutChecks.parse(max_latency_regression="50%", max_error_rate_rise="2pt",
                            baseline_group="canary-pool", rollback_on_halt=False)
    assert (c.max_latency_regression, c.max_error_rate_rise) == (0.5, pytest.approx(0.02))
    assert c.max_confidence_drop == 0.05 and c.max_drift_score == 1.0  # defaults kept
    assert RolloutChecks.from_json(c.to_json()) == c
    assert RolloutChecks.from_json(None) == RolloutChecks()


def _setup(store, now, *, stage_p95, prev_p95, base_p95, windows=6, errors=0,
           inferences=100):
    """Device s1 (stage 1) switched OLD → NEW 20 s ago; b1, b2 are waiting on OLD."""
    r = RolloutRecord(id="ro-c", fleet="f", group_name="g", bundle_id=NEW, bundle_name="m",
                      bundle_version="2", target="t", stages=(50.0, 100.0), max_failures="0",
                      soak_s=60.0, stage_timeout_s=60.0, created=now, soak_started=now - 19)
    devs = [RolloutDeviceRecord("ro-c", "s1", 0, "ro-c-s1", "installed",
                                previous={"bundle_id": OLD}, deployed_at=now - 20,
                                installed_at=now - 19)]
    devs += [RolloutDeviceRecord("ro-c", b, 1, "ro-c-s2", "waiting", previous={"bundle_id": OLD})
             for b in ("b1", "b2")]
    store.rollouts.insert(r, devs, "planned", RolloutChecks().to_json())
    batch = Batch()

    def tel(dev, ts, bundle, p95, errs=0):
        batch.telemetry.append(("f", dev, ts, {"ts": ts, "bundle_id": bundle, "inferences":
                                               inferences, "errors": errs,
                                               "latency_ms": {"p95": p95}}))

    for i in range(windows):
        tel("s1", now - 60 + i, OLD, prev_p95)          # before the switch
        tel("s1", now - 15 + i, NEW, stage_p95, errors)  # on the new bundle
        for b in ("b1", "b2"):
            tel(b, now - 15 + i, OLD, base_p95)
    store.write_batch(batch)
    return Tick(rollout=r, devices=devs, now=now)


@pytest.mark.parametrize("case", ["slower", "fleet_wide", "too_few", "errors"])
def test_the_stage_is_judged_against_every_reference_with_enough_samples(db_url, case):
    now = time.time()
    with open_store(db_url) as store:
        kw = {"slower": dict(stage_p95=9.0, prev_p95=2.0, base_p95=2.1),
              # the baseline slowed down as much: the fleet changed, not the bundle
              "fleet_wide": dict(stage_p95=9.0, prev_p95=2.0, base_p95=8.5),
              # four windows on the new bundle, fewer than min_reports (5)
              "too_few": dict(stage_p95=9.0, prev_p95=2.0, base_p95=2.0, windows=4),
              "errors": dict(stage_p95=2.0, prev_p95=2.0, base_p95=2.0, windows=12,
                             errors=5)}[case]
        tick = _setup(store, now, **kw)
        got = compare_stage(store, tick, 0, RolloutChecks())
        by = {c.metric: c for c in got.checks}
        lat, err = by["p95_latency"], by["error_rate"]
        assert by["drift_score"].verdict == "insufficient"  # no drift windows at all
        assert by["confidence"].verdict == "insufficient"
        assert got.compared_with.startswith("the 2 device(s) of group g the rollout has not")
        if case in ("slower", "errors"):
            # beyond once decides nothing; the next comparison finding it again halts
            assert got.halt is None and got.unconfirmed
            assert got.confirmed(None).halt is None
            assert got.confirmed({"stage": 2, "checks": got.to_json()["checks"]}).halt is None
            confirmed = got.confirmed(got.to_json())
            assert confirmed.halt is not None and not confirmed.unconfirmed
        if case == "slower":
            assert lat.verdict == "beyond" and confirmed.halt.metric == "p95_latency"
            assert lat.devices == ("s1",)
            assert (lat.value, lat.previous, lat.baseline) == (9.0, 2.0, 2.1)
            assert "beyond the +20% allowed" in lat.message
        elif case == "fleet_wide":
            assert lat.verdict == "ok" and got.halt is None
        elif case == "too_few":
            assert lat.verdict == "insufficient" and got.halt is None
        else:
            assert lat.verdict == "ok"
            # 1200 inferences a side; 5 % errors vs none: beyond +1pt
            assert err.verdict == "beyond" and err.value == pytest.approx(0.05), err
            assert confirmed.halt.metric == "error_rate"
            assert err.previous == 0.0 and err.baseline == 0.0
        if case != "errors":
            assert err.verdict == "insufficient"  # 600 inferences: fewer than 1000
        got = got.confirmed(got.to_json())
        store.rollouts.set_comparison("ro-c", got.to_json(),
                                      halt=got.halt.to_json() if got.halt else None)
        stored = store.rollouts.checks("ro-c")
        assert stored.checks == RolloutChecks().to_json()
        assert stored.comparison["checks"][0]["metric"] == "p95_latency"
        assert (stored.halt is not None) == (case in ("slower", "errors"))


@pytest.mark.broker
def test_without_rollback_on_halt_the_stage_keeps_the_new_bundle(
        sqlite_url, mosquitto, fleet, serve, simulate, sim_bundle, fleet_keys):
    """A halt on failed devices (over budget) with ``rollback_on_halt=False``: halted at once,
    the reason in the status and events, the canaries left on v2, nobody else gets it."""
    from fleet_helpers import wait_for

    from edgepack.host.fleet.api import rollout_start, rollout_status
    from edgepack.host.fleet.deploy import deploy

    key, _ = fleet_keys
    server = serve(sqlite_url, fleet)
    sim = simulate(fleet, 5, interval_s=0.2)
    deploy(sim_bundle("1.0.0"), broker=mosquitto.url, group="sim", fleet=fleet, key=key)
    wait_for(lambda: sim.stats()["active"].get("1.0.0") == 5, 30, what="v1 everywhere")
    for d in sim.devices:
        d.over_budget = True
    r = rollout_start(sim_bundle("2.0.0", p95_ms=20.0), group="sim", broker=mosquitto.url,
                      db=server.store, fleet=fleet, stages="20,100", max_failures="0",
                      soak="4s", key=key, rollback_on_halt=False)
    assert r.checks["rollback_on_halt"] is False
    final = wait_for(lambda: (s := rollout_status(r.id, db=server.store)).state
                     in ("halted", "completed") and s, 60, what="the rollout to end")
    assert final.state == "halted", final.log
    assert final.halt["metric"] == "failures" and final.halt["stage"] == 1, final.halt
    canary = [d for d in final.devices if d.stage == 0]
    assert final.halt["devices"] == [canary[0].device_id]
    assert any("no rollback asked" in x.message for x in final.log), final.log
    assert sim.by_id[canary[0].device_id].active["version"] == "2.0.0"
    assert all(sim.by_id[d.device_id].active["version"] == "1.0.0"
               for d in final.devices if d.stage == 1)
    events = server.store.events.list(fleet, device_id=canary[0].device_id)
    assert any(e.kind == "rollout_halted" and "failed device" in (e.detail or "")
               for e in events)
