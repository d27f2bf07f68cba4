"""Broker limits: the embedded broker, given a message size limit, passes nothing bigger on (a
3.1.1 client cannot ask for a Maximum Packet Size); the collector's MQTT 5 limit."""

from __future__ import annotations

import queue

from edgepack.agent.mqtt import MqttClient, parse_broker_url
from edgepack.host.fleet.broker import MAX_MESSAGE_BYTES, EmbeddedBroker
from edgepack.host.fleet.collector.subscription import MAXIMUM_PACKET_SIZE


def test_embedded_broker_drops_oversized_messages() -> None:
    assert MAX_MESSAGE_BYTES >= MAXIMUM_PACKET_SIZE >= 1 << 20  # 1 MiB chunks always pass
    with EmbeddedBroker(port=0, max_message_bytes=10_000) as broker:
        got: queue.Queue = queue.Queue()
        cfg = parse_broker_url(broker.url)
        sub = MqttClient(cfg, "limits-sub", handler=got.put)
        pub = MqttClient(cfg, "limits-pub")
        for c in (sub, pub):
            c.connect()
            c.loop_start()
            c.wait_connected()
        try:
            sub.subscribe("limits/#")
            while got.get(timeout=10)[0] != "suback":
                pass
            pub.publish("limits/a", b"x" * 20_000, retain=True, wait=10)
            pub.publish("limits/a", b"small", wait=10)
            while (e := got.get(timeout=10))[0] != "message":
                pass
            assert e[1:3] == ("limits/a", b"small")
        finally:
            sub.close()
            pub.close()


def test_collector_never_receives_an_oversized_message(sqlite_url, mosquitto, fleet, serve):
    """The collector connects with MQTT 5 and a Maximum Packet Size: Mosquitto (which accepts
    any size here) drops a 4 MB message for it; the next small one arrives."""
    from fleet_helpers import wait_for

    from edgepack.agent.protocol import Topics

    server = serve(sqlite_url, fleet)
    assert server.collector.stats()["protocol"] == "5"
    pub = MqttClient(parse_broker_url(mosquitto.url), f"{fleet}-big")
    pub.connect()
    pub.loop_start()
    pub.wait_connected()
    try:
        topic = Topics(fleet).telemetry("dev-big")
        pub.publish(topic, b'{"junk": "' + b"a" * 4_000_000 + b'"}', wait=30)
        pub.publish(topic, b'{"device_id": "dev-big", "ts": 1}', wait=10)
        wait_for(lambda: server.collector.stats()["received"].get("telemetry", 0) >= 1, 15,
                 what="the small message")
        assert server.collector.stats()["received"]["telemetry"] == 1
    finally:
        pub.close()
