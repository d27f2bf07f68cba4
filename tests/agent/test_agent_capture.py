"""Sampled capture on a real agent process and Mosquitto: off by default, refused unless
release-signed, fresh and for this device, records what the agent served, bounded, pulled over
MQTT, stopped and purged."""

from __future__ import annotations

import json
import shlex
import stat
from pathlib import Path

import numpy as np
import pytest
from agent_helpers import AgentProcess, Watcher, agent_config, deploy
from click.testing import CliRunner

from edgepack.agent.capture import CaptureRing
from edgepack.agent.identity import DeviceIdentity
from edgepack.agent.inference import Client
from edgepack.agent.protocol import Topics
from edgepack.agent.trust import ReportRefused
from edgepack.host.cli.main import main
from edgepack.host.fleet import capture
from edgepack.host.fleet.client import SyncClient
from edgepack.host.fleet.keyring import load_signer
from edgepack.host.fleet.trust import sign_capture

DEV = "pi-door"
DOC = Path(__file__).parents[2] / "docs" / "drift.md"


@pytest.fixture(scope="module")
def device(tmp_path_factory, mosquitto, keys, bundles):
    """One agent serving the tiny bundle: ``(fleet, data dir, client, watcher)``."""
    fleet = "default"  # docs/drift.md's commands name no fleet
    root = tmp_path_factory.mktemp("capture-agent")
    cfg = agent_config(root, mosquitto.url, fleet, device_id=DEV, pub=keys.pub)
    (root / "data").mkdir(mode=0o700, exist_ok=True)
    DeviceIdentity.create(root / "data")  # the pull's chunk table is signed with it
    proc = AgentProcess(cfg).start()
    with Watcher(mosquitto.url, fleet, DEV) as w:
        w.wait_state(lambda s: s.get("online") is True)
        bid, _ = deploy(mosquitto.url, fleet, bundles.get("1.0.0"), key=keys.key, device_id=DEV)
        w.wait_active(bid)
        yield fleet, root / "data", Client(f"unix:{root / 'data' / 'agent.sock'}"), w
    proc.stop()


def _x(i: int) -> np.ndarray:
    return np.random.default_rng(100 + i).standard_normal((1, 64)).astype(np.float32)


def _ring(data: Path) -> list[Path]:
    return sorted((data / "capture" / "ring").glob("*.npz"))


def _cli(*args: str) -> str:
    res = CliRunner().invoke(main, list(args))
    assert res.exit_code == 0, res.output
    return res.output


def _capture_event(w: Watcher, since: int, **match: object) -> dict:
    def find() -> dict | None:
        return next((e for e in w.events[since:] if e["kind"] in ("capture", "control_refused")
                     and all(e.get(k) == v for k, v in match.items())), None)
    return w.wait(find, 30, f"capture event {match}")


def test_capture_is_off_by_default_and_refuses_what_it_must(device, mosquitto, keys) -> None:
    fleet, data, client, w = device
    for i in range(5):
        client.predict({"x": _x(i)})
    assert not (data / "capture").exists(), "nothing is captured unless a request asks"

    topic = Topics(fleet).device(DEV, "capture")
    start = {"action": "start", "rate_ppm": 1_000_000, "max_bytes": 1 << 20}
    forged = sign_capture(load_signer(keys.other_key), fleet, device=DEV, request=start,
                          lifetime_s=600)
    expired = sign_capture(load_signer(keys.key), fleet, device=DEV, request=start,
                           lifetime_s=-600)
    other = sign_capture(load_signer(keys.key), fleet, device="pi-other", request=start,
                         lifetime_s=600)
    n = len(w.events)
    with SyncClient(mosquitto.url) as c:
        for payload, reason in ((json.dumps(start).encode(), "unsigned"),
                                (forged, "unknown_key"), (expired, "expired")):
            c.publish(topic, payload, qos=1, retain=True)
            ev = _capture_event(w, n, kind="control_refused", reason=reason)
            assert ev["control"] == "capture" and ev["topic"] == topic
        c.publish(Topics(fleet).device("pi-other", "capture"), other, qos=1, retain=True)
        c.publish(topic, b"", qos=1, retain=True)
    for i in range(5):
        client.predict({"x": _x(i)})
    assert not _ring(data), "a refused request turns nothing on"


def test_start_serve_pull_bound_stop_and_purge(device, mosquitto, keys, tmp_path) -> None:
    fleet, data, client, w = device
    common = ["--device", DEV, "--broker", mosquitto.url, "--key", str(keys.key),
              "--fleet", fleet]
    n = len(w.events)
    out = _cli("capture", "start", *common, "--rate", "1", "--max-mb", "20", "--until", "1h")
    assert "capture requested on pi-door" in out
    _capture_event(w, n, kind="capture", action="start")

    sent = {i: (_x(i), client.predict({"x": _x(i)})) for i in range(6)}
    files = _ring(data)
    assert len(files) == 6
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)

    pulled = tmp_path / "pulled"
    out = _cli("capture", "pull", *common, "--out", str(pulled))
    assert "6 record(s) from pi-door" in out
    index = json.loads((pulled / "index.json").read_text())
    assert index["device_id"] == DEV and index["capturing"] is True
    assert len(index["records"]) == 6 and "only as honest as the device" in index["note"]
    for rec, (x, y) in zip(index["records"], sent.values(), strict=True):
        with np.load(pulled / rec["file"]) as z:
            np.testing.assert_array_equal(z["input:x"], x)
            np.testing.assert_array_equal(z["output:logits"], y["logits"])
            np.testing.assert_array_equal(z["output:label"], y["label"])
            assert json.loads(str(z["__meta__"]))["device_id"] == DEV

    # a newer request with a ring of 3 records: the oldest go first
    n = len(w.events)
    capture.start(DEV, broker=mosquitto.url, key=keys.key, fleet=fleet, rate=1.0,
                  max_mb=20, max_records=3, until="1h")
    _capture_event(w, n, kind="capture", action="start")
    for i in range(6, 12):
        client.predict({"x": _x(i)})
    r = capture.pull(DEV, broker=mosquitto.url, key=keys.key, fleet=fleet,
                     out=tmp_path / "bounded", device_key=DeviceIdentity.load(data).enrollment())
    assert r.verified
    assert r.records == 3 and len(_ring(data)) == 3
    assert r.signed_by == DeviceIdentity.load(data).key_id
    stranger = DeviceIdentity.create(tmp_path / "stranger").enrollment()
    with pytest.raises(ReportRefused) as exc:  # not the key this device enrolled
        capture.pull(DEV, broker=mosquitto.url, key=keys.key, fleet=fleet,
                     out=tmp_path / "refused", device_key=stranger)
    assert exc.value.reason == "unknown_key"
    kept = [np.load(tmp_path / "bounded" / rec["file"])["input:x"]
            for rec in json.loads(Path(r.index).read_text())["records"]]
    for got, i in zip(kept, range(9, 12), strict=True):
        np.testing.assert_array_equal(got, _x(i))

    n = len(w.events)
    out = _cli("capture", "stop", *common, "--purge")
    assert "stop and purge" in out
    _capture_event(w, n, kind="capture", action="stop")
    assert not _ring(data)
    client.predict({"x": _x(0)})
    assert not _ring(data), "capture is off after stop"


def test_the_ring_is_bounded_in_bytes_and_records(tmp_path) -> None:
    ring = CaptureRing(tmp_path / "ring", max_bytes=2500, max_records=100)
    for i in range(10):
        assert ring.add(bytes([i]) * 1000)
    assert len(ring) == 2 and ring.bytes <= 2500 and ring.dropped == 8
    assert [p.read_bytes()[0] for p in sorted((tmp_path / "ring").glob("*.npz"))] == [8, 9]
    assert not ring.add(b"x" * 3000)  # alone over the bound: not stored
    again = CaptureRing(tmp_path / "ring", max_bytes=2500, max_records=1)  # after a restart
    again.add(b"z" * 10)
    assert len(again) == 1 and again.names()[0].startswith("000000000010-")


def test_the_capture_commands_of_the_docs_run_as_written(device, mosquitto, keys, tmp_path,
                                                       monkeypatch) -> None:
    """docs/drift.md § Sampled capture (and the README) show these commands exactly."""
    fleet, data, client, w = device
    text = DOC.read_text()
    commands = [line.strip() for line in text.splitlines()
                if line.strip().startswith("edgepack capture ")]
    assert [c.split()[2] for c in commands] == ["start", "pull", "stop"], commands
    monkeypatch.chdir(tmp_path)
    env = {"EDGEPACK_BROKER": mosquitto.url, "EDGEPACK_KEY": str(keys.key)}
    n = len(w.events)
    for cmd in commands:
        res = CliRunner(env=env).invoke(main, shlex.split(cmd)[1:])
        assert res.exit_code == 0, (cmd, res.output)
        if cmd.split()[2] == "start":
            _capture_event(w, n, kind="capture", action="start")
            for i in range(20):
                client.predict({"x": _x(i)})
    assert (tmp_path / "captured" / "index.json").exists()
    _capture_event(w, n, kind="capture", action="stop")
    assert not _ring(data)


def test_capture_stops_when_its_request_expires_and_records_go_after_keep(tmp_path) -> None:
    from edgepack.agent.capture import Capture, CaptureRequest

    now = [1_000_000.0]
    cap = Capture(tmp_path, device_id=DEV, clock=lambda: now[0])
    x, y = {"x": np.ones((1, 4), np.float32)}, {"y": np.zeros((1, 2), np.float32)}
    cap.observe(x, y, "b" * 64)
    assert not (tmp_path / "capture").exists()  # off by default: no file at all
    cap.apply(CaptureRequest("start", 1, until=1_000_100, rate_ppm=1_000_000,
                             max_bytes=1 << 20, max_records=10, keep_s=50), b"start")
    cap.observe(x, y, "b" * 64)
    assert len(_ring(tmp_path)) == 1 and cap.active
    now[0] = 1_000_100.0  # the request expired: capture is off, the record stays a while
    cap.observe(x, y, "b" * 64)
    assert not cap.active and len(_ring(tmp_path)) == 1 and not cap.expire()
    restarted = Capture(tmp_path, device_id=DEV, clock=lambda: now[0])
    assert restarted.is_last(b"start") and not restarted.active
    now[0] = 1_000_150.0  # keep_s after the expiry: the records are deleted
    assert restarted.expire() and not _ring(tmp_path) and restarted.request is None
