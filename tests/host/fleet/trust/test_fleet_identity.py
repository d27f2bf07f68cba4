"""The fleet server believes a report only from an enrolled device's own key."""

from __future__ import annotations

import pytest

from edgepack.agent.identity import DeviceIdentity
from edgepack.agent.trust import Reason, ReportRefused
from edgepack.host.fleet.identity import ReportVerifier


@pytest.fixture
def devices(tmp_path):
    return {d: DeviceIdentity.create(tmp_path / d) for d in ("pi-1", "pi-2")}


@pytest.fixture
def fleet(devices):
    return ReportVerifier({d: i.enrollment() for d, i in devices.items()})


def refused(fleet, report, reason, **kw):
    with pytest.raises(ReportRefused) as info:
        fleet.verify(report, **kw)
    assert info.value.reason == reason, info.value
    return info.value


def test_enrolled_device_report_verifies(devices, fleet):
    event = {"kind": "installed", "device_id": "pi-1", "seq": 4, "ts": 1.5}
    v = fleet.verify(devices["pi-1"].sign(event), topic_device="pi-1")
    assert (v.device_id, v.key_id, dict(v.report)) == ("pi-1", devices["pi-1"].key_id, event)


def test_forged_rejected_event_cannot_halt_a_rollout(devices, fleet, tmp_path):
    forged = {"kind": "rejected", "reason": "signature", "device_id": "pi-1", "seq": 99}
    refused(fleet, forged, Reason.UNSIGNED)
    attacker = DeviceIdentity.create(tmp_path / "attacker")
    refused(fleet, attacker.sign(forged), Reason.UNKNOWN_KEY)
    signed = devices["pi-1"].sign({**forged, "kind": "installed"})
    refused(fleet, {**signed, "kind": "rejected"}, Reason.BAD_SIGNATURE)


def test_device_that_does_not_exist_is_not_counted(fleet, tmp_path):
    ghost = DeviceIdentity.create(tmp_path / "ghost")
    refused(fleet, ghost.sign({"device_id": "ghost", "online": True}), Reason.NOT_ENROLLED)


def test_report_on_another_devices_topic_is_refused(devices, fleet):
    report = devices["pi-2"].sign({"device_id": "pi-2", "online": True})
    refused(fleet, report, Reason.WRONG_DEVICE, topic_device="pi-1")


def test_malformed_reports(fleet):
    refused(fleet, b"not json", Reason.MALFORMED)
    refused(fleet, b"[1]", Reason.MALFORMED)
