"""The device's own key: made once, private (0600), signs every report over canonical JSON."""

from __future__ import annotations

import os
import stat

import pytest

from edgepack.agent.identity import IDENTITY_FILE, DeviceIdentity, report_payload
from edgepack.agent.trust import KeyFileError


def test_identity_is_made_once_and_private(tmp_path):
    ident = DeviceIdentity.create(tmp_path)
    path = tmp_path / IDENTITY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(KeyFileError):
        DeviceIdentity.create(tmp_path)
    assert DeviceIdentity.load(tmp_path).key_id == ident.key_id
    assert DeviceIdentity.load_or_create(tmp_path).key_id == ident.key_id
    assert ident.enrollment()["keyid"] == ident.key_id


def test_identity_readable_by_others_is_refused(tmp_path):
    DeviceIdentity.create(tmp_path)
    os.chmod(tmp_path / IDENTITY_FILE, 0o644)
    with pytest.raises(KeyFileError) as info:
        DeviceIdentity.load(tmp_path)
    assert "0644" in str(info.value) and info.value.reason == "key_file"


def test_signature_covers_the_canonical_report_without_sig(tmp_path):
    from securesystemslib.signer import Signature

    ident = DeviceIdentity.create(tmp_path)
    report = {"device_id": "pi-1", "seq": 3, "latency_ms": {"p50": 1.25, "p95": 1e-05},
              "detail": "naïve"}
    signed = ident.sign(report)
    assert report_payload(signed) == report_payload(report) == (
        '{"detail":"naïve","device_id":"pi-1","latency_ms":{"p50":1.25,"p95":1e-05},'
        '"seq":3}').encode()
    sig = Signature(signed["sig"]["keyid"], signed["sig"]["sig"])
    ident.signer.public_key.verify_signature(sig, report_payload(report))
    assert ident.sign(signed)["sig"] == signed["sig"]  # re-signing replaces, never nests


def test_non_finite_numbers_cannot_be_signed(tmp_path):
    ident = DeviceIdentity.create(tmp_path)
    with pytest.raises(ValueError):
        ident.sign({"device_id": "pi-1", "rss_mb": float("nan")})
