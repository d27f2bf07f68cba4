"""``fleet status``: one row per device from the retained state, desired and group messages."""

from __future__ import annotations

import json
import time

from click.testing import CliRunner

from edgepack.agent.protocol import DesiredState, Topics, encode
from edgepack.host.cli import main
from edgepack.host.fleet.client import SyncClient
from edgepack.host.fleet.status import fleet_status

A, B = "a" * 64, "b" * 64


def _seed(url: str, fleet: str) -> None:
    t = Topics(fleet)
    now = time.time()
    with SyncClient(url) as c:
        c.publish(t.state("pi-kitchen"), encode({
            "online": True, "board": "rpi4", "target": "rpi4", "agent_version": "0.1.0",
            "runtimes": ["onnxruntime"], "phase": "idle", "ts": now - 5,
            "active": {"bundle_id": A, "name": "kws", "version": "1.0.0", "slot": "A",
                       "deployment_id": "dep-1"}}), retain=True)
        c.publish(t.state("jetson-1"), encode({
            "online": True, "board": "jetson-orin-nano", "target": "jetson-orin-nano",
            "slot": "b", "groups": ["jetsons"], "ts": now - 90,
            "active": {"bundle_id": B, "name": "det", "version": "2.1.0"}}), retain=True)
        c.publish(t.state("pi-garage"), encode({"online": False, "ts": now - 7200}), retain=True)
        c.publish(t.desired("pi-kitchen"), encode(DesiredState(
            "dep-1", A, "kws", "1.0.0").to_payload()), retain=True)
        c.publish(t.group_desired("jetsons"), encode(DesiredState(
            "dep-2", A, "det", "2.2.0").to_payload()), retain=True)
        c.publish(t.desired("pi-new"), encode(DesiredState(
            "dep-3", A, "kws", "1.0.0").to_payload()), retain=True)
        # noise that must not show up: another fleet, and telemetry
        c.publish(Topics(fleet + "x").state("other"), encode({"online": True}), retain=True)
        c.publish(t.telemetry("pi-kitchen"), encode({"inferences": 3}))


def test_rows(mosquitto, fleet: str) -> None:
    _seed(mosquitto.url, fleet)

    rows = {r.device: r.to_json() for r in fleet_status(broker=mosquitto.url, fleet=fleet,
                                                          settle=0.3)}

    assert sorted(rows) == ["jetson-1", "pi-garage", "pi-kitchen", "pi-new"]
    k = rows["pi-kitchen"]
    assert (k["status"], k["online"], k["board"], k["target"], k["slot"]) == \
        ("online", True, "rpi4", "rpi4", "A")
    assert (k["bundle_id"], k["bundle_name"], k["bundle_version"]) == (A, "kws", "1.0.0")
    assert k["in_sync"] is True and k["desired"]["deployment_id"] == "dep-1"
    assert 4 < k["age_s"] < 60 and k["agent_version"] == "0.1.0" and k["phase"] == "idle"
    j = rows["jetson-1"]
    assert j["in_sync"] is False and j["desired"]["version"] == "2.2.0"  # via its group
    g = rows["pi-garage"]
    assert (g["status"], g["online"], g["bundle_id"], g["in_sync"]) == \
        ("offline", False, None, None)
    assert rows["pi-new"]["status"] == "never seen" and rows["pi-new"]["in_sync"] is False


def test_cli_json_and_table(mosquitto, fleet: str) -> None:
    _seed(mosquitto.url, fleet)
    runner = CliRunner()

    r = runner.invoke(main, ["fleet", "status", "--broker", mosquitto.url, "--fleet", fleet,
                             "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [x["device"] for x in rows] == ["jetson-1", "pi-garage", "pi-kitchen", "pi-new"]
    assert [x["online"] for x in rows] == [True, False, True, None]

    r = runner.invoke(main, ["fleet", "status", "--broker", mosquitto.url, "--fleet", fleet],
                      env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    lines = {ln.split()[0]: ln for ln in r.stdout.splitlines() if ln.strip()}
    assert "offline" in lines["pi-garage"]
    assert "kws 1.0.0" in lines["pi-kitchen"] and "in sync" in lines["pi-kitchen"]
    assert "→ det 2.2.0" in lines["jetson-1"] and "2m ago" in lines["jetson-1"]
    assert "4 devices, 2 online" in r.stdout


def test_empty_fleet_and_unreachable_broker(mosquitto, fleet: str) -> None:
    r = CliRunner().invoke(main, ["fleet", "status", "--broker", mosquitto.url, "--fleet", fleet])
    assert r.exit_code == 0 and "no device has reported" in r.output

    from brokers import free_port

    r = CliRunner().invoke(main, ["fleet", "status", "--broker",
                                  f"mqtt://127.0.0.1:{free_port()}"])
    assert r.exit_code == 1 and "error: cannot reach the broker" in r.output
