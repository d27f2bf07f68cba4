"""The dashboard's control-plane column in a real headless Chromium: an enrolled real agent
reports ``fresh`` while the fleet server's freshness beacon runs, and ``stale`` once it stops
(a withheld or frozen control plane), live, without a reload."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from fleet_helpers import get_json, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "agent"))

from agent_helpers import AgentProcess, agent_config  # noqa: E402

from edgepack.agent.identity import DeviceIdentity  # noqa: E402
from edgepack.host.fleet.identity import enroll  # noqa: E402

pytestmark = pytest.mark.broker


def test_freshness_column_goes_stale_when_the_beacon_stops(tmp_path, page, sqlite_url,
                                                           mosquitto, fleet, serve, fleet_keys):
    from edgepack.host.fleet.keyring import load_signer
    from edgepack.host.fleet.trust import FreshnessBeacon

    key, pub = fleet_keys
    server = serve(sqlite_url, fleet)
    cfg = agent_config(tmp_path / "dev", mosquitto.url, fleet, device_id="gw-f", pub=pub,
                       groups=["gateways"], freshness_bound_s=3.0)
    identity = DeviceIdentity.load_or_create(cfg.parent / "data")
    enroll(server.store, identity.enrollment("gw-f"), fleet=fleet, groups=["gateways"])
    agent = AgentProcess(cfg).start()
    beacon = FreshnessBeacon(mosquitto.url, fleet, load_signer(key), interval_s=0.5)
    try:
        beacon.start()
        api = f"{server.url}api/devices?fleet={fleet}"

        def row() -> dict:
            rows = get_json(api, missing={"devices": []})
            rows = rows["devices"] if isinstance(rows, dict) else rows
            return next((r for r in rows if r["device"] == "gw-f"), {})

        try:
            wait_for(lambda: row().get("freshness") == "fresh", 30, what="fresh on the API")
        except AssertionError:
            raise AssertionError(str(row()) + agent.log_text()[-2000:]) from None
        print("ROW", row())
        page.goto(f"{server.url}?fleet={fleet}")
        cell = page.locator("tr[data-device='gw-f'] td.freshness")
        cell.wait_for(timeout=15_000)
        assert "control plane" in page.locator("#devices-table thead").inner_text()
        wait_for(lambda: cell.get_attribute("data-freshness") == "fresh", 15, what="fresh cell")
        loaded = page.locator("#app").get_attribute("data-loaded")

        beacon.close()  # the fleet server stops vouching: the device notices within its bound
        wait_for(lambda: cell.get_attribute("data-freshness") == "stale", 30,
                 what="stale cell, live")
        assert page.locator("#app").get_attribute("data-loaded") != loaded  # polled
        r = row()
        assert r["freshness"] == "stale" and r["freshness_age_s"] > 3.0
        assert "s old" in cell.get_attribute("title")
    finally:
        beacon.close()
        assert agent.stop() == 0
