"""Device identity end to end, on a real Mosquitto, a real ``edgepack-agent`` and the real
collector: only reports signed by an enrolled device's own key count.

Attacks (an attacker who can publish on the broker but holds no enrolled device key):

* a retained state of a device that does not exist, claiming the rollout's group;
* forged ``rejected`` events for a real device, unsigned, signed by a key of its own, signed
  by another enrolled device's key, and published on that other device's topic;
* reports of a revoked device.

Each fails: the ghost joins no group, the rollout completes on the real device, the forged
events are counted (not stored), and genuine signed reports land.
"""

from __future__ import annotations

import json
import stat
import sys
import time
import uuid
from pathlib import Path

import pytest

from edgepack.agent.identity import IDENTITY_FILE, DeviceIdentity
from edgepack.agent.protocol import Topics
from edgepack.host.fleet.api import rollout_start, rollout_status
from edgepack.host.fleet.client import SyncClient
from edgepack.host.fleet.identity import enroll, revoke

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "agent"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
from agent_helpers import AgentProcess, agent_config, build_bundle  # noqa: E402
from fleet_helpers import wait_for  # noqa: E402

pytestmark = pytest.mark.broker


@pytest.fixture
def server(tmp_path, mosquitto, fleet):
    from edgepack.host.fleet.collector import CollectorOptions
    from edgepack.host.fleet.server import FleetServer, ServeConfig

    s = FleetServer(ServeConfig(
        broker=mosquitto.url, db=f"sqlite:///{tmp_path / 'fleet.db'}", http=("127.0.0.1", 0),
        collector=CollectorOptions(fleets=(fleet,), client_id=f"c-{uuid.uuid4().hex[:8]}",
                                   fetch_reports=False), rollout_tick_s=0.2)).start()
    assert s.collector.wait_connected(10)
    yield s
    s.stop()


def _publish(url: str, topic: str, body: dict | bytes, *, retain: bool = False) -> None:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    with SyncClient(url, client_id=f"attacker-{uuid.uuid4().hex[:8]}") as c:
        c.publish(topic, payload, qos=1, retain=retain)


def test_forged_reports_count_for_nothing(tmp_path, mosquitto, fleet, server):
    from edgepack.host.keys import generate_keys, load_private_key

    key, pub, _ = generate_keys(tmp_path / "keys", "fleet")
    bundle = build_bundle(tmp_path / "v1.edgepack", key=load_private_key(key), seed=1)
    store, topics = server.store, Topics(fleet)
    cfg = agent_config(tmp_path / "dev", mosquitto.url, fleet, device_id="gw-1", pub=pub,
                       groups=["gateways"])
    device = DeviceIdentity.load_or_create(cfg.parent / "data")
    assert stat.S_IMODE((cfg.parent / "data" / IDENTITY_FILE).stat().st_mode) == 0o600
    enroll(store, device.enrollment("gw-1"), fleet=fleet, groups=["gateways"])
    other = DeviceIdentity.create(tmp_path / "pi-2")  # another enrolled device's key
    enroll(store, other.enrollment("pi-2"), fleet=fleet, groups=["kitchen"])
    attacker = DeviceIdentity.create(tmp_path / "attacker")

    # attack 1: devices that do not exist, claiming the rollout's group (retained states)
    ghost = {"online": True, "device_id": "ghost-1", "target": "x86-64-avx2",
             "groups": ["gateways"], "ts": time.time()}
    _publish(mosquitto.url, topics.state("ghost-1"), ghost, retain=True)
    _publish(mosquitto.url, topics.state("ghost-2"),
             attacker.encode({**ghost, "device_id": "ghost-2"}), retain=True)
    agent = AgentProcess(cfg).start()
    try:
        wait_for(lambda: (d := store.devices.get(fleet, "gw-1")) and d.online
                 and d.authenticated, 30, what="gw-1's signed birth message")
        for g in ("ghost-1", "ghost-2"):
            d = wait_for(lambda g=g: store.devices.get(fleet, g), 10, what=g)
            assert d.groups == () and d.claimed_groups == ("gateways",)
            assert not d.authenticated and d.unauthenticated >= 1
        gw = store.devices.get(fleet, "gw-1")
        assert gw.key_id == device.key_id and gw.groups == ("gateways",)

        r = rollout_start(bundle, group="gateways", broker=mosquitto.url, db=store,
                          fleet=fleet, stages="100", max_failures="0", soak="3s", key=key)
        assert [d.device_id for d in rollout_status(r.id, db=store).devices] == ["gw-1"]
        dep = wait_for(lambda: rollout_status(r.id, db=store).devices[0].deployment_id, 20,
                       what="gw-1's deployment")

        # attack 2: one forged `rejected` event would halt the rollout and roll gw-1 back
        forged = {"kind": "rejected", "device_id": "gw-1", "deployment_id": dep,
                  "bundle_id": r.rollout.bundle_id, "detail": "signature: forged",
                  "ts": time.time(), "seq": 10**9}
        refused_before = store.devices.get(fleet, "gw-1").unauthenticated
        _publish(mosquitto.url, topics.events("gw-1"), forged)  # unsigned
        _publish(mosquitto.url, topics.events("gw-1"), attacker.encode(forged))  # own key
        _publish(mosquitto.url, topics.events("gw-1"), other.encode(forged))  # pi-2's key
        _publish(mosquitto.url, topics.events("pi-2"), other.encode(forged))  # pi-2's topic
        wait_for(lambda: store.devices.get(fleet, "gw-1").unauthenticated
                 >= refused_before + 3, 10, what="the forged events counted")

        final = wait_for(lambda: (s := rollout_status(r.id, db=store)).state
                         in ("completed", "halted") and s, 120, what="the rollout")
        assert final.state == "completed", final.log
        kinds = [e.kind for e in store.events.list(fleet, device_id="gw-1")]
        assert "installed" in kinds and "rejected" not in kinds  # genuine reports landed
        assert store.devices.get(fleet, "gw-1").bundle_id == r.rollout.bundle_id
        refused = server.collector.stats()["unauthenticated"]
        for reason in ("unsigned", "not_enrolled", "unknown_key", "wrong_device"):
            assert refused.get(reason, 0) >= 1, refused
        assert server.collector.stats()["dropped"]["unauthenticated"] >= 6

        # revocation: gw-1 leaves its group and its (still signed) reports count for nothing
        revoke(store, "gw-1", fleet=fleet)
        gw = store.devices.get(fleet, "gw-1")
        assert gw.groups == () and not gw.authenticated
        n = store.telemetry.count(fleet)
        wait_for(lambda: store.devices.get(fleet, "gw-1").unauthenticated
                 >= gw.unauthenticated + 2, 15, what="telemetry after revocation refused")
        server.collector.wait_idle(5)
        assert store.telemetry.count(fleet) == n
        assert store.devices.get(fleet, "gw-1").auth_error == "not_enrolled"
    finally:
        agent.stop()
        for g in ("ghost-1", "ghost-2"):
            _publish(mosquitto.url, topics.state(g), b"", retain=True)
