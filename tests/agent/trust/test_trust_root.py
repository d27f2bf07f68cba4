"""Root rotation: a device walks root N → N+1 when a threshold of both roots signed it, and
rotating any key, root included, needs no hand on the device."""

from __future__ import annotations

import json
import stat
from datetime import datetime, timezone

import pytest
from trust_helpers import DEVICE, GROUP, NOW, bundle, key

from edgepack.agent.trust import ControlRefused, Reason, RootRefused, TrustedRoot
from edgepack.host.fleet.keyring import rotate_root

EXPIRES = datetime.fromtimestamp(NOW + 365 * 86400, timezone.utc)


def rotate(current: bytes, signers, **roles) -> bytes:
    return rotate_root(current, signers=signers, roles=roles, expires=EXPIRES)


def test_root_file_is_private(trust_dir):
    assert stat.S_IMODE((trust_dir / "root.json").stat().st_mode) == 0o600


def test_first_root_must_meet_its_own_threshold(tmp_path, pki):
    doc = json.loads(pki.root())
    doc["signatures"] = doc["signatures"][:1]
    with pytest.raises(RootRefused) as info:
        TrustedRoot.install(tmp_path / "root.json", json.dumps(doc).encode())
    assert info.value.reason == Reason.THRESHOLD_NOT_MET


def test_rotating_the_online_key_is_accepted_and_takes_effect(device, pki):
    new_online = key("online-2")
    v2 = rotate(pki.root(), pki.roots[:2], online=([new_online.public_key], 1))
    update = device.update_root(v2)
    assert (update.from_version, update.to_version, update.changed_roles) == (1, 2, ("online",))
    with pytest.raises(ControlRefused) as info:
        device.verify(pki.online.freshness(versions={}))
    assert info.value.reason == Reason.UNKNOWN_KEY
    assert device.verify(pki.signer(new_online).freshness(versions={})).role == "online"


def test_rotating_root_keys_needs_both_thresholds(device, pki):
    r4, r5 = key("root-4"), key("root-5")
    new_roots = ([r4.public_key, r5.public_key, pki.roots[2].public_key], 2)
    current = pki.root()
    # only the new keys signed: the device's current root did not agree
    with pytest.raises(RootRefused) as info:
        device.update_root(rotate(current, [r4, r5], root=new_roots))
    assert info.value.reason in (Reason.UNKNOWN_KEY, Reason.THRESHOLD_NOT_MET)
    # only the old keys signed: the new root's own threshold is not met
    with pytest.raises(RootRefused) as info:
        device.update_root(rotate(current, pki.roots[:2], root=new_roots))
    assert info.value.reason == Reason.UNKNOWN_KEY and "new root" in str(info.value)
    # one old key short of the old threshold
    with pytest.raises(RootRefused) as info:
        device.update_root(rotate(current, pki.roots[:1] + [r4, r5], root=new_roots))
    assert info.value.reason == Reason.THRESHOLD_NOT_MET
    assert device.root.version == 1
    # both thresholds: accepted, persisted
    device.update_root(rotate(current, pki.roots[:2] + [r4, r5], root=new_roots))
    assert device.root.version == 2
    assert TrustedRoot.load(device.root.path).version == 2


def test_tampered_root_is_refused(device, pki):
    doc = json.loads(rotate(pki.root(), pki.roots[:2], online=([key("x").public_key], 1)))
    doc["signed"]["roles"]["targets"]["threshold"] = 1
    doc["signed"]["keys"].pop(next(iter(doc["signed"]["keys"])))
    with pytest.raises(RootRefused):
        device.update_root(json.dumps(doc).encode())


def test_roots_are_walked_one_version_at_a_time(device, pki):
    v2 = rotate(pki.root(), pki.roots[:2], online=([key("online-2").public_key], 1))
    v3 = rotate(v2, pki.roots[:2], release=([key("release-2").public_key], 1))
    with pytest.raises(RootRefused) as info:
        device.update_root(v3)
    assert info.value.reason == Reason.ROOT_VERSION
    assert [u.to_version for u in device.root.update_chain([v2, v3])] == [2, 3]
    with pytest.raises(RootRefused) as info:
        device.update_root(v2)
    assert info.value.reason == Reason.REPLAYED


def test_compromised_online_key_cannot_freeze_the_device_after_rotation(device, pki):
    """Fast-forward: a stolen online key signs a huge version; once the root rotates that key
    out, the genuine fleet server's messages are accepted again."""
    device.verify(pki.online.freshness(versions={}, version=2**40))
    new_online = key("online-2")
    genuine = pki.signer(new_online)
    device.update_root(rotate(pki.root(), pki.roots[:2], online=([new_online.public_key], 1)))
    assert device.verify(genuine.freshness(versions={})).new
    assert device.ledger.freshness.key_ids == (new_online.public_key.keyid,)


def test_rotating_the_release_key_keeps_refusing_old_release_messages(device, pki, clock):
    old_msg = pki.release.desired(group=GROUP, target=bundle("1.0.0"), deployment_id="d-1")
    new_release = key("release-2")
    device.update_root(rotate(pki.root(), pki.roots[:2],
                              release=([new_release.public_key], 1)))
    with pytest.raises(ControlRefused) as info:
        device.verify(old_msg)
    assert info.value.reason == Reason.UNKNOWN_KEY
    msg = pki.signer(new_release).desired(device=DEVICE, target=bundle("2.0.0"),
                                          deployment_id="d-2")
    assert device.verify(msg).role == "release"


def test_expired_root_refuses_control_messages(device, pki, clock):
    clock.now = NOW + 366 * 86400
    with pytest.raises(ControlRefused) as info:
        device.verify(pki.online.freshness(versions={}))
    assert info.value.reason == Reason.EXPIRED


def test_release_keys_in_v1_form_check_v1_signatures(device, pki):
    from edgepack.agent.signing import canonical_json, verify_detached

    table = {"bundle_id": "a" * 64, "bytes": 1, "chunk_size": 1, "chunks": ["b" * 64]}
    raw = bytes.fromhex(pki.release.signers[0].sign(canonical_json(table)).signature)
    import base64

    keys = device.root.v1_keys("release")
    (kid,) = keys
    sig = {"alg": "ed25519", "key_id": kid, "sig": base64.b64encode(raw).decode()}
    assert verify_detached(canonical_json(table), sig, keys) == kid
