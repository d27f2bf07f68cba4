"""The published test vectors (docs/vectors/) verify or fail exactly as vectors.json labels
them, with today's clock, and make_vectors.py rebuilds them byte for byte."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

from edgepack.agent.signing import canonical_json, load_public_keys, verify_detached
from edgepack.agent.trust import (
    ControlRefused,
    ControlVerifier,
    ReportRefused,
    RootRefused,
    TrustedRoot,
)
from edgepack.host.fleet.identity import ReportVerifier

VECTORS = Path(__file__).resolve().parents[3] / "docs" / "vectors"
INDEX = json.loads((VECTORS / "vectors.json").read_text())


@pytest.fixture
def device(tmp_path: Path) -> ControlVerifier:
    d = INDEX["device"]
    TrustedRoot.install(tmp_path / "root.json", (VECTORS / d["trusted_root"]).read_bytes())
    return ControlVerifier(tmp_path, device_id=d["device_id"], fleet=d["fleet"],
                           groups=d["groups"])


def test_control_vectors_verify_as_labelled(device):
    for case in INDEX["control"]:
        data = (VECTORS / case["file"]).read_bytes()
        if case["expect"] == "accept":
            assert device.verify(data).new, case["file"]
        else:
            with pytest.raises(ControlRefused) as info:
                device.verify(data)
            assert info.value.reason == case["reason"], (case["file"], info.value)


def test_root_rotation_vectors(device):
    for case in INDEX["root_updates"]:
        data = (VECTORS / case["file"]).read_bytes()
        if case["expect"] == "accept":
            assert device.update_root(data).to_version == 2
        else:
            with pytest.raises(RootRefused) as info:
                device.update_root(data)
            assert info.value.reason == case["reason"]


def test_report_vectors():
    fleet = ReportVerifier(json.loads((VECTORS / "report/enrollment.json").read_text()))
    for case in INDEX["reports"]:
        report = (VECTORS / case["file"]).read_bytes()
        if case["expect"] == "accept":
            assert fleet.verify(report).device_id == INDEX["device"]["device_id"]
        else:
            with pytest.raises(ReportRefused) as info:
                fleet.verify(report)
            assert info.value.reason == case["reason"]


def test_v1_chunk_table_vector():
    v = INDEX["v1_chunk_table"]
    doc = json.loads((VECTORS / v["table"]).read_text())
    data = (VECTORS / v["data"]).read_bytes()
    table = {k: doc[k] for k in ("bundle_id", "bytes", "chunk_size", "chunks")}
    assert canonical_json(table).decode() == doc["canonical"]
    keys = load_public_keys([VECTORS / v["key"]])
    assert verify_detached(canonical_json(table), doc["table_sig"], keys) == \
        doc["table_sig"]["key_id"]
    size = doc["chunk_size"]
    assert [hashlib.sha256(data[i:i + size]).hexdigest()
            for i in range(0, len(data), size)] == doc["chunks"]
    assert hashlib.sha256(data).hexdigest() == doc["bundle_id"] and len(data) == doc["bytes"]
    bad = {**doc["table_sig"], "sig": doc["table_sig"]["sig"][:-4] + "AAA="}
    from edgepack.agent.errors import SignatureError

    with pytest.raises(SignatureError):
        verify_detached(canonical_json(table), bad, keys)


def test_tiny_bundle_vector(tmp_path):
    """The tiny bundle: its digests, its signature (checked with the release keys of the
    vectors' root, as a device does), its retained manifest message and chunk table, the
    health gate on its golden samples; tampered copies fail."""
    import zipfile

    from edgepack.agent.bundle import read_bundle
    from edgepack.agent.errors import BundleError, SignatureError
    from edgepack.agent.health import HealthOptions, check_model
    from edgepack.agent.protocol import parse_chunk_table

    exp = json.loads((VECTORS / INDEX["bundle"]["digests"]).read_text())
    path = VECTORS / exp["file"]
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == exp["bundle_id"] and len(data) == exp["bytes"]
    root = TrustedRoot.load(VECTORS / INDEX["device"]["trusted_root"])
    release = root.v1_keys("release")
    bundle = read_bundle(path)
    assert bundle.bundle_id == exp["bundle_id"]
    assert bundle.verify(release) == exp["signature_key_id"]
    with zipfile.ZipFile(path) as zf:
        assert [i.filename for i in zf.infolist()] == ["manifest.json", "model.onnx",
                                                      "golden.npz", "report.json",
                                                      "signature.json"]
        for info in zf.infolist():
            m = exp["members"][info.filename]
            assert hashlib.sha256(zf.read(info)).hexdigest() == m["sha256"], info.filename
            assert info.compress_type == zipfile.ZIP_DEFLATED and m["compression"] == "deflate"
    # the retained manifest message (§3.5): chunk table, table_sig, re-encoded manifest
    raw = (VECTORS / exp["manifest_message"]).read_bytes()
    table = parse_chunk_table(raw, exp["bundle_id"])
    msg = json.loads(raw)
    canonical = canonical_json({k: msg[k] for k in ("bundle_id", "bytes", "chunk_size",
                                                    "chunks")})
    assert canonical.decode() == exp["chunk_table_canonical"]
    assert verify_detached(canonical, msg["table_sig"], release) == exp["signature_key_id"]
    size = table.chunk_size
    assert [hashlib.sha256(data[i:i + size]).hexdigest()
            for i in range(0, len(data), size)] == list(table.chunks) == msg["chunks"]
    assert msg["manifest"] == bundle.manifest and msg["signature"] == bundle.signature
    desired = json.loads((VECTORS / INDEX["bundle"]["desired"]).read_text())
    assert desired["signed"]["targets"] == {f"bundles/{exp['bundle_id']}": {
        "length": exp["bytes"], "hashes": {"sha256": exp["bundle_id"]},
        "custom": {"name": bundle.name, "version": bundle.version}}}
    # the health gate, in process, on the golden samples (what the device runs in a child)
    report = check_model(bundle.extract(tmp_path / "slot"),
                         HealthOptions(runs=3, warmup=1, enforce_budgets=False))
    assert report.passed, report.failures
    # tampering: one byte of the archive; the signature over other bytes; the chunk table
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0xFF
    (tmp_path / "bad.edgepack").write_bytes(bytes(bad))
    with pytest.raises((BundleError, SignatureError)):
        read_bundle(tmp_path / "bad.edgepack").verify(release)
    with pytest.raises(SignatureError):
        verify_detached(canonical.replace(b'"bytes":', b'"bytes":1'), msg["table_sig"],
                        release)
    stranger = load_public_keys([VECTORS / "v1/fleet.pub"])
    with pytest.raises(SignatureError):
        bundle.verify(stranger)


def test_vectors_are_rebuilt_byte_for_byte(tmp_path):
    spec = importlib.util.spec_from_file_location("make_vectors", VECTORS / "make_vectors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.build(tmp_path)
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert made, "the generator wrote nothing"
    for rel in made:
        assert (tmp_path / rel).read_bytes() == (VECTORS / rel).read_bytes(), rel


def test_vector_keys_are_marked_test_only():
    keys = json.loads((VECTORS / "keys.json").read_text())
    assert "TEST ONLY" in keys["TEST_ONLY"] and "TEST ONLY" in INDEX["warning"]
