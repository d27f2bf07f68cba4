"""The embedded broker: big retained payloads, clean start and stop, the ``broker`` command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from edgepack.agent.errors import BrokerError
from edgepack.host.fleet.broker import EmbeddedBroker, is_loopback
from edgepack.host.fleet.client import SyncClient


def test_retained_1mb_and_20mb_reach_a_fresh_client(embedded_broker: EmbeddedBroker,
                                                    fleet: str) -> None:
    small, big = os.urandom(1 << 20), os.urandom(20 << 20)
    with SyncClient(embedded_broker.url, timeout=30) as pub:
        pub.publish(f"{fleet}/small", small, retain=True)
        pub.publish(f"{fleet}/big", big, retain=True)

    with SyncClient(embedded_broker.url, timeout=30) as sub:
        # a 20 MB message can take seconds to arrive on a loaded machine: wait for quiet longer
        # than the default half second (the broker is what this test is about)
        got = sub.retained(f"{fleet}/#", settle=5.0)

    assert got == {f"{fleet}/small": small, f"{fleet}/big": big}


def test_port_in_use_is_a_clear_error(embedded_broker: EmbeddedBroker) -> None:
    with pytest.raises(BrokerError, match="cannot listen.*another `port=`"):
        EmbeddedBroker(port=embedded_broker.port).start()


def test_stop_drops_clients_and_frees_the_port() -> None:
    b = EmbeddedBroker(port=0).start()
    port = b.port
    with SyncClient(b.url, timeout=5) as c:
        c.publish("x/y", b"1", retain=True)
    b.stop()
    assert not b.running

    again = EmbeddedBroker(port=port).start()  # the same port is free again at once
    try:
        with SyncClient(again.url, timeout=5) as c:
            assert c.retained("x/#", settle=0.2) == {}  # in memory: nothing survives a stop
    finally:
        again.stop()


def test_loopback_detection() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")


def test_broker_command_serves_until_sigterm() -> None:
    from brokers import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", "from edgepack.host.cli import main; main()", "broker",
         "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert f"listening on mqtt://127.0.0.1:{port}" in line
        with SyncClient(f"mqtt://127.0.0.1:{port}", timeout=5) as c:
            c.publish("t/retained", b"hello", retain=True)
            assert c.retained("t/#") == {"t/retained": b"hello"}
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "broker stopped" in out
    assert "Traceback" not in err


def test_broker_command_port_in_use(embedded_broker: EmbeddedBroker) -> None:
    from click.testing import CliRunner

    from edgepack.host.cli import main

    r = CliRunner().invoke(main, ["broker", "--port", str(embedded_broker.port)])
    assert r.exit_code == 1
    assert "error: the embedded broker cannot listen" in r.output


def test_a_new_client_gets_only_the_retained_messages_it_subscribed_to(
        embedded_broker: EmbeddedBroker, fleet: str) -> None:
    # amqtt 0.12 sends every connecting client the retained messages of every filter any
    # session holds; edgepack's broker must not (a device would see others' desired states).
    other, mine = f"{fleet}/devices/other/desired", f"{fleet}/devices/me/telemetry"
    with SyncClient(embedded_broker.url) as pub:
        pub.publish(other, b"for someone else", retain=True)
    holder = SyncClient(embedded_broker.url)
    holder.connect()
    try:
        holder.subscribe(other)
        assert holder.get(2) is not None
        with SyncClient(embedded_broker.url) as c:
            c.subscribe(mine)
            assert c.get(1.5) is None
    finally:
        holder.close()
