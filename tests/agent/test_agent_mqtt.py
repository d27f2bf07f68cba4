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
