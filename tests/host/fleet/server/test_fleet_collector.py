"""The collector against real brokers and databases: shared and plain subscriptions, broker
restarts, its own absence (persistent session), database outages — and nothing lost."""

from __future__ import annotations

import sqlite3
import sys
import threading
import time
from pathlib import Path

import pytest
from fleet_helpers import wait_for

from edgepack.agent.protocol import Topics
from edgepack.host.fleet.client import SyncClient
from edgepack.host.fleet.collector import Collector, CollectorOptions
from edgepack.host.fleet.storage import open_store

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from brokers import start_mosquitto  # noqa: E402

pytestmark = pytest.mark.broker


def _all_stored(sim, storage, fleet, collectors, timeout=20.0):
    """Stop the simulator, then wait until every telemetry message it sent is in the database."""
    sim.stop()
    sent = sim.stats()["telemetry_sent"]
    wait_for(lambda: storage.telemetry.count(fleet) >= sent, timeout,
             what=f"{sent} telemetry rows")
    for c in collectors:
        assert c.wait_idle(5)
    assert storage.telemetry.count(fleet) == sent
    return sent


def test_collects_a_simulated_fleet(db_url, mosquitto, fleet, serve, simulate):
    server = serve(db_url, fleet)
    c = server.collector
    assert c.protocol == "5" and c.shared_active  # Mosquitto 2 offers shared subscriptions
    sim = simulate(fleet, 15, interval_s=0.3)
    storage = server.store
    wait_for(lambda: sum(d.online is True for d in storage.devices.list(fleet)) == 15, 15,
             what="15 devices online")
    d = storage.devices.get(fleet, sim.devices[0].id)
    assert d.target == "rpi4" and d.groups == ("sim",) and d.agent_version.endswith("sim")
    wait_for(lambda: all(x.telemetry for x in storage.devices.list(fleet)), 10,
             what="telemetry from every device")
    # a device that vanishes: its LWT marks it offline
    sim.drop(sim.devices[1].id)
    wait_for(lambda: storage.devices.get(fleet, sim.devices[1].id).online is False, 10,
             what="the LWT")
    assert storage.devices.get(fleet, sim.devices[1].id).offline_reason == "connection lost"
    # garbage is counted and skipped, the collector carries on
    t = Topics(fleet)
    with SyncClient(mosquitto.url) as client:
        client.publish(t.telemetry(sim.devices[2].id), b"{not json")
        client.publish(t.prefix + "devices/bad%2Fid/telemetry", b"{}")
    wait_for(lambda: c.dropped["bad_message"] >= 2, 5, what="dropped garbage")
    _all_stored(sim, storage, fleet, [c])
    # a clean shutdown says so
    offline = [x for x in storage.devices.list(fleet) if x.online is False]
    assert len(offline) == 15
    assert storage.devices.get(fleet, sim.devices[0].id).offline_reason == "clean shutdown"
    assert c.stats()["lag_s"]["p99"] < 1.0 and c.db_errors == 0


def test_plain_subscription_on_an_mqtt311_broker(sqlite_url, fleet, serve, simulate):
    """The embedded amqtt broker refuses MQTT 5: the collector falls back to 3.1.1."""
    from edgepack.host.fleet.broker import EmbeddedBroker

    with EmbeddedBroker(port=0) as broker:
        server = serve(sqlite_url, fleet, broker=broker.url)
        c = server.collector
        assert c.protocol == "3.1.1" and not c.shared_active
        sim = simulate(fleet, 4, broker=broker.url, interval_s=0.3)
        wait_for(lambda: len(server.store.devices.list(fleet)) == 4, 10, what="4 devices")
        wait_for(lambda: server.store.telemetry.count(fleet) >= 8, 10, what="telemetry")
        sim.stop()


def test_two_collectors_share_one_fleet(sqlite_url, mosquitto, fleet, simulate):
    """Two collectors in one share group split the telemetry: each message stored once."""
    storage = open_store(sqlite_url)
    opts = {"fleets": (fleet,), "fetch_reports": False}
    a = Collector(mosquitto.url, storage, CollectorOptions(client_id=f"{fleet}-a", **opts))
    b = Collector(mosquitto.url, storage, CollectorOptions(client_id=f"{fleet}-b", **opts))
    with a, b:
        assert a.wait_connected() and b.wait_connected()
        sim = simulate(fleet, 10, interval_s=0.1, enroll_db=sqlite_url)
        time.sleep(2.0)
        _all_stored(sim, storage, fleet, [a, b])
        assert a.stored["telemetry"] > 0 and b.stored["telemetry"] > 0
        # every collector keeps the full presence picture (state is not shared)
        assert a.stored["states"] >= 10 and b.stored["states"] >= 10
    storage.close()


def test_survives_a_broker_restart(sqlite_url, fleet, serve, simulate):
    broker = start_mosquitto()
    try:
        server = serve(sqlite_url, fleet, broker=broker.url)
        sim = simulate(fleet, 8, broker=broker.url, interval_s=0.2)
        storage = server.store
        wait_for(lambda: storage.telemetry.count(fleet) >= 16, 10, what="telemetry")
        broker.restart()  # in-memory broker: retained states and sessions are gone
        wait_for(lambda: server.collector.connects >= 2 and server.collector.connected, 30,
                 what="the collector to reconnect")
        assert sim.wait_online(timeout=30)
        before = storage.telemetry.count(fleet)
        wait_for(lambda: storage.telemetry.count(fleet) >= before + 16, 15,
                 what="telemetry after the restart")
        wait_for(lambda: all(d.online for d in storage.devices.list(fleet)), 10,
                 what="devices online again")
        sim.stop()
    finally:
        broker.stop()


def test_persistent_session_queues_while_the_collector_is_away(sqlite_url, mosquitto, fleet,
                                                               simulate):
    """The broker keeps the collector's session: what devices send meanwhile arrives later."""
    storage = open_store(sqlite_url)
    opts = CollectorOptions(fleets=(fleet,), client_id=f"{fleet}-persist", fetch_reports=False)
    first = Collector(mosquitto.url, storage, opts).start()
    assert first.wait_connected()
    sim = simulate(fleet, 5, interval_s=0.2, enroll_db=sqlite_url)
    time.sleep(0.5)
    first.stop()  # a clean DISCONNECT: the session (and its subscriptions) stays
    time.sleep(2.0)  # devices keep sending
    away = sim.stats()["telemetry_sent"] - storage.telemetry.count(fleet)
    assert away >= 20
    second = Collector(mosquitto.url, storage, opts).start()
    try:
        assert second.wait_connected()
        _all_stored(sim, storage, fleet, [second])
    finally:
        second.stop()
        storage.close()


def test_database_outage_loses_nothing(db_url, request, mosquitto, fleet, serve, simulate):
    """SQLite locked by another process for longer than the busy timeout, or PostgreSQL
    restarted: the collector queues, retries, and stores everything."""
    server = serve(db_url, fleet)
    sim = simulate(fleet, 10, interval_s=0.2)
    storage = server.store
    wait_for(lambda: storage.telemetry.count(fleet) >= 20, 10, what="telemetry")
    if db_url.startswith("sqlite"):
        path = db_url[len("sqlite:///"):]
        held = threading.Event()

        def hold_lock() -> None:
            conn = sqlite3.connect(path, timeout=10, isolation_level=None)
            conn.execute("BEGIN EXCLUSIVE")
            held.set()
            time.sleep(6.5)  # longer than the collector's 5 s busy timeout
            conn.execute("COMMIT")
            conn.close()

        t = threading.Thread(target=hold_lock)
        t.start()
        held.wait(5)
        wait_for(lambda: server.collector.db_errors >= 1, 10, what="a failed write")
        assert server.collector.queue_depth > 0
        t.join()
    else:
        cluster = request.getfixturevalue("pg_cluster")
        cluster.stop()
        wait_for(lambda: server.collector.db_errors >= 1, 10, what="a failed write")
        time.sleep(1.5)
        cluster.start()
    _all_stored(sim, storage, fleet, [server.collector], timeout=30)
    assert server.collector.dropped.get("queue_full", 0) == 0


def test_memory_bound_sheds_telemetry_and_counts_it(sqlite_url, mosquitto, fleet, simulate):
    """Past ``queue_max`` queued messages (database away), new telemetry is dropped and
    counted; every message is either stored or counted."""
    storage = open_store(sqlite_url)
    path = sqlite_url[len("sqlite:///"):]
    c = Collector(mosquitto.url, storage, CollectorOptions(
        fleets=(fleet,), client_id=f"{fleet}-bound", fetch_reports=False, queue_max=30))
    with c:
        assert c.wait_connected()
        sim = simulate(fleet, 10, interval_s=0.1, enroll_db=sqlite_url)
        wait_for(lambda: storage.telemetry.count(fleet) > 0, 10, what="telemetry")
        conn = sqlite3.connect(path, timeout=10, isolation_level=None)
        conn.execute("BEGIN EXCLUSIVE")
        wait_for(lambda: c.dropped["queue_full"] > 20, 15, what="telemetry shed")
        assert c.queue_depth <= 30
        conn.execute("COMMIT")
        conn.close()
        sim.stop()
        sent = sim.stats()["telemetry_sent"]
        wait_for(lambda: storage.telemetry.count(fleet) + c.dropped["queue_full"] >= sent, 20,
                 what="every message stored or counted")
        assert storage.telemetry.count(fleet) + c.dropped["queue_full"] == sent
    storage.close()


def test_retained_state_keeps_its_age(sqlite_url, mosquitto, fleet, serve):
    """A device that went offline an hour ago is not 'seen just now' by a new collector."""
    from edgepack.agent.protocol import encode

    t = Topics(fleet)
    then = time.time() - 3600
    with SyncClient(mosquitto.url) as client:
        client.publish(t.state("old-pi"), encode({"online": False, "board": "rpi4",
                                                   "target": "rpi4", "active": None,
                                                   "ts": then}), retain=True)
    server = serve(sqlite_url, fleet)
    d = wait_for(lambda: server.store.devices.get(fleet, "old-pi"), 10, what="the retained state")
    assert d.online is False and abs(d.last_seen - then) < 1
    row = next(r for r in server.api.device_rows(fleet) if r["device"] == "old-pi")
    assert row["age_s"] > 3500 and row["health"] == "offline"
