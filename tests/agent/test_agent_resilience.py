"""Outages and crashes: broker restart mid-transfer, kill -9 mid-transfer and mid-install,
crash loops, telemetry through an outage."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from agent_helpers import (
    AgentProcess,
    TcpProxy,
    Watcher,
    agent_config,
    deploy,
    publish_desired,
)
from brokers import start_mosquitto

from edgepack.agent.inference import Client
from edgepack.host.fleet.publish import publish_bundle

pytestmark = pytest.mark.broker
CHUNK = 256 * 1024


@pytest.fixture(scope="module")
def durable_mosquitto():
    """A Mosquitto that keeps retained messages and sessions across restarts (as in production)."""
    # mosquitto started as root drops to its own user: the store must be reachable by it
    store = Path(tempfile.mkdtemp(prefix="edgepack-mosquitto-db-"))
    store.chmod(0o777)
    broker = start_mosquitto(extra_conf=f"persistence true\npersistence_location {store}/\n"
                             "autosave_interval 1\n")
    yield broker
    broker.stop()
    shutil.rmtree(store, ignore_errors=True)


def _agent(tmp_path: Path, url: str, fleet: str, keys, **kw) -> tuple[AgentProcess, Path]:
    cfg = agent_config(tmp_path / "dev1", url, fleet, pub=keys.pub, **kw)
    return AgentProcess(cfg).start(), cfg


def test_resume_after_broker_restart_mid_transfer(tmp_path, durable_mosquitto, fleet, bundles,
                                                  keys):
    broker = durable_mosquitto
    large = bundles.get("1.0.0", large=True)
    info = publish_bundle(large, broker.url, key_path=keys.key, fleet=fleet, chunk_size=CHUNK)
    total = info["chunks"]
    assert total >= 70 and info["bytes"] > 18 * 1024 * 1024
    proxy = TcpProxy(broker.port, rate_bytes_s=6e6)  # ~3.5 s for the whole bundle
    agent, cfg = _agent(tmp_path, proxy.url, fleet, keys, transfer={"window": 8})
    try:
        with Watcher(broker.url, fleet) as watcher:
            watcher.wait_state(lambda s: s.get("online"), timeout=20)
            dep = publish_desired(broker.url, fleet, info["bundle_id"])
            first = watcher.wait_event("download_progress", dep, timeout=30)
            assert first["chunks_done"] < total
            time.sleep(0.4)
            broker.restart()  # retained chunks and the agent's session survive (persistence)
            ev = watcher.wait_event("downloaded", dep, timeout=60)
            stats = ev["stats"]
            assert stats["interruptions"] >= 1, stats
            assert stats["chunks_total"] == total and stats["written"] == total
            # at most the window in flight is fetched again per interruption
            assert stats["received"] <= total + 8 * stats["interruptions"], stats
            watcher.wait_event("installed", dep, timeout=60)
    finally:
        assert agent.stop() == 0
        proxy.close()


def test_kill9_mid_transfer_resumes_from_disk(tmp_path, mosquitto, fleet, bundles, keys):
    large = bundles.get("1.0.0", large=True)
    info = publish_bundle(large, mosquitto.url, key_path=keys.key, fleet=fleet, chunk_size=CHUNK)
    total = info["chunks"]
    proxy = TcpProxy(mosquitto.port, rate_bytes_s=6e6)
    agent, cfg = _agent(tmp_path, proxy.url, fleet, keys, transfer={"window": 8})
    try:
        with Watcher(mosquitto.url, fleet) as watcher:
            watcher.wait_state(lambda s: s.get("online"), timeout=20)
            dep = publish_desired(mosquitto.url, fleet, info["bundle_id"])
            watcher.wait(lambda: [e for e in watcher.events if e["kind"] == "download_progress"
                                  and e["chunks_done"] >= 16], timeout=30, what="progress")
            agent.kill9()
            done_before = max(e["chunks_done"] for e in watcher.events
                              if e["kind"] == "download_progress")
            assert done_before < total
            agent.start()
            started = watcher.wait(lambda: [e for e in watcher.events
                                            if e["kind"] == "download_started"
                                            and e.get("resumed_chunks")], timeout=30,
                                   what="resumed download")[0]
            # everything reported as done before the kill was on disk; at most one window is lost
            assert started["resumed_chunks"] >= done_before
            ev = watcher.wait_event("downloaded", dep, timeout=60)
            assert ev["stats"]["written"] == total - started["resumed_chunks"]
            assert ev["stats"]["received"] <= total - started["resumed_chunks"] + 8
            watcher.wait_event("installed", dep, timeout=60)
    finally:
        agent.stop()
        proxy.close()


@pytest.mark.parametrize("kill_at", ["staged", "health_checking"])
def test_kill9_during_install_leaves_a_working_model(tmp_path, mosquitto, fleet, bundles, keys,
                                                     kill_at):
    agent, cfg = _agent(tmp_path, mosquitto.url, fleet, keys)
    data = cfg.parent / "data"
    try:
        with Watcher(mosquitto.url, fleet) as watcher:
            watcher.wait_state(lambda s: s.get("online"), timeout=20)
            bid1, dep1 = deploy(mosquitto.url, fleet, bundles.get("1.0.0"), key=keys.key)
            watcher.wait_event("installed", dep1)
            bid2, dep2 = deploy(mosquitto.url, fleet, bundles.get("2.0.0"), key=keys.key)
            watcher.wait_event(kill_at, dep2)
            agent.kill9()
            state = json.loads((data / "state.json").read_text())
            # the old bundle is still the active one on disk, whatever the phase
            active = state["slots"][state["active"]]["bundle_id"]
            assert active == bid1 or (active == bid2 and state["phase"] == "idle")
            seen = len(watcher.states)
            agent.start()
            watcher.wait_state(lambda s: s.get("online") and (s.get("active") or {}).get(
                "bundle_id") == bid2, timeout=40, since=seen)
            x = np.zeros((1, 64), np.float32)
            out = Client(f"unix:{data / 'agent.sock'}").predict({"x": x})
            assert out["logits"].shape == (1, 10)
    finally:
        agent.stop()


def test_crash_loop_after_commit_rolls_back(tmp_path, mosquitto, fleet, bundles, keys):
    agent, cfg = _agent(tmp_path, mosquitto.url, fleet, keys,
                        health={"max_crashes": 2, "crash_window_s": 120.0})
    try:
        with Watcher(mosquitto.url, fleet) as watcher:
            watcher.wait_state(lambda s: s.get("online"), timeout=20)
            bid1, dep1 = deploy(mosquitto.url, fleet, bundles.get("1.0.0"), key=keys.key)
            watcher.wait_event("installed", dep1)
            bid2, dep2 = deploy(mosquitto.url, fleet, bundles.get("2.0.0"), key=keys.key)
            watcher.wait_event("installed", dep2)
            for _ in range(2):  # the new bundle "crashes" the agent twice, soon after commit
                agent.kill9()
                seen = len(watcher.states)
                agent.start()
                watcher.wait_state(lambda s: s.get("online"), timeout=20, since=seen)
            ev = watcher.wait_event("rolled_back", dep2)
            assert ev["reason"] == "crash_loop" and ev["bundle_id"] == bid2
            watcher.wait_active(bid1)
            time.sleep(1.0)  # the desired state still says v2: it must not be reinstalled
            assert watcher.kinds(dep2).count("download_started") == 1
            info = Client(f"unix:{cfg.parent / 'data' / 'agent.sock'}").info()
            assert info["bundle_id"] == bid1
    finally:
        agent.stop()


def test_telemetry_survives_an_outage(tmp_path, mosquitto, fleet, keys):
    proxy = TcpProxy(mosquitto.port)
    agent, cfg = _agent(tmp_path, proxy.url, fleet, keys, telemetry={"interval_s": 0.25})
    try:
        with Watcher(mosquitto.url, fleet) as watcher:
            watcher.wait(lambda: len(watcher.telemetry) >= 3, timeout=20, what="telemetry")
            proxy.cut()
            t_cut = time.time()
            time.sleep(2.0)
            proxy.restore()
            t_back = time.time()
            watcher.wait(lambda: any(m["ts"] > t_back + 0.5 for m in watcher.telemetry),
                         timeout=20, what="telemetry after the outage")
            during = [m for m in watcher.telemetry if t_cut + 0.3 < m["ts"] < t_back - 0.3]
            assert len(during) >= 4, "messages produced during the outage were lost"
            seqs = []
            for m in watcher.telemetry + watcher.events:
                if m["seq"] not in seqs:
                    seqs.append(m["seq"])
            tele_seqs = [m["seq"] for m in watcher.telemetry]
            first_seen = list(dict.fromkeys(tele_seqs))
            assert first_seen == sorted(first_seen), "flushed out of order"
            assert sorted(seqs) == list(range(min(seqs), max(seqs) + 1)), "a gap: something lost"
            assert all(m["outbox_dropped"] == 0 for m in watcher.telemetry)
    finally:
        assert agent.stop() == 0
        proxy.close()
