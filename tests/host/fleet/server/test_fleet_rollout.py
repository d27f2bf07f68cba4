"""Staged rollouts against a real Mosquitto, simulated devices and both databases."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from fleet_helpers import get_json, wait_for

from edgepack.agent.protocol import Topics, parse_desired
from edgepack.host.fleet.api import rollout_start, rollout_status
from edgepack.host.fleet.client import SyncClient
from edgepack.host.fleet.deploy import deploy
from edgepack.host.fleet.rollout import (
    RolloutError,
    allowed_failures,
    parse_duration,
    parse_max_failures,
    parse_stages,
    stage_sizes,
)

pytestmark = pytest.mark.broker


# ------------------------------------------------------------------------------ pure logic

def test_plan_arithmetic():
    assert parse_stages("1,10,50,100") == [1, 10, 50, 100]
    assert parse_stages("5%, 100%") == [5, 100]
    for bad in ("", "10,5", "0,100", "50,150", "a,b"):
        with pytest.raises(RolloutError):
            parse_stages(bad)
    assert stage_sizes([1, 10, 50, 100], 200) == [2, 20, 100, 200]
    assert stage_sizes([1, 10, 50, 100], 20) == [1, 2, 10, 20]  # every stage adds a device
    assert stage_sizes([1, 10, 50, 100], 2) == [1, 2, 2, 2]
    assert stage_sizes([10, 50], 20) == [2, 10]  # a canary-only rollout stops at 50 %
    assert parse_max_failures("5%") == "5%" and parse_max_failures("3") == "3"
    with pytest.raises(RolloutError):
        parse_max_failures("lots")
    assert allowed_failures("5%", 20) == 1 and allowed_failures("5%", 19) == 0
    assert allowed_failures("3", 1) == 3
    assert parse_duration("10m") == 600 and parse_duration("1.5h") == 5400
    assert parse_duration("250ms") == 0.25 and parse_duration("42") == 42
    with pytest.raises(RolloutError):
        parse_duration("soon")


# ------------------------------------------------------------------------------ helpers

def _install_v1(mosquitto, fleet, sim, server, bundle, key):
    """Put every simulated device on v1 with a plain group deploy; returns the bundle id."""
    res = deploy(bundle, broker=mosquitto.url, group="sim", fleet=fleet, key=key)
    wait_for(lambda: sim.stats()["active"].get("1.0.0") == sim.opts.devices, 30,
             what="every device on v1")
    wait_for(lambda: all(d.bundle_version == "1.0.0"
                         for d in server.store.devices.list(fleet))
             and len(server.store.devices.list(fleet)) == sim.opts.devices, 15,
             what="the collector seeing v1 everywhere")
    return res.bundle_id


def _retained_desired(url, fleet):
    t = Topics(fleet)
    with SyncClient(url) as c:
        found = c.retained(t.all_devices("desired"), settle=0.3)
        groups = c.retained(t.prefix + "groups/+/desired", settle=0.3)
    # v1 or v2 (signed) desired states; a signed clear counts as cleared
    def read(msgs):
        return {k.split("/")[-2]: ds.to_payload() for k, v in msgs.items()
                if (ds := parse_desired(v)) is not None}

    return read(found), read(groups)


# ------------------------------------------------------------------------------ end to end

def test_rollout_halts_and_rolls_back_the_stage(db_url, mosquitto, fleet, serve, simulate,
                                                sim_bundle, fleet_keys):
    """2 of stage 2's 8 devices fail health checks: stage 1 passes, stage 2 (50 %) goes past
    5 % failures; its devices go back to v1, stage 3 never starts."""
    key, _ = fleet_keys
    server = serve(db_url, fleet)
    sim = simulate(fleet, 20, fail_rate=0.0)
    v1 = sim_bundle("1.0.0")
    _install_v1(mosquitto, fleet, sim, server, v1, key)
    r = rollout_start(sim_bundle("2.0.0"), group="sim", broker=mosquitto.url,
                      db=server.store, fleet=fleet, stages="10,50,100", max_failures="5%",
                      soak="1s", stage_timeout="60s", key=key)
    rid = r.id
    assert [s.devices for s in r.stages] == [2, 8, 10]
    # Stage membership is planned by the rollout (hashed with its id): pick the failing devices
    # from stage 2, which deploys only after stage 1 has soaked, so setting them now is in time.
    failing = {d.device_id for d in r.devices if d.stage == 1}
    failing = set(sorted(failing)[:2])
    for d in sim.devices:
        d.fails_health = d.id in failing
    final = wait_for(lambda: (s := rollout_status(rid, db=server.store)).state
                     in ("halted", "completed") and s, 60, what="the rollout to end")
    assert final.state == "halted", final.log
    devs = {d.device_id: d for d in final.devices}
    halted_stage = final.stage - 1
    assert "halted at stage" in final.rollout.detail
    in_stage = [d for d in devs.values() if d.stage == halted_stage]
    assert any(d.status == "failed" for d in in_stage)
    # every device of the halted stage runs v1 again (failed ones never left it)
    for d in in_stage:
        assert d.status in ("rolled_back", "failed"), d
        assert sim.by_id[d.device_id].active["version"] == "1.0.0", d
    assert any(d.status == "rolled_back" for d in in_stage) or \
        all(d.status == "failed" for d in in_stage)
    # later stages were never deployed
    later = [d for d in devs.values() if d.stage > halted_stage]
    assert later and all(d.status == "waiting" for d in later)
    assert all(sim.by_id[d.device_id].active["version"] == "1.0.0" for d in later)
    # the group still names v1: rolled-back devices follow it again, nobody got v2 by group
    _, groups = _retained_desired(mosquitto.url, fleet)
    assert groups["sim"]["version"] == "1.0.0"
    counts = final.stages[halted_stage].counts
    assert counts["failed"] >= 1 and counts["failed"] + counts["rolled_back"] == len(in_stage)


def test_rollout_completes_and_hands_over_to_the_group(sqlite_url, mosquitto, fleet, serve,
                                                       simulate, sim_bundle, fleet_keys):
    key, _ = fleet_keys
    server = serve(sqlite_url, fleet)
    sim = simulate(fleet, 12)
    _install_v1(mosquitto, fleet, sim, server, sim_bundle("1.0.0"), key)
    r = rollout_start(sim_bundle("2.0.0"), group="sim", broker=mosquitto.url,
                      db=server.store, fleet=fleet, stages="10,100", max_failures="0",
                      soak="0.5s", key=key)
    final = wait_for(lambda: (s := rollout_status(r.id, db=server.store)).state
                     in ("halted", "completed") and s, 60, what="the rollout to end")
    assert final.state == "completed", final.log
    assert sim.stats()["active"] == {"2.0.0": 12}
    own, groups = _retained_desired(mosquitto.url, fleet)
    assert groups["sim"]["version"] == "2.0.0" and groups["sim"]["deployment_id"].startswith(
        r.id)
    assert not own  # device-level desired states cleared: they follow the group again
    assert [s.counts["installed"] for s in final.stages] == [2, 10]
    assert any("soaking" in line.message for line in final.log)


def test_soak_catches_devices_over_budget(sqlite_url, mosquitto, fleet, serve, simulate,
                                          sim_bundle, fleet_keys):
    """The canary installs fine but its telemetry exceeds the bundle's p95 budget: halted."""
    key, _ = fleet_keys
    server = serve(sqlite_url, fleet)
    sim = simulate(fleet, 10, interval_s=0.2)
    _install_v1(mosquitto, fleet, sim, server, sim_bundle("1.0.0"), key)
    for d in sim.devices:
        d.over_budget = True
    r = rollout_start(sim_bundle("2.0.0", p95_ms=20.0), group="sim", broker=mosquitto.url,
                      db=server.store, fleet=fleet, stages="20,100", max_failures="0",
                      soak="4s", key=key)
    final = wait_for(lambda: (s := rollout_status(r.id, db=server.store)).state
                     in ("halted", "completed") and s, 60, what="the rollout to end")
    assert final.state == "halted", final.log
    canaries = [d for d in final.devices if d.stage == 0]
    assert canaries and any("over budget" in (d.detail or "") for d in canaries)
    assert all(sim.by_id[d.device_id].active["version"] == "1.0.0" for d in canaries)


def test_pause_resume_abort_and_restart(sqlite_url, mosquitto, fleet, serve, simulate,
                                        sim_bundle, fleet_keys):
    """Control from the CLI and the API; the rollout survives a restart of `fleet serve`."""
    from edgepack.host.cli import main
    from edgepack.host.cli import serve as cli_fleet_serve

    cli_fleet_serve.register(main)
    key, _ = fleet_keys
    server = serve(sqlite_url, fleet)
    sim = simulate(fleet, 10)
    _install_v1(mosquitto, fleet, sim, server, sim_bundle("1.0.0"), key)
    runner = CliRunner()
    res = runner.invoke(main, ["deploy", str(sim_bundle("2.0.0")), "--group", "sim",
                               "--stages", "10,50,100", "--max-failures", "1", "--soak", "30s",
                               "--broker", mosquitto.url, "--fleet", fleet, "--key", str(key),
                               "--db", sqlite_url, "--json"])
    assert res.exit_code == 0, res.output
    rid = json.loads(res.output)["id"]
    assert json.loads(res.output)["collector_running"] is True
    wait_for(lambda: rollout_status(rid, db=server.store).stages[0].counts["installed"]
             == 1, 30, what="the canary installed")
    res = runner.invoke(main, ["rollout", "pause", rid, "--db", sqlite_url])
    assert res.exit_code == 0 and "paused" in res.output, res.output
    res = runner.invoke(main, ["rollout", "pause", rid, "--db", sqlite_url])
    assert res.exit_code == 1 and "only a running rollout pauses" in res.output

    # the host restarts: a new fleet server on the same database picks the rollout up
    server.stop()
    server = serve(sqlite_url, fleet)
    res = runner.invoke(main, ["rollout", "resume", rid[:12], "--db", sqlite_url, "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["state"] == "running"
    # the API answers too; abort rolls back every deployed device
    status = get_json(f"{server.url}api/rollouts/{rid}")
    assert status["state"] == "running" and status["stage"] == 1
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"{server.url}api/rollouts/{rid}/abort", data=b"{}",
                                 method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:  # no JSON content type: refused
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 415
    req = urllib.request.Request(f"{server.url}api/rollouts/{rid}/abort", data=b"{}",
                                 method="POST", headers={"Content-Type": "application/json",
                                                         "Authorization": f"Bearer {server.token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert json.loads(resp.read())["state"] == "abort_requested"
    final = wait_for(lambda: (s := rollout_status(rid, db=server.store)).state == "aborted"
                     and s, 30, what="the abort to finish")
    assert sim.stats()["active"] == {"1.0.0": 10}
    assert final.stages[0].counts["rolled_back"] == 1
    res = runner.invoke(main, ["rollout", "status", rid, "--db", sqlite_url])
    assert res.exit_code == 0 and "aborted" in res.output and "stage" in res.output
    res = runner.invoke(main, ["rollout", "list", "--db", sqlite_url, "--json"])
    assert rid in [r["id"] for r in json.loads(res.output)]


def test_rollout_needs_known_group_members(sqlite_url, mosquitto, fleet, sim_bundle,
                                           fleet_keys):
    with pytest.raises(RolloutError, match="no device"):
        rollout_start(sim_bundle("1.0.0"), group="nobody", broker=mosquitto.url,
                      db=sqlite_url, fleet=fleet, key=fleet_keys[0])
