"""End to end against a real Mosquitto: publish, deploy, upgrade, roll back, refuse."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from agent_helpers import AgentProcess, Watcher, agent_config, deploy, publish_desired

from edgepack.agent.inference import Client
from edgepack.agent.protocol import Topics
from edgepack.host.fleet.client import SyncClient

pytestmark = pytest.mark.broker


@pytest.fixture
def agent_env(tmp_path: Path, mosquitto, fleet: str, keys):
    """A running agent process for device dev1 and a watcher of its topics."""
    cfg = agent_config(tmp_path / "dev1", mosquitto.url, fleet, pub=keys.pub)
    agent = AgentProcess(cfg).start()
    with Watcher(mosquitto.url, fleet) as watcher:
        try:
            watcher.wait_state(lambda s: s.get("online"), timeout=20)
            yield agent, watcher, cfg
        finally:
            rc = agent.stop()
            if rc not in (0, None):
                print(agent.log_text()[-5000:])


def _slot_state(cfg: Path) -> dict:
    return json.loads((cfg.parent / "data" / "state.json").read_text())


def test_deploy_upgrade_and_serve(agent_env, mosquitto, fleet, bundles, keys):
    agent, watcher, cfg = agent_env
    birth = watcher.state
    assert birth["online"] and birth["target"] == "x86-64-avx2" and birth["active"] is None
    assert "onnxruntime" in birth["runtimes"]

    v1 = bundles.get("1.0.0")
    bid1, dep1 = deploy(mosquitto.url, fleet, v1, key=keys.key)
    ev = watcher.wait_event("installed", dep1)
    assert ev["bundle_id"] == bid1 and ev["health"]["passed"]
    assert ev["health"]["latency_ms"]["p95"] > 0 and ev["health"]["peak_rss_mb"] > 0
    kinds = watcher.kinds(dep1)
    for k in ("download_started", "downloaded", "verified", "staged", "health_checking",
              "installed"):
        assert k in kinds, kinds
    assert kinds.index("verified") < kinds.index("staged") < kinds.index("installed")
    state = watcher.wait_active(bid1)
    assert state["active"]["version"] == "1.0.0" and state["slot"] == "A"

    client = Client(f"unix:{cfg.parent / 'data' / 'agent.sock'}")
    x = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
    out1 = client.predict({"x": x})
    assert out1["logits"].shape == (1, 10) and out1["label"].dtype == np.int64
    assert client.info()["version"] == "1.0.0"

    v2 = bundles.get("2.0.0")
    bid2, dep2 = deploy(mosquitto.url, fleet, v2, key=keys.key)
    ev = watcher.wait_event("installed", dep2)
    assert ev["previous"]["bundle_id"] == bid1
    state = watcher.wait_active(bid2)
    assert state["slot"] == "B" and state["previous"]["bundle_id"] == bid1
    out2 = client.predict({"x": x})
    assert not np.allclose(out1["logits"], out2["logits"])  # a different model answers now
    assert client.info()["version"] == "2.0.0"
    # every inference was timed into telemetry
    t = watcher.wait(lambda: next((m for m in watcher.telemetry if m["inferences"] >= 1), None),
                     timeout=10, what="telemetry with inferences")
    assert t["latency_ms"]["p95"] > 0 and t["rss_mb"] > 0 and t["bundle_id"] in (bid1, bid2)
    assert not (cfg.parent / "data" / "downloads" / f"{bid2}.edgepack").exists()

    # the same desired state again (agent restart): nothing is re-installed
    assert agent.stop() == 0
    offline = watcher.wait_state(lambda s: not s.get("online"))
    assert offline["active"]["bundle_id"] == bid2
    seen = len(watcher.states)
    agent.start()
    watcher.wait_state(lambda s: s.get("online") and s["active"]["bundle_id"] == bid2,
                       since=seen)
    assert client.predict({"x": x})["logits"].shape == (1, 10)
    assert watcher.kinds(dep2).count("installed") == 1


def test_failed_health_check_keeps_the_old_bundle(agent_env, mosquitto, fleet, bundles, keys):
    agent, watcher, cfg = agent_env
    bid1, dep1 = deploy(mosquitto.url, fleet, bundles.get("1.0.0"), key=keys.key)
    watcher.wait_event("installed", dep1)
    bad = bundles.get("1.1.0", broken=True)
    bid_bad, dep_bad = deploy(mosquitto.url, fleet, bad, key=keys.key)
    failed = watcher.wait_event("health_failed", dep_bad)
    assert "logits" in failed["detail"] and not failed["health"]["passed"]
    rolled = watcher.wait_event("rolled_back", dep_bad)
    assert rolled["active"]["bundle_id"] == bid1
    state = _slot_state(cfg)
    assert state["slots"][state["active"]]["bundle_id"] == bid1 and state["phase"] == "idle"
    assert "installed" not in watcher.kinds(dep_bad)
    client = Client(f"unix:{cfg.parent / 'data' / 'agent.sock'}")
    assert client.info()["bundle_id"] == bid1


def test_refusals_change_nothing(agent_env, mosquitto, fleet, bundles, keys):
    """Tampered chunk, wrong key, unsigned, wrong target, downgrade: rejected, v2 stays."""
    agent, watcher, cfg = agent_env
    bid2, dep2 = deploy(mosquitto.url, fleet, bundles.get("2.0.0"), key=keys.key)
    watcher.wait_event("installed", dep2)
    before = _slot_state(cfg)

    def refused(bundle, reason, *, key=keys.key, tamper=False, allow_downgrade=False):
        from edgepack.agent.bundle import read_bundle
        from edgepack.host.fleet.publish import publish_bundle

        b = read_bundle(bundle)
        publish_bundle(bundle, mosquitto.url, key_path=key, fleet=fleet, chunk_size=4096)
        if tamper:
            with SyncClient(mosquitto.url) as c:
                topic = Topics(fleet).bundle_chunk(b.bundle_id, 1)
                c.publish(topic, b"\0" * 4096, retain=True)
        dep = publish_desired(mosquitto.url, fleet, b.bundle_id, name=b.name, version=b.version,
                              allow_downgrade=allow_downgrade)
        ev = watcher.wait_event("rejected", dep)
        assert ev["reason"] == reason, ev
        assert "installed" not in watcher.kinds(dep) and "staged" not in watcher.kinds(dep)
        return ev

    ev = refused(bundles.get("3.0.0", seed=31), "tampered", tamper=True)
    assert "chunk 1" in ev["detail"]
    ev = refused(bundles.get("3.0.0", signer="other"), "signature", key=keys.other_key)
    assert "not trusted" in ev["detail"]
    refused(bundles.get("3.0.0", signer=None, seed=32), "signature", key=None)
    ev = refused(bundles.get("3.0.0", target="rpi4"), "target")
    assert "rpi4" in ev["detail"]
    # protocol v2: the rollback floor replaces `allow_downgrade` (reason `below_floor`)
    ev = refused(bundles.get("1.0.0"), "below_floor")
    assert "rollback floor 2.0.0" in ev["detail"] and "downgrade authorization" in ev["detail"]
    # the bundle signed by another key, published with a table signed by the fleet key:
    # the table passes, the bundle's own signature does not
    ev = refused(bundles.get("3.0.1", signer="other"), "signature")

    after = _slot_state(cfg)
    assert after["active"] == before["active"] and after["slots"] == before["slots"]
    assert watcher.wait_active(bid2)
    client = Client(f"unix:{cfg.parent / 'data' / 'agent.sock'}")
    assert client.info()["bundle_id"] == bid2
    downloads = list((cfg.parent / "data" / "downloads").iterdir())
    assert downloads == [], downloads

    # a downgrade the operator asked for is fine
    bid1, dep = deploy(mosquitto.url, fleet, bundles.get("1.0.0"), key=keys.key,
                       allow_downgrade=True)
    watcher.wait_event("installed", dep)
    watcher.wait_active(bid1)


def test_group_desired_and_device_override(tmp_path, mosquitto, fleet, bundles, keys):
    from edgepack.agent.bundle import read_bundle
    from edgepack.host.fleet.publish import publish_bundle

    cfg = agent_config(tmp_path / "d", mosquitto.url, fleet, pub=keys.pub, groups=["lab"])
    agent = AgentProcess(cfg).start()
    try:
        with Watcher(mosquitto.url, fleet) as watcher:
            watcher.wait_state(lambda s: s.get("online"), timeout=20)
            b1, b2 = read_bundle(bundles.get("1.0.0")), read_bundle(bundles.get("2.0.0"))
            for b in (b1, b2):
                publish_bundle(b.path, mosquitto.url, key_path=keys.key, fleet=fleet)
            dep_g = publish_desired(mosquitto.url, fleet, b2.bundle_id, group="lab",
                                    version="2.0.0")
            watcher.wait_event("installed", dep_g)
            watcher.wait_active(b2.bundle_id)
            dep_d = publish_desired(mosquitto.url, fleet, b1.bundle_id, version="1.0.0",
                                    allow_downgrade=True)
            watcher.wait_event("installed", dep_d)
            watcher.wait_active(b1.bundle_id)
            # a signed clear of the device's own desired state: it follows its group again
            from click.testing import CliRunner

            from edgepack.host.cli import main

            r = CliRunner().invoke(main, ["fleet", "clear", "--device", "dev1", "--broker",
                                          mosquitto.url, "--fleet", fleet, "--key",
                                          str(keys.key)])
            assert r.exit_code == 0 and "unsigned" not in r.output, r.output
            watcher.wait_active(b2.bundle_id)
    finally:
        assert agent.stop() == 0


def test_in_process_agent(tmp_path, mosquitto, fleet, bundles, keys):
    """The agent also runs in a thread of another program (tests, demos): stop() is clean."""
    from agent_helpers import AgentThread

    from edgepack.agent.inference import Model

    cfg = agent_config(tmp_path / "d", mosquitto.url, fleet, pub=keys.pub,
                       serve={"socket": ""})
    agent = AgentThread(cfg).start()
    with Watcher(mosquitto.url, fleet) as watcher:
        watcher.wait_state(lambda s: s.get("online"), timeout=20)
        bid, dep = deploy(mosquitto.url, fleet, bundles.get("1.0.0"), key=keys.key)
        watcher.wait_event("installed", dep)
        model = agent.agent.service.model
        assert model is not None and model.bundle_id == bid
        model.predict(np.zeros(64, np.float32))
        with SyncClient(mosquitto.url) as c:  # clearing the desired state changes nothing
            c.publish(Topics(fleet).desired("dev1"), b"", retain=True)
        agent.stop()
        assert not agent.thread.is_alive()
        state = watcher.wait_state(lambda s: not s.get("online"))
        assert state["active"]["bundle_id"] == bid
    assert Model.active(cfg.parent / "data").bundle_id == bid  # the Python API for apps


def test_one_agent_per_data_dir(tmp_path, mosquitto, fleet, keys):
    import subprocess
    import sys

    cfg = agent_config(tmp_path / "d", mosquitto.url, fleet, pub=keys.pub)
    first = AgentProcess(cfg).start()
    try:
        with Watcher(mosquitto.url, fleet) as watcher:
            watcher.wait_state(lambda s: s.get("online"), timeout=20)
            second = subprocess.run([sys.executable, "-m", "edgepack.agent.daemon", "--config",
                                     str(cfg)], capture_output=True, text=True, timeout=30)
            assert second.returncode == 2
            assert f"pid {first.proc.pid}" in second.stderr and "already" not in second.stdout
            assert first.alive
    finally:
        assert first.stop() == 0
