"""The fleet server with the real ``edgepack-agent`` process (not the simulator): a staged
rollout to it, its real telemetry on the dashboard API and /metrics."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from fleet_helpers import get_json, wait_for

from edgepack.agent.identity import DeviceIdentity
from edgepack.host.fleet.api import rollout_start, rollout_status
from edgepack.host.fleet.deploy import deploy
from edgepack.host.fleet.identity import enroll

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "agent"))
from agent_helpers import TARGET, AgentProcess, agent_config, build_bundle  # noqa: E402

pytestmark = pytest.mark.broker


def test_real_agent_on_the_dashboard(tmp_path, sqlite_url, mosquitto, fleet, serve,
                                     fleet_keys):
    from edgepack.agent.inference import Client
    from edgepack.host.keys import load_private_key

    key, pub = fleet_keys
    private = load_private_key(key)
    v1 = build_bundle(tmp_path / "v1.edgepack", version="1.0.0", key=private, seed=1)
    v2 = build_bundle(tmp_path / "v2.edgepack", version="2.0.0", key=private, seed=2)
    server = serve(sqlite_url, fleet)
    cfg = agent_config(tmp_path / "dev", mosquitto.url, fleet, device_id="gw-1", pub=pub,
                       groups=["gateways"])
    identity = DeviceIdentity.load_or_create(cfg.parent / "data")  # what `agent init` makes
    enroll(server.store, identity.enrollment("gw-1"), fleet=fleet, groups=["gateways"])
    agent = AgentProcess(cfg).start()
    try:
        api = f"{server.url}api/"
        wait_for(lambda: (d := server.store.devices.get(fleet, "gw-1")) and d.online, 30,
                 what="the agent's birth message")
        res = deploy(v1, broker=mosquitto.url, group="gateways", fleet=fleet, key=key)
        wait_for(lambda: get_json(f"{api}deployments/{res.deployment_id}?fleet={fleet}",
                                  missing={"counts": {}})["counts"].get("installed") == 1, 60,
                 what="v1 installed")
        r = rollout_start(v2, group="gateways", broker=mosquitto.url, db=server.store,
                          fleet=fleet, stages="100", max_failures="0", soak="2s", key=key)
        final = wait_for(lambda: (s := rollout_status(r.id, db=server.store)).state
                         in ("completed", "halted") and s, 90, what="the rollout")
        assert final.state == "completed", final.log
        # real inferences show up as real latency in telemetry
        client = Client(f"unix:{cfg.parent / 'data' / 'agent.sock'}")
        x = np.zeros((1, 64), np.float32)
        for _ in range(20):
            client.predict({"x": x})
        dev = wait_for(lambda: (d := get_json(f"{api}devices/gw-1?fleet={fleet}"))
                       ["telemetry"] and (d["telemetry"].get("inferences") or 0) > 0 and d,
                       20, what="telemetry with inferences")
        assert dev["bundle_version"] == "2.0.0" and dev["target"] == TARGET
        assert dev["groups"] == ["gateways"] and dev["health"] == "healthy"
        assert dev["telemetry"]["p95"] > 0 and dev["telemetry"]["rss_mb"] > 10
        kinds = [e["kind"] for e in dev["events"]]
        for k in ("download_started", "downloaded", "verified", "staged", "health_checking",
                  "installed"):
            assert k in kinds
        with __import__("urllib.request").request.urlopen(server.url + "metrics") as m:
            text = m.read().decode()
        assert any(line.startswith("edgepack_device_latency_seconds{") and 'device="gw-1"' in line
                   for line in text.splitlines())
        assert agent.stop() == 0
        wait_for(lambda: server.store.devices.get(fleet, "gw-1").online is False, 15,
                 what="the clean shutdown")
    finally:
        if agent.alive:
            agent.kill9()
