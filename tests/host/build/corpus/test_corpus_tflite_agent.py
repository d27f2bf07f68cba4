"""An rpi4 TFLite bundle built from an already-int8 ``.tflite`` is installed by a real agent
process (LiteRT runtime, health gate on the golden outputs) and answers an inference."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[3] / "agent"))

from agent_helpers import AgentProcess, Keys, Watcher, agent_config, deploy  # noqa: E402

from edgepack.agent.bundle import read_bundle  # noqa: E402
from edgepack.agent.inference import Client  # noqa: E402

pytestmark = pytest.mark.broker


def test_agent_installs_and_serves_an_int8_tflite_bundle(tflite_corpus, mosquitto, fleet,
                                                         tmp_path: Path) -> None:
    import edgepack.host as ep

    keys = Keys(tmp_path / "keys")
    res = ep.build(str(tflite_corpus["tflite_int8"].path), target="rpi4", key=str(keys.key),
                   out=str(tmp_path / "dist"))
    manifest = read_bundle(res.path).manifest
    assert manifest["model"]["format"] == "tflite" and manifest["runtime"]["name"] == "litert"
    assert manifest["optimization"]["dtype"] == "int8"

    cfg = agent_config(tmp_path / "pi", mosquitto.url, fleet, pub=keys.pub, target="rpi4")
    agent = AgentProcess(cfg, tmp_path / "agent.log").start()
    try:
        with Watcher(mosquitto.url, fleet) as watcher:
            watcher.wait_state(lambda s: s.get("online"), timeout=30)
            bundle_id, dep = deploy(mosquitto.url, fleet, res.path, key=keys.key)
            ev = watcher.wait_event("installed", dep, timeout=60)
            assert ev["health"]["passed"], ev
            watcher.wait_active(bundle_id)
        client = Client(f"unix:{cfg.parent / 'data' / 'agent.sock'}")
        (inp,) = manifest["model"]["inputs"]
        x = np.random.default_rng(0).integers(-128, 128, (1, 16, 16, 3)).astype(np.int8)
        (out,) = client.predict({inp["name"]: x}).values()
        assert out.shape == (1, 10) and out.dtype == np.int8
    finally:
        rc = agent.stop()
        if rc not in (0, None):
            print(agent.log_text()[-5000:])
