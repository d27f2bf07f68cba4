"""The same deploy against the embedded broker (amqtt): any MQTT 3.1.1 broker works."""

from __future__ import annotations

import numpy as np
from agent_helpers import AgentProcess, Watcher, agent_config, deploy

from edgepack.agent.inference import Client


def test_deploy_and_upgrade_through_amqtt(tmp_path, amqtt_broker, fleet, bundles, keys):
    url = amqtt_broker.url
    cfg = agent_config(tmp_path / "dev1", url, fleet, pub=keys.pub)
    agent = AgentProcess(cfg).start()
    try:
        with Watcher(url, fleet) as watcher:
            watcher.wait_state(lambda s: s.get("online"), timeout=20)
            bid1, dep1 = deploy(url, fleet, bundles.get("1.0.0"), key=keys.key, chunk_size=None)
            watcher.wait_event("installed", dep1, timeout=40)
            watcher.wait_active(bid1)
            bid2, dep2 = deploy(url, fleet, bundles.get("2.0.0"), key=keys.key)
            watcher.wait_event("installed", dep2, timeout=40)
            watcher.wait_active(bid2)
            out = Client(f"unix:{cfg.parent / 'data' / 'agent.sock'}").predict(
                np.zeros((1, 64), np.float32))
            assert out["logits"].shape == (1, 10)
    finally:
        assert agent.stop() == 0
        print(agent.log_text()[-3000:])
