"""A slow, stalling, resetting or partitioned link between agent and broker (the fault-injecting
proxy of reliability_helpers; the kernel here has no netem): the transfer completes, telemetry
arrives in order after each fault, nothing is lost or duplicated in what a collector records
(after dropping duplicates on (device, seq)), and no step hangs past its timeout."""

from __future__ import annotations

import time

import pytest
from agent_helpers import agent_config, publish_desired
from reliability_helpers import CrashableAgent, FaultProxy, Recorder

from edgepack.host.publish import publish_bundle

pytestmark = pytest.mark.broker
CHUNK = 16 * 1024


def _next_telemetry_after(r: Recorder, t: float, timeout: float) -> float:
    """Seconds from wall time ``t`` until the first telemetry produced after ``t`` arrived."""
    def find() -> float | None:
        arrived = [r.arrival[m["seq"]] for m in r.telemetry if m["ts"] > t]
        return min(arrived) if arrived else None

    return r.wait(find, timeout, "telemetry after the fault") - t


def _check_stream(r: Recorder) -> tuple[bool, str, int]:
    """In order, nothing missing: ``(ok, why, messages lost)``."""
    gaps = r.gaps()
    if gaps:
        return False, f"seqs never delivered: {gaps[:10]}", len(gaps)
    if not r.in_order():
        return False, "delivered out of order", 0
    return True, "ok", 0


def test_delay_stalls_and_resets_during_transfer(tmp_path, mosquitto, fleet, rel_bundles,
                                                 rel_keys, scenario):
    rec_delay = scenario("link: 80 ms delay + 3 s stalls")
    rec_reset = scenario("link: connection resets (RST)")
    url = mosquitto.url
    info = publish_bundle(rel_bundles.medium("1.0.0"), url, key_path=rel_keys.key, fleet=fleet,
                          chunk_size=CHUNK)
    proxy = FaultProxy(mosquitto.port)
    proxy.delay_s = 0.08
    cfg = agent_config(tmp_path / "dev1", proxy.url, fleet, pub=rel_keys.pub,
                       telemetry={"interval_s": 0.2},
                       transfer={"window": 4, "chunk_timeout_s": 5.0},
                       broker={"keepalive": 10, "connect_timeout_s": 3.0})
    agent = CrashableAgent(cfg).start()
    try:
        with Recorder(url, fleet) as r:
            r.wait(lambda: len(r.telemetry) >= 3, 20, "telemetry")
            dep = publish_desired(url, fleet, info["bundle_id"])
            r.wait_event("download_progress", dep, timeout=20)
            for _ in range(2):  # stalls shorter than the keepalive: the connection survives
                proxy.stall(3.0)
                time.sleep(3.0)
                t = time.time()
                rec_delay.run(True, recovery_s=_next_telemetry_after(r, t, 10))
            for _ in range(3):
                proxy.reset()
                t = time.time()
                # back within the reconnect backoff (at most 2 s here) plus a CONNACK
                took = _next_telemetry_after(r, t, 10)
                rec_reset.run(took < 6.0, recovery_s=took,
                              note=None if took < 6.0 else f"{took:.1f}s to recover")
                time.sleep(0.5)
            r.wait_event("installed", dep, timeout=60)
            t_end = time.time()
            r.wait(lambda: any(m["ts"] > t_end + 0.5 for m in r.telemetry), 10, "telemetry")
            ok, why, lost = _check_stream(r)
            dl = next(e for e in r.events if e["kind"] == "downloaded")
            note = (f"{r.duplicates} duplicates dropped by (device, seq); "
                    f"{dl['stats']['interruptions']} transfer interruptions")
            rec_delay.run(ok, lost=lost, note=note if ok else why)
            rec_reset.run(ok, lost=lost, note=note if ok else why)
            assert ok, why
            assert proxy.connections >= 4
            assert all(s.failures == 0 for s in (rec_delay, rec_reset))
    finally:
        agent.stop()
        proxy.close()


@pytest.mark.slow
def test_30s_blackhole_during_transfer(tmp_path, mosquitto, fleet, rel_bundles, rel_keys,
                                       scenario):
    """Packets vanish for 30 s, no FIN, no RST: the connection that existed stays half-open for
    good, so only the keepalive can notice. Afterwards the agent is back within keepalive-bound
    detection + connect timeout + backoff, the transfer completes, telemetry produced during the
    partition arrives in order and nothing is lost."""
    rec = scenario("link: 30 s blackhole (no FIN)")
    keepalive, connect_timeout, backoff_max = 5, 3.0, 2.0
    url = mosquitto.url
    info = publish_bundle(rel_bundles.medium("1.0.0"), url, key_path=rel_keys.key, fleet=fleet,
                          chunk_size=CHUNK)
    proxy = FaultProxy(mosquitto.port)
    proxy.delay_s = 0.08
    cfg = agent_config(tmp_path / "dev1", proxy.url, fleet, pub=rel_keys.pub,
                       telemetry={"interval_s": 0.5},
                       transfer={"window": 4, "chunk_timeout_s": 5.0},
                       broker={"keepalive": keepalive, "connect_timeout_s": connect_timeout,
                               "reconnect_max_s": backoff_max})
    agent = CrashableAgent(cfg).start()
    try:
        with Recorder(url, fleet) as r:
            r.wait(lambda: len(r.telemetry) >= 2, 20, "telemetry")
            dep = publish_desired(url, fleet, info["bundle_id"])
            r.wait_event("download_progress", dep, timeout=20)
            proxy.blackhole(True)
            t_hole = time.time()
            time.sleep(30.0)
            proxy.blackhole(False)
            t_back = time.time()
            # a connection attempt begun during the partition may wait its full CONNACK
            # timeout; then one backoff; then a CONNACK round trip
            bound = connect_timeout + backoff_max + 2.0
            took = _next_telemetry_after(r, t_back, 30)
            r.wait_event("installed", dep, timeout=60)
            t_end = time.time()
            r.wait(lambda: any(m["ts"] > t_end + 0.5 for m in r.telemetry), 10, "telemetry")
            during = [m for m in r.telemetry if t_hole + 1 < m["ts"] < t_back - 1]
            ok, why, lost = _check_stream(r)
            if ok and len(during) < 40:
                ok, why = False, f"only {len(during)} telemetry messages from the partition"
            if ok and took > bound:
                ok, why = False, f"back {took:.1f}s after the partition (bound {bound:g}s)"
            rec.run(ok, lost=lost, recovery_s=took,
                    note=f"{len(during)} messages queued during the partition, "
                    f"{r.duplicates} duplicates dropped" if ok else why)
            assert ok, why
    finally:
        agent.stop()
        proxy.close()
