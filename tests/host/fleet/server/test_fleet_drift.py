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

from edgepack.host.fleet.deploy import deploy

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "agent"))
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "agent" / "drift"))
from agent_helpers import TARGET, AgentProcess, agent_config  # noqa: E402
from drift_models import IMAGE, build_digits_cnn, digits_split  # noqa: E402

pytestmark = pytest.mark.broker

DEVICE = "cam-1"


def _digits_bundle(tmp_path: Path, key: Path) -> Path:
    """The digits CNN built by edgepack with calibration and eval data: it has drift.json."""
    from edgepack.host.build import build

    split = digits_split()
    model = build_digits_cnn(tmp_path / "digits_cnn.onnx", split)
    np.savez(tmp_path / "calib.npz", **{IMAGE: split.reference[:300]})
    np.savez(tmp_path / "eval.npz", **{IMAGE: split.reference[300:]})
    r = build(model=str(model), target=TARGET, quantize="none", key=str(key),
              calibration=str(tmp_path / "calib.npz"), eval=str(tmp_path / "eval.npz"),
              out=str(tmp_path / "out"), variants=False)
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
        assert not page.js_errors, page.js_errors
        assert agent.stop() == 0
    finally:
        if agent.alive:
            agent.kill9()
