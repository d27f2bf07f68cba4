"""The fleet's Python front door (``edgepack.host.fleet.api``): publish, deploy and fleet_status
against a real Mosquitto and simulated devices; rollouts and device queries over SQLite."""

from __future__ import annotations

import json
import time

import pytest

from edgepack.agent.errors import EdgepackError
from edgepack.agent.mqtt import parse_broker_url
from edgepack.host.fleet import api
from edgepack.host.fleet.storage import Batch, open_store

pytestmark = pytest.mark.broker


def test_publish_deploy_and_fleet_status(mosquitto, fleet, simulate, sim_bundle, fleet_keys):
    key, pub = fleet_keys
    sim = simulate(fleet, 3, trusted_keys=(str(pub),))
    bundle = sim_bundle("1.0.0")

    published = api.publish(bundle, broker=mosquitto.url, key=key, fleet=fleet)
    assert published.signed and not published.skipped and published.chunks >= 1
    again = api.publish(bundle, broker=parse_broker_url(mosquitto.url), key=key, fleet=fleet)
    assert again.skipped and again.bundle_id == published.bundle_id  # BrokerConfig works too

    device = sim.devices[0].id
    dep = api.deploy(published.bundle_id[:12], device=device, broker=mosquitto.url,
                     fleet=fleet, wait=20)
    assert dep.bundle_id == published.bundle_id and not dep.published
    assert dep.active is True and dep.waited_s is not None and dep.device == device
    assert json.loads(json.dumps(dep.to_json()))["deployment_id"] == dep.deployment_id

    rows = {r.device: r for r in api.fleet_status(broker=mosquitto.url, fleet=fleet,
                                                  settle=0.3)}
    assert set(rows) == {d.id for d in sim.devices}
    assert rows[device].in_sync is True and rows[device].bundle_version == "1.0.0"
    assert rows[device].desired["deployment_id"] == dep.deployment_id
    assert all(r.status == "online" for r in rows.values())

    with pytest.raises(EdgepackError) as e:
        api.deploy(bundle, group="sim", broker=mosquitto.url, fleet=fleet, wait=5)
    assert e.value.context["field"] == "wait" and "`device=`" in str(e.value)


def test_rollouts_and_device_queries_over_sqlite(sqlite_url, mosquitto, fleet, sim_bundle,
                                                 fleet_keys):
    now = time.time()
    with open_store(sqlite_url) as store:
        store.write_batch(Batch(states=[
            (fleet, f"pi-{i}", now, {"online": True, "target": "rpi4", "board": "rpi4",
                                     "groups": ["pis"], "ts": now}) for i in range(4)]))
    assert [d.device_id for d in api.devices(db=sqlite_url, fleet=fleet)] == \
        ["pi-0", "pi-1", "pi-2", "pi-3"]
    assert api.device("pi-2", db=sqlite_url, fleet=fleet).groups == ("pis",)
    assert api.device("nope", db=sqlite_url, fleet=fleet) is None

    started = api.rollout_start(sim_bundle("2.0.0"), group="pis", broker=mosquitto.url,
                                db=sqlite_url, fleet=fleet, stages="25,100", soak="1s",
                                key=fleet_keys[0])
    assert started.state == "running" and started.stage == 1
    assert [s.devices for s in started.stages] == [1, 3]
    assert {d.status for d in started.devices} == {"waiting"}
    status = api.rollout_status(started.id[:10], db=sqlite_url)
    assert status.id == started.id and status.rollout.bundle_version == "2.0.0"
    assert api.rollout_pause(started.id, db=sqlite_url).state == "paused"
    assert api.rollout_resume(started.id, db=sqlite_url).state == "running"
    assert api.rollout_abort(started.id, db=sqlite_url).state == "abort_requested"
    assert [r.id for r in api.rollouts(db=sqlite_url, fleet=fleet)] == [started.id]
    assert api.collectors_alive(db=sqlite_url) == 0
    out = json.loads(json.dumps(status.to_json()))
    assert out["stage"] == 1 and out["stage_count"] == 2 and len(out["devices"]) == 4

    with pytest.raises(EdgepackError) as e:
        api.rollout_start(sim_bundle("2.0.0"), group="pis", broker=mosquitto.url,
                          db=sqlite_url, fleet=fleet, stages="50,10")
    assert e.value.context["field"] == "stages" and "`stages=`" in str(e.value)
