"""Drift end to end: a bundle built with its drift reference, the real ``edgepack-agent``
serving it and sketching its inferences, a real Mosquitto, the fleet server judging the windows
on /api/drift, /metrics and the dashboard (in a real headless Chromium)."""

from __future__ import annotations

import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from fleet_helpers import get_json, wait_for

from edgepack.agent.errors import DataError
from edgepack.agent.identity import DeviceIdentity
from edgepack.host.fleet.deploy import deploy
from edgepack.host.fleet.identity import enroll

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "agent"))
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "agent" / "drift"))
from agent_helpers import TARGET, AgentProcess, agent_config  # noqa: E402
from drift_models import IMAGE, build_digits_cnn, digits_split  # noqa: E402

pytestmark = pytest.mark.broker

DEVICE = "cam-1"


def _digits_bundle(tmp_path: Path, key: Path, version: str = "1.0.0") -> Path:
    """The digits CNN built by edgepack with calibration and eval data: it has drift.json."""
    from edgepack.host.build import build

    tmp_path.mkdir(parents=True, exist_ok=True)
    split = digits_split()
    model = build_digits_cnn(tmp_path / "digits_cnn.onnx", split)
    np.savez(tmp_path / "calib.npz", **{IMAGE: split.reference[:300]})
    np.savez(tmp_path / "eval.npz", **{IMAGE: split.reference[300:]})
    r = build(model=str(model), target=TARGET, quantize="none", key=str(key),
              calibration=str(tmp_path / "calib.npz"), eval=str(tmp_path / "eval.npz"),
              out=str(tmp_path / "out"), variants=False, version=version)
    assert "drift.json" in r.manifest["files"]
    return r.path


def _windows_after(server, fleet: str, t: float) -> list:
    return server.store.drift.windows(fleet, device_ids=[DEVICE], since=t)


def _close_window(server, fleet: str) -> float:
    """Wait until the device has sent a window after now (so the next calls start a fresh
    window); returns that moment."""
    t = time.time()
    wait_for(lambda: _windows_after(server, fleet, t), 30, what="the next drift window")
    return time.time()


def test_drift_in_distribution_stays_quiet_and_inverted_images_alert(
        tmp_path, sqlite_url, mosquitto, fleet, serve, fleet_keys, page):
    from edgepack.agent.inference import Client

    key, pub = fleet_keys
    bundle = _digits_bundle(tmp_path, key)
    server = serve(sqlite_url, fleet)
    cfg = agent_config(tmp_path / "dev", mosquitto.url, fleet, device_id=DEVICE, pub=pub,
                       drift={"sample_rate": 1.0})
    enroll(server.store, DeviceIdentity.load_or_create(cfg.parent / "data").enrollment(DEVICE),
           fleet=fleet)
    agent = AgentProcess(cfg).start()
    try:
        api = f"{server.url}api/"
        wait_for(lambda: (d := server.store.devices.get(fleet, DEVICE)) and d.online, 30,
                 what="the agent's birth message")
        res = deploy(bundle, broker=mosquitto.url, device=DEVICE, fleet=fleet, key=key)
        wait_for(lambda: (d := server.store.devices.get(fleet, DEVICE))
                 and d.bundle_id == res.bundle_id, 90, what="the bundle installed")
        ref = wait_for(lambda: (r := server.store.drift.reference(fleet, res.bundle_id))
                       and r.ref and r, 60, what="the bundle's drift.json fetched")
        client = Client(f"unix:{cfg.parent / 'data' / 'agent.sock'}")
        stream = digits_split().stream

        # ---- in-distribution: unseen digits, one image a call, as an app would send them
        t0 = _close_window(server, fleet)
        for x in stream[:400]:
            client.predict({IMAGE: x[None]})
        t1 = _close_window(server, fleet)
        quiet = get_json(f"{api}drift?fleet={fleet}&device={DEVICE}&since={t0}&until={t1}")
        [v] = quiet["verdicts"]
        assert v["bundle_id"] == res.bundle_id and v["verdict"]["reference_id"] == ref.ref
        assert v["verdict"]["rows"] == 400 and v["verdict"]["judged"], v
        assert not v["alert"] and v["score"] < 1.0, v

        # ---- a shifted stream: the same digits inverted (1 - x)
        for x in stream[:600]:
            client.predict({IMAGE: 1.0 - x[None]})
        wait_for(lambda: len(_windows_after(server, fleet, t1)) >= 3, 30,
                 what="three windows of the shifted stream")
        third = _windows_after(server, fleet, t1)[2]
        shifted = get_json(f"{api}drift?fleet={fleet}&device={DEVICE}&since={t1}"
                           f"&until={third.ts + 1e-3}")
        [v] = shifted["verdicts"]
        assert v["windows"] <= 3 and v["verdict"]["judged"], v
        assert v["alert"] and v["score"] >= 1.0, v
        alerting = {f["key"] for f in v["verdict"]["figures"] if f["alert"]}
        assert "i0.c0" in alerting and "o0.conf" in alerting, alerting

        # per bundle and per group over the same range
        by_bundle = get_json(f"{api}drift?fleet={fleet}&bundle={res.bundle_id[:12]}"
                             f"&since={t1}&until={third.ts + 1e-3}")["verdicts"]
        assert [b["bundle_id"] for b in by_bundle] == [res.bundle_id] and by_bundle[0]["alert"]

        # ---- /metrics: the drift family, labelled by device and bundle
        with urllib.request.urlopen(server.url + "metrics") as m:
            text = m.read().decode()
        scores = [line for line in text.splitlines() if line.startswith("edgepack_drift_score{")]
        assert any(f'device="{DEVICE}"' in s and f'bundle="{res.bundle_id[:12]}"' in s
                   for s in scores), scores

        # ---- the dashboard's device table shows the alert, in Chromium
        page.goto(f"{server.url}?fleet={fleet}")
        cell = page.locator(f"tr[data-device='{DEVICE}'] td.drift")
        cell.wait_for(timeout=15_000)
        wait_for(lambda: cell.get_attribute("data-drift") == "drifting", 15,
                 what="the drift column turning red")
        assert float(cell.inner_text()) >= 1.0
        # the device page charts the score over time, with the alert threshold
        page.goto(f"{server.url}devices/{DEVICE}?fleet={fleet}")
        page.wait_for_selector("#chart-drift canvas")
        labels = page.evaluate("() => window.__charts['chart-drift'].series.map(s => s.label)")
        assert {"score", "alert threshold"} <= set(labels)
        assert page.evaluate(
            "() => window.__charts['chart-drift'].data[1].some(v => v !== null && v >= 1)")
        assert page.locator("#chart-drift").get_attribute("data-drift") == "drifting"
        # and so does the bundle page, over every device running it
        page.goto(f"{server.url}bundles/{res.bundle_id}?fleet={fleet}")
        page.wait_for_selector("#chart-drift canvas")
        assert not page.js_errors, page.js_errors
        assert agent.stop() == 0
    finally:
        if agent.alive:
            agent.kill9()


def test_a_rollout_halts_when_the_new_bundle_drifts(tmp_path, sqlite_url, mosquitto, fleet,
                                                     serve, fleet_keys):
    from edgepack.agent.inference import Client
    from edgepack.host.fleet.api import rollout_start, rollout_status

    key, pub = fleet_keys
    v1 = _digits_bundle(tmp_path / "v1", key, "1.0.0")
    v2 = _digits_bundle(tmp_path / "v2", key, "2.0.0")
    server = serve(sqlite_url, fleet)
    cfg = agent_config(tmp_path / "dev", mosquitto.url, fleet, device_id=DEVICE, pub=pub,
                       groups=["cams"], drift={"sample_rate": 1.0})
    enroll(server.store, DeviceIdentity.load_or_create(cfg.parent / "data").enrollment(DEVICE),
           fleet=fleet, groups=["cams"])
    agent = AgentProcess(cfg).start()
    try:
        wait_for(lambda: (d := server.store.devices.get(fleet, DEVICE)) and d.online, 30,
                 what="the agent's birth message")
        first = deploy(v1, broker=mosquitto.url, group="cams", fleet=fleet, key=key)
        wait_for(lambda: server.store.devices.get(fleet, DEVICE).bundle_id == first.bundle_id,
                 90, what="v1 installed")
        client = Client(f"unix:{cfg.parent / 'data' / 'agent.sock'}")
        stream = digits_split().stream
        for x in stream[:400]:  # v1 answers in-distribution traffic: no drift before
            client.predict({IMAGE: x[None]})
        r = rollout_start(v2, group="cams", broker=mosquitto.url, db=server.store, fleet=fleet,
                          stages="100", max_failures="0", soak="60s", key=key)
        v2_id = rollout_status(r.id, db=server.store).rollout.bundle_id
        wait_for(lambda: server.store.devices.get(fleet, DEVICE).bundle_id == v2_id, 90,
                 what="v2 installed")
        wait_for(lambda: (x := server.store.drift.reference(fleet, v2_id)) and x.ref, 60,
                 what="v2's drift.json fetched")
        for x in stream[:600]:  # the camera's picture inverts under the new bundle
            client.predict({IMAGE: 1.0 - x[None]})
        final = wait_for(lambda: (s := rollout_status(r.id, db=server.store)).state
                         in ("completed", "halted") and s, 120, what="the rollout's end")
        assert final.state == "halted", final.log
        assert "drift on the new bundle" in final.devices[0].detail, final.devices
        assert any("drift" in x.message for x in final.log), final.log
        wait_for(lambda: server.store.devices.get(fleet, DEVICE).bundle_id == first.bundle_id,
                 60, what="v1 active again")
        assert agent.stop() == 0
    finally:
        if agent.alive:
            agent.kill9()


# ------------------------------------------------------------------------------ storage


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory):
    from drift_models import digits_cnn

    return digits_cnn(tmp_path_factory.mktemp("drift-cnn"))


def _windows(cnn, calls: int, transform=None, windows: int = 2) -> list[dict]:
    from drift_models import run_windows

    from edgepack.agent.drift import DriftSketcher, DriftSpec

    sketcher = DriftSketcher(DriftSpec.from_reference(cnn.reference), sample_rate=1.0, seed=1)
    return run_windows(cnn, sketcher, windows=windows, calls=calls, seed=3,
                       transform=transform)


def test_drift_windows_stored_and_judged_on_both_databases(db_url, cnn):
    from collections import Counter

    from edgepack.agent.protocol import VERSION, encode
    from edgepack.host.build.drift_reference import reference_json
    from edgepack.host.fleet.collector.messages import parse_messages
    from edgepack.host.fleet.drift_status import drift_status
    from edgepack.host.fleet.storage import open_store

    quiet = _windows(cnn, 200)
    shifted = _windows(cnn, 200, transform=lambda x: 1.0 - x)
    ref = cnn.reference
    now = time.time()
    msgs = []
    for i, w in enumerate(quiet + shifted):
        dev = "a" if i < 2 else "b"
        body = {"device_id": dev, "ts": now - 100 + i, "bundle_id": "b" * 64, "inferences": 200,
                "drift": w}
        msgs.append((now, f"edgepack/{VERSION}/f1/devices/{dev}/telemetry", encode(body), False))
    bad = {"device_id": "c", "ts": now - 50, "bundle_id": "b" * 64,
           "drift": {**quiet[0], "sampled": 10**6}}
    msgs.append((now, f"edgepack/{VERSION}/f1/devices/c/telemetry", encode(bad), False))
    dropped: Counter = Counter()
    parsed = parse_messages(msgs, {"f1"}, received=Counter(), dropped=dropped,
                            on_bundle=lambda *_: None)
    assert dropped["bad_drift"] == 1 and len(parsed.batch.telemetry) == 5
    assert len(parsed.batch.drift) == 4
    with open_store(db_url) as store:
        store.write_batch(parsed.batch)
        store.write_batch(parsed.batch)  # an outbox re-sent after a reconnect: stored once
        assert store.drift.count("f1") == 4
        assert store.telemetry.count("f1") == 5
        [s] = drift_status(store, "f1", device="a", since=now - 200)
        assert s.verdict is None and "not fetched" in s.note and s.windows == 2
        store.drift.set_reference("f1", "b" * 64, ref["id"], reference_json(ref).decode())
        [a] = drift_status(store, "f1", device="a", since=now - 200)
        [b] = drift_status(store, "f1", device="b", since=now - 200)
        assert a.verdict.judged and not a.alert and a.score < 1.0
        assert b.verdict.judged and b.alert and b.score >= 1.0
        [both] = drift_status(store, "f1", bundle="b" * 64, since=now - 200)
        assert both.devices == ("a", "b") and both.verdict.rows == 800
        assert [x.key for x in drift_status(store, "f1", since=now - 200)] == ["a", "b"]
        assert drift_status(store, "f1", device="a", since=now - 200,
                            until=now - 101)[0].note.startswith("no drift windows")
        with pytest.raises(DataError, match="one of"):
            drift_status(store, "f1", device="a", bundle="x")
        store.prune(telemetry_before=now + 1)
        assert store.drift.count("f1") == 0


def test_a_version_1_database_gains_the_drift_tables(tmp_path):
    import sqlite3

    from edgepack.host.fleet.storage import SCHEMA_VERSION, open_store

    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    open_store(url).close()
    conn = sqlite3.connect(tmp_path / "fleet.db")
    conn.execute("DROP TABLE drift_windows")
    conn.execute("DROP TABLE drift_references")
    conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with open_store(url) as store:
        assert store.meta.get("schema_version") == str(SCHEMA_VERSION) == "2"
        assert store.drift.count("f") == 0 and store.drift.reference("f", "x") is None
