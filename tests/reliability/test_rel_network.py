"""A slow, stalling, resetting or partitioned link between agent and broker (the fault-injecting
proxy of reliability_helpers; the kernel here has no netem): the transfer completes, telemetry
arrives in order after each fault, nothing is lost or duplicated in what a collector records
(after dropping duplicates on (device, seq)), and no step hangs past its timeout."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest
from agent_helpers import agent_config, publish_desired
from reliability_helpers import CrashableAgent, FaultProxy, Recorder

from edgepack.agent.identity import DeviceIdentity
from edgepack.host.fleet.collector import Collector, CollectorOptions
from edgepack.host.fleet.identity import enroll
from edgepack.host.fleet.publish import publish_bundle
from edgepack.host.fleet.storage import open_store

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
    store = open_store(f"sqlite:///{tmp_path / 'fleet.db'}")
    enroll(store, DeviceIdentity.load_or_create(cfg.parent / "data").enrollment("dev1"),
           fleet=fleet)
    agent = CrashableAgent(cfg).start()
    collector = Collector(url, store,
                          CollectorOptions(fleets=(fleet,), client_id=f"{fleet}-collector",
                                           fetch_reports=False)).start()
    try:
        with Recorder(url, fleet) as r:
            assert collector.wait_connected(10)
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
            agent.stop()  # nothing more is produced: compare what everyone stored
            time.sleep(1.0)
            collector.wait_idle(10)
            ok, why, lost = _check_stream(r)
            stored = {kind: collector.store.db.query_one(
                f"SELECT COUNT(*) AS n, COUNT(DISTINCT ts) AS d FROM {kind} "
                "WHERE fleet = ? AND device_id = 'dev1'", (fleet,)) for kind in
                ("telemetry", "events")}
            want = {"telemetry": len(r.telemetry), "events": len(r.events)}
            if ok and any(stored[k]["n"] != want[k] or stored[k]["d"] != want[k] for k in want):
                ok, why = False, f"collector stored {stored}, expected {want} once each"
            dl = next(e for e in r.events if e["kind"] == "downloaded")
            note = (f"{r.duplicates} duplicates delivered and dropped (device, seq), collector "
                    f"stored each message once; {dl['stats']['interruptions']} transfer "
                    "interruptions")
            rec_delay.run(ok, lost=lost, note=note if ok else why)
            rec_reset.run(ok, lost=lost, note=note if ok else why)
            assert ok, why
            assert proxy.connections >= 4
            assert all(s.failures == 0 for s in (rec_delay, rec_reset))
    finally:
        agent.stop()
        proxy.close()
        collector.stop()


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


@pytest.fixture
def capped_netns():
    """A network namespace joined by a veth pair whose host end is capped by ``tc tbf`` at
    2 Mbit/s toward the namespace (the download direction). Root and iproute2 only."""
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        pytest.skip("network namespaces and tc need root and iproute2")
    n = os.getpid() % 200 + 10
    ns, host_if, ns_if = f"eprel{n}", f"eprh{n}", f"eprn{n}"
    host_ip, ns_ip = f"10.213.{n}.1", f"10.213.{n}.2"

    def sh(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True)

    sh("ip", "netns", "del", ns)
    steps = [("ip", "netns", "add", ns),
             ("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if),
             ("ip", "link", "set", ns_if, "netns", ns),
             ("ip", "addr", "add", f"{host_ip}/30", "dev", host_if),
             ("ip", "link", "set", host_if, "up"),
             ("ip", "netns", "exec", ns, "ip", "addr", "add", f"{ns_ip}/30", "dev", ns_if),
             ("ip", "netns", "exec", ns, "ip", "link", "set", ns_if, "up"),
             ("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"),
             ("tc", "qdisc", "add", "dev", host_if, "root", "tbf", "rate", "2mbit", "burst",
              "32kbit", "latency", "400ms")]
    for cmd in steps:
        r = sh(*cmd)
        if r.returncode != 0:
            sh("ip", "netns", "del", ns)
            sh("ip", "link", "del", host_if)
            pytest.skip(f"{' '.join(cmd)}: {r.stderr.strip()}")
    yield ns, host_ip
    sh("ip", "netns", "del", ns)
    sh("ip", "link", "del", host_if)


@pytest.mark.slow
def test_bandwidth_capped_link_in_a_netns(tmp_path, capped_netns, mosquitto, fleet, rel_bundles,
                                          rel_keys, scenario):
    """The agent in its own network namespace behind a 2 Mbit/s tbf-capped veth, the fault
    proxy on the host end: the transfer takes as long as the cap says, survives a stall and a
    reset on the way, and telemetry keeps its order."""
    rec = scenario("link: tc tbf 2 Mbit/s (netns) + stall + reset")
    ns, host_ip = capped_netns
    url = mosquitto.url
    info = publish_bundle(rel_bundles.medium("1.0.0"), url, key_path=rel_keys.key, fleet=fleet,
                          chunk_size=CHUNK)
    proxy = FaultProxy(mosquitto.port, listen=host_ip)
    cfg = agent_config(tmp_path / "dev1", proxy.url, fleet, pub=rel_keys.pub,
                       telemetry={"interval_s": 0.5},
                       transfer={"window": 4, "chunk_timeout_s": 10.0},
                       broker={"keepalive": 10, "connect_timeout_s": 3.0})
    agent = CrashableAgent(cfg)
    agent.prefix = ("ip", "netns", "exec", ns)
    agent.start()
    try:
        with Recorder(url, fleet) as r:
            r.wait(lambda: len(r.telemetry) >= 2, 20, "telemetry through the namespace")
            dep = publish_desired(url, fleet, info["bundle_id"])
            r.wait_event("download_progress", dep, timeout=20)
            proxy.stall(2.0)
            time.sleep(2.5)
            proxy.reset()
            t_reset = time.time()
            took = _next_telemetry_after(r, t_reset, 15)
            dl = r.wait_event("downloaded", dep, timeout=60)
            r.wait_event("installed", dep, timeout=60)
            secs = dl["stats"]["seconds"]
            floor = info["bytes"] * 8 / 2e6 * 0.7  # the cap was really in the path
            ok, why, lost = _check_stream(r)
            if ok and secs < floor:
                ok, why = False, f"{secs:.1f}s for {info['bytes']} bytes: the cap did not apply"
            rec.run(ok, lost=lost, recovery_s=took,
                    note=f"{info['bytes']} bytes in {secs:.1f}s (cap floor {floor:.1f}s)"
                    if ok else why)
            assert ok, why
    finally:
        agent.stop()
        proxy.close()
