"""Protocol v2 freshness: the fleet server's beacon re-signs freshness with the online key; the
agent reports ``freshness`` events when the status changes: fresh while it comes, ``behind``
for a desired state it never received, ``stale`` once it stops (a frozen control plane)."""

from __future__ import annotations

import pytest
from agent_helpers import AgentProcess, Watcher, agent_config

from edgepack.agent.protocol import Topics
from edgepack.host.fleet.client import SyncClient

pytestmark = pytest.mark.broker


def test_freshness_fresh_behind_then_stale(tmp_path, mosquitto, fleet, keys):
    from edgepack.host.fleet.keyring import load_signer
    from edgepack.host.fleet.trust import FreshnessBeacon

    cfg = agent_config(tmp_path / "d", mosquitto.url, fleet, pub=keys.pub,
                       freshness_bound_s=3.0)
    agent = AgentProcess(cfg).start()
    beacon = FreshnessBeacon(mosquitto.url, fleet, load_signer(keys.key), interval_s=0.5)
    try:
        with Watcher(mosquitto.url, fleet) as w:
            w.wait_state(lambda s: s.get("online"), timeout=20)
            beacon.start()
            fresh = w.wait(lambda: next((e for e in w.events if e["kind"] == "freshness"
                                         and e["status"] == "fresh"), None), 20, "fresh")
            assert fresh["key_ids"] and fresh["behind"] == []
            beacon.close()
            # the server vouches for a desired state of dev1 the device never received
            withheld = beacon.signer.freshness(versions={"desired/device/dev1": 4_000_000_000},
                                               version=4_000_000_000)
            with SyncClient(mosquitto.url) as c:
                c.publish(Topics(fleet).freshness, withheld, retain=True)
            behind = w.wait(lambda: next((e for e in w.events if e["kind"] == "freshness"
                                          and e["behind"]), None), 20, "behind")
            assert behind["behind"] == ["desired/device/dev1"]
            stale = w.wait(lambda: next((e for e in w.events if e["kind"] == "freshness"
                                         and e["status"] == "stale"), None), 20, "stale")
            assert stale["age_s"] > 3.0
    finally:
        beacon.close()
        assert agent.stop() == 0
