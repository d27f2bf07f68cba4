"""Control messages as an attacker who can publish on the broker but holds no signing key sees
them: replays, forgeries, messages for others, expired and withheld ones — all refused."""

from __future__ import annotations

import json
import stat

import pytest
from trust_helpers import DEVICE, FLEET, GROUP, bundle

from edgepack.agent.errors import EdgepackError, ProtocolError
from edgepack.agent.trust import ControlRefused, ControlVerifier, Reason


def refused(device: ControlVerifier, data: bytes, reason: str) -> ControlRefused:
    with pytest.raises(ControlRefused) as info:
        device.verify(data)
    assert info.value.reason == reason, info.value
    assert isinstance(info.value, ProtocolError) and isinstance(info.value, EdgepackError)
    return info.value


def test_genuine_group_desired_state_is_accepted_with_its_keys(device, pki):
    msg = pki.release.desired(group=GROUP, target=bundle("1.0.0"), deployment_id="d-1")
    v = device.verify(msg, kind="desired")
    assert (v.kind, v.scope, v.subject, v.role, v.new) == ("desired", "group", GROUP, "release",
                                                          True)
    assert v.target == bundle("1.0.0") and v.fields["deployment_id"] == "d-1"
    assert v.key_ids == (pki.release_key.public_key.keyid,)


def test_redelivery_of_the_same_message_is_not_new_but_not_refused(device, pki):
    msg = pki.release.desired(group=GROUP, target=bundle(), deployment_id="d-1")
    assert device.verify(msg).new
    assert not device.verify(msg).new  # QoS 1 redelivery, retained message after reconnect


def test_replay_of_an_older_genuine_message_is_refused(device, pki, clock):
    old = pki.release.desired(group=GROUP, target=bundle("1.0.0"), deployment_id="d-1")
    clock.now += 10
    new = pki.release.desired(group=GROUP, target=bundle("2.0.0"), deployment_id="d-2")
    device.verify(old)
    device.verify(new)
    err = refused(device, old, Reason.REPLAYED)
    assert err.key_ids == (pki.release_key.public_key.keyid,)


def test_replay_survives_an_agent_restart(device, pki, clock, trust_dir):
    old = pki.release.desired(group=GROUP, target=bundle("1.0.0"), deployment_id="d-1")
    clock.now += 1
    device.verify(pki.release.desired(group=GROUP, target=bundle("2.0.0"), deployment_id="d-2"))
    again = ControlVerifier(trust_dir, device_id=DEVICE, fleet=FLEET, groups=[GROUP],
                            clock=clock)
    refused(again, old, Reason.REPLAYED)
    ledger = trust_dir / "ledger.json"
    assert stat.S_IMODE(ledger.stat().st_mode) == 0o600


def test_another_message_under_a_used_version_is_refused(device, pki):
    a = pki.release.desired(group=GROUP, target=bundle("1.0.0"), deployment_id="d-1",
                            version=7)
    b = pki.release.desired(group=GROUP, target=bundle("0.9.0"), deployment_id="d-x",
                            version=7)
    device.verify(a)
    refused(device, b, Reason.REPLAYED)


def test_expired_message_is_refused_beyond_the_skew_allowance(device, pki, clock):
    msg = pki.release.desired(group=GROUP, target=bundle(), deployment_id="d-1",
                              lifetime_s=3600)
    clock.now += 3600 + device.skew_s - 1
    assert device.verify(msg)  # within the clock-skew allowance
    clock.now += 2
    refused(device, msg, Reason.EXPIRED)


def test_message_for_another_device_group_or_fleet_is_refused(device, pki):
    refused(device, pki.online.job(device="pi-2", job={"job_id": "j"}), Reason.WRONG_DEVICE)
    refused(device, pki.release.desired(group="doors", target=bundle(), deployment_id="d"),
            Reason.WRONG_GROUP)
    other = pki.signer(pki.release_key, fleet="fleet-b")
    refused(device, other.desired(group=GROUP, target=bundle(), deployment_id="d"),
            Reason.WRONG_FLEET)


def test_unsigned_and_empty_messages_are_refused(device, pki):
    refused(device, b"", Reason.UNSIGNED)
    v1 = {"deployment_id": "d-1", "bundle_id": "a" * 64, "name": "digits", "version": "1.0.0",
          "allow_downgrade": True, "ts": 1.0}
    refused(device, json.dumps(v1).encode(), Reason.UNSIGNED)
    doc = json.loads(pki.release.desired(group=GROUP, target=bundle(), deployment_id="d"))
    doc["signatures"] = []
    refused(device, json.dumps(doc).encode(), Reason.UNSIGNED)


def test_edited_message_fails_its_signature(device, pki):
    doc = json.loads(pki.release.desired(group=GROUP, target=bundle("2.0.0"),
                                         deployment_id="d-1"))
    doc["signed"]["edgepack"]["deployment_id"] = "d-evil"
    err = refused(device, json.dumps(doc).encode(), Reason.BAD_SIGNATURE)
    assert err.key_ids == (pki.release_key.public_key.keyid,)


def test_key_the_root_does_not_know_is_refused(device, pki):
    forged = pki.signer(pki.stranger).desired(group=GROUP, target=bundle(),
                                              deployment_id="d-1")
    err = refused(device, forged, Reason.UNKNOWN_KEY)
    assert err.key_ids == (pki.stranger.public_key.keyid,)


def test_online_key_cannot_sign_what_only_release_keys_may(device, pki):
    refused(device, pki.online.desired(group=GROUP, target=bundle(), deployment_id="d"),
            Reason.WRONG_ROLE)
    refused(device, pki.online.capture(device=DEVICE, request={"inputs": 10}), Reason.WRONG_ROLE)
    refused(device, pki.release.freshness(versions={}), Reason.WRONG_ROLE)


def test_threshold_not_met(tmp_path, pki, clock):
    from datetime import datetime, timezone

    from trust_helpers import NOW, key

    from edgepack.agent.trust import TrustedRoot
    from edgepack.host.fleet.keyring import create_root

    second = key("release-2")
    root = create_root(root_signers=pki.roots[:2], root_threshold=2,
                       release_keys=[pki.release_key.public_key, second.public_key],
                       release_threshold=2, online_keys=[pki.online_key.public_key],
                       expires=datetime.fromtimestamp(NOW + 86400, timezone.utc))
    TrustedRoot.install(tmp_path / "root.json", root)
    dev = ControlVerifier(tmp_path, device_id=DEVICE, fleet=FLEET, groups=[GROUP], clock=clock)
    one = pki.release.desired(group=GROUP, target=bundle(), deployment_id="d-1")
    err = refused(dev, one, Reason.THRESHOLD_NOT_MET)
    assert "1 of the 2" in str(err)
    both = pki.signer(pki.release_key, second).desired(group=GROUP, target=bundle(),
                                                       deployment_id="d-2")
    assert set(dev.verify(both).key_ids) == {pki.release_key.public_key.keyid,
                                             second.public_key.keyid}


def test_online_assignment_needs_a_release_authorization_of_the_same_bundle(device, pki, clock):
    group_msg = pki.release.desired(group=GROUP, target=bundle("2.0.0"), deployment_id="d-2")
    ok = pki.online.desired(device=DEVICE, target=bundle("2.0.0"), deployment_id="d-2",
                            authorization=group_msg)
    v = device.verify(ok)
    assert v.role == "online" and v.authorization.role == "release"
    refused(device, pki.online.desired(device=DEVICE, target=bundle("2.0.0"),
                                       deployment_id="d-3"), Reason.NOT_AUTHORIZED)
    refused(device, pki.online.desired(device=DEVICE, target=bundle("0.1.0"),
                                       deployment_id="d-4", authorization=group_msg),
            Reason.NOT_AUTHORIZED)


def test_online_assignment_cannot_revive_a_superseded_release(device, pki, clock):
    older = pki.release.desired(group=GROUP, target=bundle("1.0.0"), deployment_id="d-1")
    clock.now += 5
    device.verify(pki.release.desired(group=GROUP, target=bundle("2.0.0"), deployment_id="d-2"))
    stale = pki.online.desired(device=DEVICE, target=bundle("1.0.0"), deployment_id="d-1",
                               authorization=older)
    refused(device, stale, Reason.REPLAYED)


def test_clearing_a_desired_state_is_a_signed_message(device, pki):
    v = device.verify(pki.release.desired(device=DEVICE, target=None))
    assert v.target is None


def test_kind_must_match_the_topic(device, pki):
    with pytest.raises(ControlRefused) as info:
        device.verify(pki.online.job(device=DEVICE, job={"job_id": "j"}), kind="desired")
    assert info.value.reason == Reason.MALFORMED


def test_oversized_message_is_refused_before_parsing(device):
    refused(device, b"{" + b" " * (1 << 20) + b"}", Reason.MALFORMED)


def test_freshness_reports_missing_fresh_stale_and_withheld(device, pki, clock):
    assert device.freshness(600).status == "missing"
    device.verify(pki.release.desired(group=GROUP, target=bundle(), deployment_id="d-1",
                                      version=5))
    device.verify(pki.online.freshness(versions={f"desired/group/{GROUP}": 5,
                                                 "desired/group/doors": 9}))
    s = device.freshness(600)
    assert (s.status, s.behind) == ("fresh", ())
    assert s.key_ids == (pki.online_key.public_key.keyid,)
    # The fleet server vouches for a newer group state than the device got: it was withheld.
    clock.now += 1
    device.verify(pki.online.freshness(versions={f"desired/group/{GROUP}": 6}))
    assert device.freshness(600).behind == (f"desired/group/{GROUP}",)
    # Freshness withheld beyond the operator's bound: stale.
    clock.now += 601
    assert device.freshness(600).status == "stale"


def test_replayed_freshness_cannot_refresh_a_frozen_device(device, pki, clock):
    first = pki.online.freshness(versions={})
    device.verify(first)
    clock.now += 60
    device.verify(pki.online.freshness(versions={}))
    refused(device, first, Reason.REPLAYED)


def test_float_in_signed_fields_is_malformed_not_a_crash(device, pki):
    doc = json.loads(pki.online.job(device=DEVICE, job={"job_id": "j", "runs": 5}))
    doc["signed"]["edgepack"]["job"]["runs"] = 5.5
    refused(device, json.dumps(doc).encode(), Reason.MALFORMED)


def test_garbage_and_foreign_metadata_are_malformed(device, pki):
    refused(device, b"\xff\xfe not json", Reason.UNSIGNED)
    refused(device, pki.root(), Reason.MALFORMED)  # root metadata where control belongs
    doc = json.loads(pki.release.desired(group=GROUP, target=bundle(), deployment_id="d"))
    doc["signatures"].append(dict(doc["signatures"][0]))  # one key counted twice
    refused(device, json.dumps(doc).encode(), Reason.MALFORMED)
