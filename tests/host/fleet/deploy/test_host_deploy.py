"""``deploy``: desired states for devices and groups, by bundle id or file; clear errors."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from host_helpers import publish_manifest_only

from edgepack.agent.errors import BundleError, InstallError, ProtocolError
from edgepack.agent.protocol import Topics, check_id, encode, parse_desired
from edgepack.host.cli import main
from edgepack.host.fleet.client import SyncClient
from edgepack.host.fleet.deploy import deploy, wait_for_deployment


def _retained(url: str, topic: str) -> bytes | None:
    with SyncClient(url, timeout=10) as c:
        return c.retained(topic, settle=0.3).get(topic)


def test_deploy_by_id_to_a_device(any_broker: str, fleet: str, make_bundle) -> None:
    bid = publish_manifest_only(any_broker, fleet, make_bundle(version="1.2.0"))

    result = deploy(bid, broker=any_broker, device="pi-kitchen", fleet=fleet, lookup_timeout=1)

    desired = parse_desired(_retained(any_broker, Topics(fleet).desired("pi-kitchen")))
    assert desired.bundle_id == bid
    assert (desired.name, desired.version) == ("tiny", "1.2.0")
    assert desired.deployment_id == result.deployment_id
    check_id(desired.deployment_id, "deployment id")
    assert desired.allow_downgrade is False and desired.ts > 0
    assert result.published is False and result.device == "pi-kitchen"
    assert any("has not reported a state" in w for w in result.warnings)


def test_deploy_by_id_to_a_group_with_downgrade(mosquitto, fleet: str, make_bundle) -> None:
    bid = publish_manifest_only(mosquitto.url, fleet, make_bundle(version="0.9.0"))

    first = deploy(bid, broker=mosquitto.url, group="rpi4-fleet", fleet=fleet,
                   allow_downgrade=True)
    second = deploy(bid, broker=mosquitto.url, group="rpi4-fleet", fleet=fleet,
                    allow_downgrade=True)

    desired = parse_desired(_retained(mosquitto.url, Topics(fleet).group_desired("rpi4-fleet")))
    assert desired.bundle_id == bid and desired.version == "0.9.0"
    assert desired.allow_downgrade is True
    assert desired.deployment_id == second.deployment_id != first.deployment_id
    # without a release key the desired state is protocol v1, unsigned: deploy says so
    assert second.topic.endswith("/groups/rpi4-fleet/desired")
    assert len(second.warnings) == 1 and "unsigned (protocol v1)" in second.warnings[0]


def test_deploy_signs_desired_states_with_the_release_key(mosquitto, fleet, make_bundle,
                                                          signing_key) -> None:
    """Protocol v2: the desired state is release-signed metadata naming the bundle's sha256,
    length, name and version; versions only go up; a device downgrade comes with a signed
    authorization for that device, a group downgrade warns (authorizations are per device)."""
    from edgepack.agent.trust import parse_control

    path = make_bundle(version="0.8.0")
    bid = publish_manifest_only(mosquitto.url, fleet, path)
    t = Topics(fleet)
    first = deploy(bid, broker=mosquitto.url, device="pi-v2", fleet=fleet, key=signing_key[0],
                   lookup_timeout=0.5)
    one = parse_control(_retained(mosquitto.url, t.desired("pi-v2")))
    second = deploy(bid, broker=mosquitto.url, device="pi-v2", fleet=fleet,
                    key=signing_key[0], allow_downgrade=True, lookup_timeout=0.5)
    two = parse_control(_retained(mosquitto.url, t.desired("pi-v2")))
    assert (one.kind, one.scope, one.subject, one.fleet) == ("desired", "device", "pi-v2", fleet)
    assert one.target.bundle_id == bid and one.target.version == "0.8.0"
    assert one.fields["deployment_id"] == first.deployment_id
    assert two.version > one.version and two.fields["deployment_id"] == second.deployment_id
    assert parse_desired(_retained(mosquitto.url, t.desired("pi-v2"))).bundle_id == bid
    auth = parse_control(_retained(mosquitto.url, t.downgrade("pi-v2")))
    assert auth.kind == "downgrade" and auth.target == two.target
    assert not any("unsigned" in w for w in first.warnings + second.warnings)
    group = deploy(bid, broker=mosquitto.url, group="g2", fleet=fleet, key=signing_key[0],
                   allow_downgrade=True)
    assert any("per device" in w for w in group.warnings)


def test_deploy_by_unique_id_prefix(mosquitto, fleet: str, make_bundle) -> None:
    bid = publish_manifest_only(mosquitto.url, fleet, make_bundle(version="3.0.0"))
    publish_manifest_only(mosquitto.url, fleet, make_bundle(version="3.0.1"))

    result = deploy(bid[:12], broker=mosquitto.url, group="g1", fleet=fleet)

    assert result.bundle_id == bid and result.version == "3.0.0"


def test_cli_unknown_bundle_id_fails_clearly(mosquitto, fleet: str) -> None:
    r = CliRunner().invoke(main, ["deploy", "ab" * 32, "--device", "pi-kitchen",
                                  "--broker", mosquitto.url, "--fleet", fleet])

    assert r.exit_code == 1
    assert "error: bundle abababababababab is not published" in r.output
    assert "edgepack publish" in r.output
    assert _retained(mosquitto.url, Topics(fleet).desired("pi-kitchen")) is None


def test_not_a_file_nor_an_id(mosquitto, fleet: str) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        deploy("dist/missing.edgepack", broker=mosquitto.url, device="d1", fleet=fleet)
    with pytest.raises(BundleError, match="neither a bundle file nor a bundle id"):
        deploy("latest", broker=mosquitto.url, device="d1", fleet=fleet)


@pytest.mark.parametrize("bad", ["pi/kitchen", "pi+kitchen", "#", "", "pi kitchen"])
def test_invalid_device_id_is_refused_before_anything_is_written(mosquitto, fleet: str,
                                                                 bad: str) -> None:
    with pytest.raises(ProtocolError, match="device id .* is not allowed"):
        deploy("ab" * 32, broker=mosquitto.url, device=bad, fleet=fleet)

    r = CliRunner().invoke(main, ["deploy", "ab" * 32, "--device", bad,
                                  "--broker", mosquitto.url, "--fleet", fleet])
    assert r.exit_code == 2
    assert "Invalid value for '--device'" in r.output and "no '/', '+', '#'" in r.output


def test_invalid_group_and_target_choice(mosquitto, fleet: str) -> None:
    r = CliRunner().invoke(main, ["deploy", "ab" * 32, "--group", "a/b", "--broker",
                                  mosquitto.url])
    assert r.exit_code == 2 and "group name 'a/b' is not allowed" in r.output
    r = CliRunner().invoke(main, ["deploy", "ab" * 32, "--broker", mosquitto.url])
    assert r.exit_code == 2 and "exactly one of --device or --group" in r.output
    r = CliRunner().invoke(main, ["deploy", "ab" * 32, "--device", "a", "--group", "b",
                                  "--broker", mosquitto.url])
    assert r.exit_code == 2


def test_cli_json_and_warnings_from_device_state(mosquitto, fleet: str, make_bundle) -> None:
    bid = publish_manifest_only(mosquitto.url, fleet, make_bundle(version="1.0.0"))
    state = {"online": True, "board": "rpi5", "target": "rpi5",
             "active": {"bundle_id": "cd" * 32, "name": "tiny", "version": "2.0.0"}}
    with SyncClient(mosquitto.url) as c:
        c.publish(Topics(fleet).state("pi-1"), encode(state), retain=True)

    r = CliRunner().invoke(main, ["deploy", bid, "--device", "pi-1", "--broker", mosquitto.url,
                                  "--fleet", fleet, "--json"])

    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["bundle_id"] == bid and out["device"] == "pi-1" and out["group"] is None
    assert any("reports target rpi5" in w for w in out["warnings"])
    assert any("downgrade" in w for w in out["warnings"])


def test_deploy_a_bundle_file(mosquitto, fleet: str, make_bundle, signing_key) -> None:
    pytest.importorskip("edgepack.host.fleet.publish")
    path: Path = make_bundle(version="4.0.0")

    first = deploy(path, broker=mosquitto.url, device="pi-file", fleet=fleet,
                   key=signing_key[0], lookup_timeout=1)
    second = deploy(path, broker=mosquitto.url, device="pi-file", fleet=fleet,
                    key=signing_key[0], lookup_timeout=1)

    assert first.published is True and second.published is False
    topic = Topics(fleet).bundle_manifest(first.bundle_id)
    assert _retained(mosquitto.url, topic) is not None
    desired = parse_desired(_retained(mosquitto.url, Topics(fleet).desired("pi-file")))
    assert desired.bundle_id == first.bundle_id and desired.version == "4.0.0"


def test_wait_for_deployment_success_and_failure(mosquitto, fleet: str, make_bundle) -> None:
    bid = publish_manifest_only(mosquitto.url, fleet, make_bundle(version="5.0.0"))
    t = Topics(fleet)
    dep = deploy(bid, broker=mosquitto.url, device="pi-w", fleet=fleet, lookup_timeout=0.5)

    done = threading.Event()

    def device_reports(topic: str, payload: dict, retain: bool) -> threading.Thread:
        # events are not retained: repeat until the waiter has seen one
        def run() -> None:
            with SyncClient(mosquitto.url) as c:
                while not done.wait(0.2):
                    c.publish(topic, encode(payload), retain=retain)
        done.clear()
        th = threading.Thread(target=run)
        th.start()
        return th

    th = device_reports(t.state("pi-w"), {"online": True, "slot": "b", "active": {
        "bundle_id": bid, "name": "tiny", "version": "5.0.0"}}, True)
    try:
        state = wait_for_deployment(mosquitto.url, dep, timeout=10)
    finally:
        done.set()
        th.join()
    assert state["slot"] == "b"

    dep2 = deploy(bid, broker=mosquitto.url, device="pi-x", fleet=fleet, lookup_timeout=0.5)
    th = device_reports(t.events("pi-x"), {"kind": "rejected", "bundle_id": bid,
                                           "deployment_id": dep2.deployment_id,
                                           "detail": "wrong target"}, False)
    try:
        with pytest.raises(InstallError, match="rejected: wrong target"):
            wait_for_deployment(mosquitto.url, dep2, timeout=10)
    finally:
        done.set()
        th.join()


def test_cli_deploy_a_bundle_file_to_a_group(mosquitto, fleet: str, make_bundle,
                                             signing_key) -> None:
    pytest.importorskip("edgepack.host.fleet.publish")
    path: Path = make_bundle(version="4.1.0")

    r = CliRunner().invoke(main, ["deploy", str(path), "--group", "rpi4-fleet", "--broker",
                                  mosquitto.url, "--fleet", fleet, "--key", str(signing_key[0])])

    assert r.exit_code == 0, r.output
    assert "deployed tiny 4.1.0" in r.output and "(bundle published first)" in r.output
    desired = parse_desired(_retained(mosquitto.url, Topics(fleet).group_desired("rpi4-fleet")))
    assert desired.version == "4.1.0"
