"""The MQTT wrapper against a real Mosquitto: paho's codes become exceptions carrying them."""

from __future__ import annotations

import queue

import pytest
from brokers import Mosquitto, free_port, start_mosquitto

from edgepack.agent.errors import BrokerError
from edgepack.agent.mqtt import (
    BrokerConfig,
    Connection,
    ConnectionRefused,
    MqttClient,
    MqttError,
    NotConnected,
    parse_broker_url,
)

pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
def closed_broker() -> Mosquitto:
    """A broker that refuses anonymous clients."""
    broker = start_mosquitto("allow_anonymous false")
    yield broker
    broker.stop()


def test_refused_connection_raises_with_the_reason_code(closed_broker: Mosquitto) -> None:
    client = MqttClient(parse_broker_url(closed_broker.url, connect_timeout=5), "refused-1")
    client.connect()
    client.loop_start()
    try:
        with pytest.raises(ConnectionRefused, match="refused the connection") as err:
            client.wait_connected()
    finally:
        client.close()
    assert isinstance(err.value, BrokerError) and err.value.op == "connect"
    assert err.value.rc is not None and err.value.rc.is_failure
    assert "Not authorized" in str(err.value.rc)


def test_unreachable_broker_raises_at_connect() -> None:
    client = MqttClient(BrokerConfig(port=free_port(), connect_timeout=2), "nobody-home")
    with pytest.raises(MqttError, match="cannot reach the broker"):
        client.connect()


def test_operations_without_a_connection_raise_not_connected(mosquitto: Mosquitto,
                                                             fleet: str) -> None:
    events: queue.Queue = queue.Queue()
    client = MqttClient(parse_broker_url(mosquitto.url), f"{fleet}-w", handler=events.put)
    client.connect()
    client.loop_start()
    client.wait_connected()
    assert events.get(timeout=5)[0] == "connected"
    mid = client.publish(f"{fleet}/x", b"1", qos=1, wait=5.0)
    assert mid > 0
    client.disconnect()
    client.loop_stop()
    for call in (lambda: client.publish(f"{fleet}/x", b"2"),
                 lambda: client.subscribe(f"{fleet}/#"),
                 lambda: client.unsubscribe(f"{fleet}/#")):
        with pytest.raises(NotConnected) as err:
            call()
        assert err.value.rc is not None and err.value.op in ("publish", "subscribe",
                                                              "unsubscribe")


def test_connection_reconnects_with_a_new_generation(fleet: str) -> None:
    broker = start_mosquitto()
    inbox: queue.Queue = queue.Queue()
    conn = Connection(parse_broker_url(broker.url, connect_timeout=3), f"{fleet}-agent",
                      (f"{fleet}/state", b"{}", 1, True), inbox, 0.05, 0.2)
    with pytest.raises(NotConnected):
        conn.publish(f"{fleet}/x", b"before")
    conn.start()
    try:
        kind, gen, *_ = inbox.get(timeout=10)
        assert kind == "connected" and gen == 1
        assert conn.publish(f"{fleet}/x", b"1")[0] == 1
        broker.restart()
        seen = []
        while not (seen and seen[-1][0] == "connected"):
            item = inbox.get(timeout=15)
            seen.append(item[:2])
        assert ("disconnected", 1) in seen and seen[-1][1] > 1
        assert conn.publish(f"{fleet}/x", b"2")[0] == seen[-1][1]
    finally:
        conn.close(None, connected=True)
        broker.stop()


def test_mqtt5_session_and_suback_codes(mosquitto: Mosquitto, fleet: str) -> None:
    events: queue.Queue = queue.Queue()
    client = MqttClient(parse_broker_url(mosquitto.url), f"{fleet}-v5", handler=events.put,
                        mqtt5=True, clean_session=False, session_expiry_s=60)
    client.connect()
    client.loop_start()
    try:
        client.wait_connected()
        mid = client.subscribe([f"$share/g/{fleet}/a", f"{fleet}/b"])
        while True:
            e = events.get(timeout=5)
            if e[0] == "suback":
                break
        assert e[1] == mid and len(e[2]) == 2 and not any(c.is_failure for c in e[2])
    finally:
        client.close()


def test_connection_speaks_mqtt5_with_a_maximum_packet_size(mosquitto: Mosquitto,
                                                             fleet: str) -> None:
    """The broker drops what is bigger than the agent's Maximum Packet Size: it never reaches
    the device's memory; smaller messages still arrive, retained ones included."""
    inbox: queue.Queue = queue.Queue()
    conn = Connection(parse_broker_url(mosquitto.url, connect_timeout=5), f"{fleet}-max",
                      (f"{fleet}/state", b"{}", 1, True), inbox, 0.05, 0.2,
                      max_packet_size=64 * 1024)
    sender = MqttClient(parse_broker_url(mosquitto.url), f"{fleet}-sender")
    sender.connect()
    sender.loop_start()
    conn.start()
    try:
        sender.wait_connected()
        sender.publish(f"{fleet}/big/retained", b"r" * 200_000, retain=True, wait=5)
        assert inbox.get(timeout=10)[0] == "connected" and conn.speaking == "5"
        conn.subscribe([f"{fleet}/big/#"])
        sender.publish(f"{fleet}/big/x", b"x" * 100_000, wait=5)
        sender.publish(f"{fleet}/big/x", b"small", wait=5)
        got = []
        while not got or got[-1] != b"small":
            item = inbox.get(timeout=10)
            if item[0] == "message":
                got.append(item[3])
        assert got == [b"small"]  # neither the 200 kB retained nor the 100 kB message
    finally:
        sender.publish(f"{fleet}/big/retained", b"", retain=True, wait=5)
        sender.close()
        conn.close(None, connected=True)


def test_connection_falls_back_to_mqtt311(amqtt_broker, fleet: str) -> None:
    """The embedded broker speaks MQTT 3.1.1 only: the agent connects anyway."""
    inbox: queue.Queue = queue.Queue()
    conn = Connection(parse_broker_url(amqtt_broker.url, connect_timeout=5), f"{fleet}-old",
                      (f"{fleet}/state", b"{}", 1, True), inbox, 0.05, 0.2,
                      max_packet_size=64 * 1024)
    conn.start()
    try:
        while (item := inbox.get(timeout=15))[0] != "connected":
            assert item[0] in ("connect_failed", "refused", "disconnected"), item
        assert conn.speaking == "3.1.1"
        conn.subscribe([f"{fleet}/x"])
        conn.publish(f"{fleet}/x", b"hello")
        while (item := inbox.get(timeout=10))[0] != "message":
            pass
        assert item[3] == b"hello"
    finally:
        conn.close(None, connected=True)


def test_inbox_keeps_the_latest_desired_state_and_sheds_the_rest() -> None:
    from edgepack.agent.inbox import Inbox

    inbox = Inbox(max_bytes=1000, max_messages=5)
    inbox.keep_latest(["d"])
    inbox.put(("connected", 1, False))
    for i in range(20_000):
        inbox.put(("message", 1, "d", b"v%d" % i, True))
    for _ in range(20):
        inbox.put(("message", 1, "chunk", b"c" * 100, False))
    for i in range(50):
        inbox.put(("puback", 1, i))  # events are never shed
    assert len(inbox) == 1 + 1 + 5 + 50
    assert inbox.get_nowait()[0] == "connected"
    assert inbox.get_nowait() == ("message", 1, "d", b"v19999", True)  # the newest, in place
    assert inbox.replaced == 19_999 and inbox.dropped == 15
    assert [inbox.get_nowait()[2] for _ in range(5)] == ["chunk"] * 5
    inbox.put(("message", 1, "chunk", b"c" * 900, False))  # room again
    inbox.put(("message", 1, "d", b"again", True))  # a new wait for "d" after it was taken
    rest = [inbox.get_nowait() for _ in range(52)]
    assert [r[0] for r in rest[:50]] == ["puback"] * 50
    assert rest[50][3] == b"c" * 900 and rest[51][3] == b"again"
    with pytest.raises(queue.Empty):
        inbox.get(timeout=0.01)


def test_broker_limits_in_the_config() -> None:
    from edgepack.agent.config import ConfigError, parse_config

    base = {"device_id": "d1", "data_dir": "/tmp/x", "target": "rpi4", "allow_unsigned": True}
    cfg = parse_config(base)
    assert (cfg.broker.protocol, cfg.broker.max_packet_kb) == ("auto", 1088)
    assert cfg.broker.max_packet_kb * 1024 > (1 << 20) + 65_535  # a 1 MiB chunk + topic fits
    for key, value in (("protocol", "4"), ("max_packet_kb", 8), ("inbox_max_mb", 0)):
        with pytest.raises(ConfigError, match=r"broker"):
            parse_config({**base, "broker": {key: value}})
