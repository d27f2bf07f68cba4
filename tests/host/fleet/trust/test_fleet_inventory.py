"""The fleet's inventory: ``agent init`` makes the device key and its enrollment, ``fleet
enroll`` / ``revoke`` / ``devices`` keep it; an older database gains the inventory when opened;
the agent's outbox signs what it serialises."""

from __future__ import annotations

import json
import os
import sqlite3
import stat

import pytest
from click.testing import CliRunner

from edgepack.agent.identity import IDENTITY_FILE, DeviceIdentity
from edgepack.agent.outbox import Outbox
from edgepack.agent.trust import ReportRefused
from edgepack.host.cli.main import main
from edgepack.host.fleet.identity import ReportVerifier, enroll
from edgepack.host.fleet.storage import SCHEMA_VERSION, open_store


def _run(args: list[str], code: int = 0) -> str:
    res = CliRunner().invoke(main, args)
    assert res.exit_code == code, res.output
    return res.output


def test_agent_init_enroll_devices_revoke(tmp_path, monkeypatch):
    from edgepack.host.keys import generate_keys

    monkeypatch.chdir(tmp_path)
    generate_keys(tmp_path / "keys", "fleet")
    # the commands of the README's "Device identity" section, as written there
    out = _run(["agent", "init", "--board", "rpi4", "--device-id", "pi-kitchen",
                "--broker", "mqtt://localhost:1883", "--pub", "keys/fleet.pub",
                "--data-dir", "var", "--out", "etc/agent.toml", "--group", "kitchen"])
    assert "edgepack fleet enroll etc/enrollment.json" in out
    key = tmp_path / "var" / IDENTITY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    doc = json.loads((tmp_path / "etc" / "enrollment.json").read_text())
    assert doc["device_id"] == "pi-kitchen" and doc["groups"] == ["kitchen"]
    assert doc["keyid"] == DeviceIdentity.load(tmp_path / "var").key_id
    # init again (--force) keeps the device's key: it stays enrolled
    _run(["agent", "init", "--board", "rpi4", "--device-id", "pi-kitchen", "--broker",
          "mqtt://b", "--pub", "keys/fleet.pub", "--data-dir", "var", "--out",
          "etc/agent.toml", "--force"])
    assert json.loads((tmp_path / "etc" / "enrollment.json").read_text())["keyid"] == \
        doc["keyid"]

    out = _run(["fleet", "enroll", "etc/enrollment.json", "--group", "kitchen",
                "--db", "sqlite:///fleet.db"])
    assert f"enrolled pi-kitchen in fleet default with key {doc['keyid'][:16]}" in out
    _run(["fleet", "enroll", "--device", "pi-hall", "--key", json.dumps(doc["key"]),
          "--group", "hall", "--group", "all"])
    rows = json.loads(_run(["fleet", "devices", "--db", "sqlite:///fleet.db", "--json"]))
    assert [(r["device_id"], r["key_id"], r["groups"], r["enrolled"]) for r in rows] == [
        ("pi-hall", doc["keyid"], ["hall", "all"], True),
        ("pi-kitchen", doc["keyid"], ["kitchen"], True)]
    out = _run(["fleet", "revoke", "--device", "pi-hall", "--db", "sqlite:///fleet.db"])
    assert f"revoked pi-hall (key {doc['keyid'][:16]})" in out
    rows = json.loads(_run(["fleet", "devices", "--json"]))
    assert [(r["device_id"], r["revoked"]) for r in rows] == [("pi-hall", True),
                                                              ("pi-kitchen", False)]
    out = _run(["fleet", "revoke", "--device", "nobody"], code=1)
    assert "not enrolled" in out
    out = _run(["fleet", "enroll", "--device", "x", "--key", "{not json"], code=2)
    assert "--key" in out


def test_enrollment_with_a_wrong_key_id_is_refused(tmp_path):
    ident = DeviceIdentity.create(tmp_path / "dev")
    doc = {**ident.enrollment("dev"), "keyid": "0" * 64}
    with open_store(f"sqlite:///{tmp_path / 'fleet.db'}") as store:
        with pytest.raises(ReportRefused, match="not the id of its key"):
            enroll(store, doc)
        assert store.inventory.list("default") == []


def test_an_older_database_gains_the_inventory(tmp_path):
    path = tmp_path / "fleet.db"
    open_store(f"sqlite:///{path}").close()
    conn = sqlite3.connect(path)  # make it look like a database of before device identity
    for col in ("key_id", "claimed_groups", "unauthenticated", "auth_error"):
        conn.execute(f"ALTER TABLE devices DROP COLUMN {col}")
    conn.execute("DROP TABLE enrollments")
    conn.commit()
    conn.close()
    with open_store(f"sqlite:///{path}") as store:  # additions an older edgepack ignores
        assert store.meta.get("schema_version") == str(SCHEMA_VERSION)
        assert {"key_id", "claimed_groups", "unauthenticated", "auth_error"} <= \
            _columns(path, "devices")
        ident = DeviceIdentity.create(tmp_path / "dev")
        enroll(store, ident.enrollment("dev"), groups=["g"])
        assert store.inventory.get("default", "dev").groups == ("g",)


def test_outbox_signs_what_it_serialises(tmp_path):
    ident = DeviceIdentity.create(tmp_path / "dev")
    box = Outbox(tmp_path / "outbox.sqlite", encode=ident.encode)
    box.put("t/events", {"kind": "installed", "device_id": "dev", "temperature_c": float("nan"),
                         "path": tmp_path})
    row = box.peek(1)[0]
    report = json.loads(row.payload)
    assert report["seq"] == 1 and report["temperature_c"] is None
    assert report["path"] == str(tmp_path)
    v = ReportVerifier({"dev": ident.enrollment()}).verify(row.payload, topic_device="dev")
    assert v.key_id == ident.key_id
    box.close()
    assert os.path.exists(tmp_path / "outbox.sqlite")


@pytest.mark.broker
def test_fleet_simulate_enrolls_its_devices(tmp_path, monkeypatch, mosquitto, fleet):
    monkeypatch.chdir(tmp_path)
    out = _run(["fleet", "simulate", "--devices", "2", "--broker", mosquitto.url, "--fleet",
                fleet, "--db", "sqlite:///fleet.db", "--duration", "1", "--json"])
    assert json.loads(out)["devices"] == 2
    with open_store("sqlite:///fleet.db") as store:
        assert [(r.device_id, r.groups) for r in store.inventory.list(fleet)] == [
            ("sim-0001", ("sim",)), ("sim-0002", ("sim",))]


def test_enrolling_a_device_already_seen_checks_its_last_state(tmp_path):
    """A device that reported before it was enrolled joins its groups at enrollment when its
    last state verifies with the enrolled key; a forged one keeps it out."""
    from edgepack.host.fleet.storage import UNAUTHENTICATED, Batch

    real, forger = DeviceIdentity.create(tmp_path / "a"), DeviceIdentity.create(tmp_path / "b")
    state = {"online": True, "device_id": "pi-1", "target": "rpi4", "groups": ["g"], "ts": 1.0}
    with open_store(f"sqlite:///{tmp_path / 'fleet.db'}") as store:
        for dev, who in (("pi-1", real), ("pi-2", forger)):
            b = Batch()
            b.states.append(("default", dev, 2.0, who.sign({**state, "device_id": dev}),
                             UNAUTHENTICATED))
            store.write_batch(b)
            assert store.devices.get("default", dev).groups == ()
        enroll(store, real.enrollment("pi-1"), groups=["ops"])
        enroll(store, real.enrollment("pi-2"), groups=["ops"])  # pi-2's state: another key
        one, two = store.devices.get("default", "pi-1"), store.devices.get("default", "pi-2")
        assert one.groups == ("ops",) and one.key_id == real.key_id
        assert one.claimed_groups == ("g",)
        assert two.groups == () and not two.authenticated


def _columns(path, table: str) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
    finally:
        conn.close()
