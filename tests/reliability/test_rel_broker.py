"""The broker killed (SIGKILL) and restarted mid-transfer, again and again: the download completes,
and each interruption costs at most the window that was in flight."""

from __future__ import annotations

import time

import pytest
from agent_helpers import agent_config, publish_desired
from reliability_helpers import CrashableAgent, FaultProxy, Recorder, kill9_broker

from edgepack.host.fleet.publish import publish_bundle

pytestmark = pytest.mark.broker
CHUNK = 16 * 1024
WINDOW = 4


def test_broker_killed_repeatedly_mid_transfer(tmp_path, own_mosquitto, fleet, rel_bundles,
                                               rel_keys, scenario):
    rec = scenario("broker kill -9 mid-transfer")
    broker = own_mosquitto
    info = publish_bundle(rel_bundles.medium("1.0.0"), broker.url, key_path=rel_keys.key,
                          fleet=fleet, chunk_size=CHUNK)
    total = info["chunks"]
    time.sleep(1.5)  # autosave_interval 1: the retained bundle is on the broker's disk
    proxy = FaultProxy(broker.port)
    proxy.delay_s = 0.1  # ~0.25 s per window: the transfer takes a few seconds
    cfg = agent_config(tmp_path / "dev1", proxy.url, fleet, pub=rel_keys.pub,
                       transfer={"window": WINDOW, "chunk_timeout_s": 5.0},
                       broker={"reconnect_min_s": 0.1, "reconnect_max_s": 0.5})
    agent = CrashableAgent(cfg).start()
    kills = 0
    try:
        with Recorder(broker.url, fleet) as r:
            r.wait_state(lambda s: s.get("online"), timeout=20)
            time.sleep(1.2)  # the recorder's session is saved too
            dep = publish_desired(broker.url, fleet, info["bundle_id"])
            done, t_kill = 0, time.monotonic()
            while kills < 5:
                ev = r.wait(lambda d=done: [e for e in r.events if e["kind"] in (
                    "download_progress", "downloaded") and e.get("deployment_id") == dep
                    and e.get("chunks_done", total) > d], timeout=30, what="progress")[-1]
                if ev["kind"] == "downloaded":
                    break
                if kills:  # the previous kill's recovery: progress again
                    rec.run(True, recovery_s=time.monotonic() - t_kill)
                done = ev["chunks_done"]
                kill9_broker(broker)
                t_kill = time.monotonic()
                kills += 1
            ev = r.wait_event("downloaded", dep, timeout=60)
            r.wait_event("installed", dep, timeout=60)
            st = ev["stats"]
            refetched = st["received"] - (total - st["resumed_from"])
            bound = WINDOW * max(st["interruptions"], 1)
            ok = st["written"] == total and refetched <= bound and kills >= 4
            rec.run(ok, recovery_s=time.monotonic() - t_kill,
                    note=f"{kills} broker kills, {st['interruptions']} interruptions, "
                    f"{refetched} chunks re-fetched in all (window {WINDOW})")
            assert kills >= 4, "the transfer finished before the broker was killed 4 times"
            assert st["written"] == total, st
            # at most the window in flight is fetched again per interruption (protocol.md §4.5)
            assert refetched <= bound, st
    finally:
        agent.stop()
        proxy.close()
