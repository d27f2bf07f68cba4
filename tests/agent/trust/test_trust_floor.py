"""The rollback floor: a device never installs a bundle below the highest version it ran of that
model name, whatever a message says, unless a release key authorized exactly that downgrade."""

from __future__ import annotations

import json

import pytest
from trust_helpers import DEVICE, bundle

from edgepack.agent.errors import BundleError
from edgepack.agent.trust import ControlRefused, FloorError, Reason


def installed(device, version, name="digits"):
    device.record_install(name, version)


def test_upgrades_pass_and_raise_the_floor(device):
    assert device.check_floor("digits", "1.0.0", bundle("1.0.0").bundle_id).floor is None
    installed(device, "1.0.0")
    d = device.check_floor("digits", "1.1.0", bundle("1.1.0").bundle_id)
    assert (d.floor, d.downgrade) == ("1.0.0", False)
    installed(device, "1.1.0")
    installed(device, "1.0.5")  # a lower install (authorized elsewhere) never lowers it alone
    assert device.ledger.floors["digits"] == "1.1.0"


def test_bundle_below_the_floor_is_refused_without_authorization(device):
    installed(device, "2.0.0")
    with pytest.raises(FloorError) as info:
        device.check_floor("digits", "1.0.0", bundle("1.0.0").bundle_id)
    err = info.value
    assert isinstance(err, BundleError)
    assert (err.reason, err.name, err.version, err.floor) == (Reason.BELOW_FLOOR, "digits",
                                                              "1.0.0", "2.0.0")


def test_switching_model_names_does_not_reset_the_floor(device):
    """v1 compared only with the active bundle's name: running 'other' in between, then naming
    an old 'digits', bypassed the downgrade check. Floors are per name and persisted."""
    installed(device, "2.0.0", "digits")
    installed(device, "5.0.0", "other")
    installed(device, "0.1.0", "third")
    with pytest.raises(FloorError):
        device.check_floor("digits", "1.0.0", bundle("1.0.0").bundle_id)
    with pytest.raises(FloorError):
        device.check_floor("other", "4.9.9", bundle("4.9.9", "other").bundle_id)


def test_authorized_downgrade_passes_and_lowers_the_floor(device, pki):
    installed(device, "2.0.0")
    auth = device.verify(pki.release.downgrade(device=DEVICE, target=bundle("1.0.0")))
    d = device.check_floor("digits", "1.0.0", bundle("1.0.0").bundle_id, auth)
    assert d.downgrade and d.key_ids == (pki.release_key.public_key.keyid,)
    device.record_install("digits", "1.0.0", downgrade=True)
    assert device.ledger.floors["digits"] == "1.0.0"


def test_authorization_binds_name_version_and_bundle(device, pki):
    installed(device, "2.0.0")
    installed(device, "2.0.0", "other")
    auth = device.verify(pki.release.downgrade(device=DEVICE, target=bundle("1.0.0")))
    for name, version in (("digits", "0.9.0"), ("other", "1.0.0")):
        with pytest.raises(FloorError):
            device.check_floor(name, version, bundle(version, name).bundle_id, auth)
    with pytest.raises(FloorError):  # same name and version, another file
        device.check_floor("digits", "1.0.0", "f" * 64, auth)


def test_forged_downgrades_are_refused(device, pki):
    """The v1 attack: edit the desired message to an older bundle with allow_downgrade."""
    installed(device, "2.0.0")
    # the fleet server's online key may not authorize downgrades
    with pytest.raises(ControlRefused) as info:
        device.verify(pki.online.downgrade(device=DEVICE, target=bundle("1.0.0")))
    assert info.value.reason == Reason.WRONG_ROLE
    # a genuine authorization for another device, edited to name this one
    doc = json.loads(pki.release.downgrade(device="pi-2", target=bundle("1.0.0")))
    doc["signed"]["edgepack"]["for"] = {"device": DEVICE}
    with pytest.raises(ControlRefused) as info:
        device.verify(json.dumps(doc).encode())
    assert info.value.reason == Reason.BAD_SIGNATURE
    # a genuine authorization for another device, unedited
    with pytest.raises(ControlRefused) as info:
        device.verify(pki.release.downgrade(device="pi-2", target=bundle("1.0.0")))
    assert info.value.reason == Reason.WRONG_DEVICE
    # a desired state that merely names the old bundle
    desired = device.verify(pki.release.desired(device=DEVICE, target=bundle("1.0.0"),
                                                deployment_id="d-old"))
    with pytest.raises(FloorError):
        device.check_floor("digits", "1.0.0", bundle("1.0.0").bundle_id, desired)


def test_expired_authorization_no_longer_opens_the_floor(device, pki, clock):
    installed(device, "2.0.0")
    auth = device.verify(pki.release.downgrade(device=DEVICE, target=bundle("1.0.0"),
                                               lifetime_s=60))
    clock.now += 60 + device.skew_s
    with pytest.raises(FloorError):
        device.check_floor("digits", "1.0.0", bundle("1.0.0").bundle_id, auth)


def test_replayed_authorization_is_refused(device, pki, clock):
    first = pki.release.downgrade(device=DEVICE, target=bundle("1.0.0"))
    device.verify(first)
    clock.now += 1
    device.verify(pki.release.downgrade(device=DEVICE, target=bundle("1.5.0")))
    with pytest.raises(ControlRefused) as info:
        device.verify(first)
    assert info.value.reason == Reason.REPLAYED
