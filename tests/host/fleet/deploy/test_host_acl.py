"""The shipped Mosquitto config and ACL on a real Mosquitto: mutual TLS, devices confined.

Device certificates come from a private CA made here; the broker runs the config and ACL
from firmware_configs/mosquitto/ (see shipped_mosquitto.py for the few rewrites).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from shipped_mosquitto import SecureBroker, start_shipped_mosquitto

from edgepack.agent.errors import BrokerError
from edgepack.agent.mqtt import BrokerConfig
from edgepack.agent.protocol import DesiredState, Topics, encode
from edgepack.host.fleet.client import SyncClient

FLEET = "acl"
T = Topics(FLEET)
BID = "c" * 64


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    b = start_shipped_mosquitto(tmp_path_factory.mktemp("secure-mosquitto"),
                                {"dev-a": "secret-a", "dev-b": "secret-b"})
    yield b
    b.stop()


def _device(b: SecureBroker, cn: str, **kw) -> SyncClient:
    cert = b.device_cert(cn)
    cfg = BrokerConfig(host="127.0.0.1", port=b.device_port, tls=True,
                       ca=str(b.device_ca.cert_path), cert=str(cert.cert), key=str(cert.key),
                       connect_timeout=5, **kw)
    return SyncClient(cfg, timeout=5)


def _operator(b: SecureBroker, cn: str = "edgepack-host") -> SyncClient:
    cert = b.operator_ca.issue(cn)
    cfg = BrokerConfig(host="127.0.0.1", port=b.operator_port, tls=True,
                       ca=str(b.device_ca.cert_path), cert=str(cert.cert), key=str(cert.key),
                       connect_timeout=5)
    return SyncClient(cfg, timeout=5)


def _password_device(b: SecureBroker, user: str, password: str) -> SyncClient:
    cfg = BrokerConfig(host="127.0.0.1", port=b.password_port, tls=True,
                       ca=str(b.device_ca.cert_path), username=user, password=password,
                       connect_timeout=5)
    return SyncClient(cfg, timeout=5)


def _drain(c: SyncClient, quiet: float = 0.5) -> dict[str, list[bytes]]:
    got: dict[str, list[bytes]] = {}
    while (m := c.get(quiet)) is not None:
        got.setdefault(m[0], []).append(m[1])
    return got


@pytest.fixture(scope="module")
def seeded(secure: SecureBroker) -> SecureBroker:
    """Desired states for dev-a and dev-b, a group deployment and a bundle manifest."""
    with _operator(secure) as op:
        for dev in ("dev-a", "dev-b"):
            op.publish(T.desired(dev), encode(DesiredState(
                f"dep-{dev}", BID, "m", "1.0.0").to_payload()), retain=True)
        op.publish(T.group_desired("g1"), encode(DesiredState(
            "dep-g1", BID, "m", "1.0.0").to_payload()), retain=True)
        op.publish(T.bundle_manifest(BID), b'{"manifest": {}}', retain=True)
    return secure


def test_device_reads_its_own_desired_groups_and_bundles_only(seeded: SecureBroker) -> None:
    with _device(seeded, "dev-a") as a:
        a.subscribe(T.desired("dev-a"))
        a.subscribe(T.desired("dev-b"))
        a.subscribe(T.prefix + "devices/+/desired")
        a.subscribe(T.prefix + "groups/+/desired")
        a.subscribe(T.prefix + "bundles/#")
        a.subscribe("#")
        got = _drain(a)

    assert T.desired("dev-a") in got
    assert T.group_desired("g1") in got
    assert T.bundle_manifest(BID) in got
    assert T.desired("dev-b") not in got
    assert not any("dev-b" in topic for topic in got)


def test_device_cannot_publish_as_another_device(seeded: SecureBroker) -> None:
    with _operator(seeded) as op, _device(seeded, "dev-a") as a:
        op.subscribe(T.prefix + "devices/#")
        op.subscribe(T.prefix + "bundles/#")
        op.subscribe(T.prefix + "groups/#")
        _drain(op, 0.3)  # the retained seed

        a.publish(T.telemetry("dev-b"), b'{"forged": true}')
        a.publish(T.state("dev-b"), b'{"online": false}', retain=True)
        a.publish(T.events("dev-b"), b'{"kind": "installed"}')
        a.publish(T.desired("dev-a"), b'{"self": "deployed"}', retain=True)
        a.publish(T.group_desired("g1"), b'{"hijack": true}', retain=True)
        a.publish(T.bundle_manifest(BID), b'{"evil": true}', retain=True)
        a.publish(T.telemetry("dev-a"), b'{"inferences": 1}')
        a.publish(T.state("dev-a"), b'{"online": true}', retain=True)
        a.publish(T.events("dev-a"), b'{"kind": "verified"}')
        got = _drain(op)

    assert got == {T.telemetry("dev-a"): [b'{"inferences": 1}'],
                   T.state("dev-a"): [b'{"online": true}'],
                   T.events("dev-a"): [b'{"kind": "verified"}']}


def test_a_device_cannot_take_over_another_session(seeded: SecureBroker) -> None:
    # use_username_as_clientid: whatever client id dev-a asks for, it is "dev-a"
    with _device(seeded, "dev-b") as b:
        b.subscribe(T.desired("dev-b"))
        assert b.get(2) is not None  # the retained desired state
        a = _device(seeded, "dev-a")
        a._client._client_id = b"dev-b"  # noqa: SLF001 - forge the victim's client id
        with a:
            a.publish(T.telemetry("dev-a"), b"{}")
        b.publish(T.telemetry("dev-b"), b"{}")
    assert "Client dev-b already connected" not in seeded.log()
    assert "as dev-a (p2" in seeded.log()  # the forged id was replaced by the identity


def test_unknown_ca_missing_cert_and_wrong_listener_are_refused(seeded: SecureBroker) -> None:
    rogue = seeded.rogue_ca.issue("dev-a")
    for cert, key, port in (
            (str(rogue.cert), str(rogue.key), seeded.device_port),   # cert from an unknown CA
            (None, None, seeded.device_port),                        # no client certificate
            (str(seeded.device_cert("edgepack-host").cert),          # device CA on operator port
             str(seeded.device_cert("edgepack-host").key), seeded.operator_port)):
        cfg = BrokerConfig(host="127.0.0.1", port=port, tls=True, ca=str(seeded.device_ca.cert_path),
                           cert=cert, key=key, connect_timeout=1.5)
        # TLS 1.3 reports a refused client certificate only after the handshake: the CONNACK
        # never comes, and SyncClient gives up after connect_timeout
        with pytest.raises(BrokerError), SyncClient(cfg, timeout=3):
            pass


def test_broker_certificate_is_verified(seeded: SecureBroker) -> None:
    cert = seeded.device_cert("dev-a")
    cfg = BrokerConfig(host="127.0.0.1", port=seeded.device_port, tls=True,
                       ca=str(seeded.rogue_ca.cert_path), cert=str(cert.cert), key=str(cert.key),
                       connect_timeout=3)
    with pytest.raises(BrokerError, match="cannot reach|refused|did not answer"), \
            SyncClient(cfg, timeout=3):
        pass


def test_password_listener_uses_the_same_acl(seeded: SecureBroker) -> None:
    with _password_device(seeded, "dev-a", "secret-a") as a, _operator(seeded) as op:
        a.subscribe(T.prefix + "devices/+/desired")
        got = _drain(a)
        assert list(got) == [T.desired("dev-a")]

        op.subscribe(T.prefix + "devices/+/telemetry")
        a.publish(T.telemetry("dev-b"), b"forged")
        a.publish(T.telemetry("dev-a"), b"mine")
        assert _drain(op) == {T.telemetry("dev-a"): [b"mine"]}

    with pytest.raises(BrokerError, match="refused"), \
            _password_device(seeded, "dev-a", "wrong"):
        pass
