"""A PMML bundle with string inputs and string labels, end to end: built by the README command,
deployed over a real Mosquitto, through the real agent's health gate, served to a local app."""

from __future__ import annotations

import json
import shutil
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgepack.agent.inference import Client, InferenceServer, InferenceService, Model
from edgepack.agent.telemetry import LatencyStats
from edgepack.host.cli.main import main

from .oracle import CORPUS

sys.path.insert(0, str(Path(__file__).parents[3] / "agent"))
from agent_helpers import TARGET, AgentProcess, Watcher, agent_config, deploy  # noqa: E402

pytestmark = pytest.mark.broker
DOCUMENT = "r_randomforest_vote.pmml"  # a forest voting string classes over a string field


def test_string_io_bundle_passes_health_and_serves(tmp_path, monkeypatch, mosquitto, fleet):
    shutil.copy(CORPUS / DOCUMENT, tmp_path / "model.pmml")
    monkeypatch.chdir(tmp_path)
    built = CliRunner().invoke(main, ["build", "model.pmml", "--target", TARGET, "-q"])
    assert built.exit_code == 0, built.output
    bundle = tmp_path / "dist" / f"model-1.0.0-{TARGET}.edgepack"

    cfg = agent_config(tmp_path / "dev1", mosquitto.url, fleet)  # unsigned bundles allowed
    agent = AgentProcess(cfg).start()
    try:
        with Watcher(mosquitto.url, fleet) as watcher:
            watcher.wait_state(lambda s: s.get("online"), timeout=20)
            bid, dep = deploy(mosquitto.url, fleet, bundle, key=None)
            ev = watcher.wait_event("installed", dep, timeout=60)
            assert ev["health"]["passed"], ev["health"]
            kinds = {o["name"]: o["kind"] for o in ev["health"]["outputs"]}
            assert kinds == {"label": "labels", "probabilities": "float"}
            watcher.wait_active(bid)

        with Client(f"unix:{cfg.parent / 'data' / 'agent.sock'}") as client:
            info = client.info()
            assert {s["name"]: s["dtype"] for s in info["inputs"]}["color"] == "string"
            row = {"x1": np.array([[0.4]]), "x2": np.array([[-1.0]]),
                   "x3": np.array([[np.nan]]), "color": np.array([["red"]])}
            out = client.predict(row)
            assert out["label"].dtype.kind == "U" and out["label"][0] in {"high", "mid", "low"}
            assert out["probabilities"].shape == (1, 3)
            assert np.isclose(out["probabilities"].sum(), 1.0)
            unseen = client.predict({**row, "color": np.array([["purple"]])})
            assert unseen["label"].dtype.kind == "U"
    finally:
        rc = agent.stop()
        if rc not in (0, None):
            print(agent.log_text()[-5000:])


def test_string_inputs_as_json_and_in_python(tmp_path, monkeypatch):
    shutil.copy(CORPUS / DOCUMENT, tmp_path / "model.pmml")
    monkeypatch.chdir(tmp_path)
    assert CliRunner().invoke(main, ["build", "model.pmml", "--target", TARGET,
                                     "-q"]).exit_code == 0
    model = Model.open(tmp_path / "dist" / f"model-1.0.0-{TARGET}.edgepack")
    # one value per field, no batch axes; None is a missing value (NaN / "")
    local = model.predict({"x1": 0.4, "x2": -1.0, "x3": None, "color": "red"})
    assert local["label"].dtype.kind == "U"
    missing = model.predict({"x1": 0.4, "x2": -1.0, "x3": None, "color": [None]})
    assert missing["label"].dtype.kind == "U"

    service = InferenceService(LatencyStats())
    service.swap(model)
    server = InferenceServer(service, http="127.0.0.1:0").start()
    try:
        host, port = server.http_address
        body = json.dumps({"inputs": {"x1": [[0.4]], "x2": [[-1.0]], "x3": [[None]],
                                      "color": [["red"]]}}).encode()
        req = urllib.request.Request(f"http://{host}:{port}/v1/predict", body,
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            answer = json.loads(resp.read())
    finally:
        server.close()
    assert answer["outputs"]["label"] == [str(local["label"][0])]
    assert answer["dtypes"]["label"] == "string"
    assert answer["outputs"]["probabilities"] == local["probabilities"].tolist()
