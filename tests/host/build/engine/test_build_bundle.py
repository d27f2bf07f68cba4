"""The bundle a build writes: structure, golden data, signature, tamper detection, reproducibility."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from build_models import flip_byte, member_data_offsets, rewrite_member
from click.testing import CliRunner

from edgepack.agent.bundle import SCHEMA, read_bundle, validate_manifest
from edgepack.agent.errors import BundleError, SignatureError
from edgepack.agent.signing import load_public_keys
from edgepack.host.build import build
from edgepack.host.cli import main

MEMBERS = ("manifest.json", "model.onnx", "golden.npz", "report.json", "signature.json",
           "drift.json")


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def _read_and_verify(path: Path, pub: Path) -> str | None:
    return read_bundle(path).verify(load_public_keys([pub]))


# --- structure -------------------------------------------------------------------------------

def test_bundle_members_and_manifest(signed_mlp, keys):
    members = _members(signed_mlp.path)
    manifest = json.loads(members["manifest.json"])

    assert sorted(members) == sorted(MEMBERS)
    assert validate_manifest(manifest) is manifest
    assert manifest["schema"] == SCHEMA
    assert (manifest["name"], manifest["version"], manifest["target"]) == ("mlp", "1.0.0", "rpi4")
    assert manifest["created"] == "2023-11-14T22:13:20Z"  # SOURCE_DATE_EPOCH=1700000000
    model = manifest["model"]
    assert model["file"] == "model.onnx" and model["format"] == "onnx"
    assert model["sha256"] == hashlib.sha256(members["model.onnx"]).hexdigest()
    assert model["bytes"] == len(members["model.onnx"])
    assert model["inputs"] == [{"name": "x", "dtype": "float32", "shape": [1, 64],
                                "quantization": None}]
    assert model["outputs"][0]["name"] == "logits"
    assert manifest["files"] == {n: hashlib.sha256(members[n]).hexdigest()
                                 for n in ("golden.npz", "report.json", "drift.json")}
    assert manifest["runtime"]["name"] == "onnxruntime"
    assert manifest["optimization"]["mode"] == "int8"
    assert manifest["budgets"]["p95_ms"] == 200
    assert manifest["health"]["golden"] == "golden.npz"
    assert {"python", "onnx", "onnxruntime", "numpy"} <= set(manifest["toolchain"])
    sig = json.loads(members["signature.json"])
    assert sig["alg"] == "ed25519" and sig["key_id"] == keys.key_id
    assert signed_mlp.report.bundle["bundle_id"] == hashlib.sha256(
        signed_mlp.path.read_bytes()).hexdigest()


def test_golden_holds_inputs_and_the_optimized_models_outputs(signed_mlp):
    import onnxruntime as ort

    members = _members(signed_mlp.path)
    manifest = json.loads(members["manifest.json"])
    with np.load(io.BytesIO(members["golden.npz"])) as g:
        golden = {k: g[k] for k in g.files}

    n = manifest["health"]["samples"]
    assert sorted(golden) == ["input_0", "output_0"]
    assert n == 8
    assert golden["input_0"].shape[0] == golden["output_0"].shape[0] == n
    assert golden["input_0"].dtype == np.float32
    # The device's health check: the shipped model reproduces output_0 within the tolerances.
    sess = ort.InferenceSession(members["model.onnx"], providers=["CPUExecutionProvider"])
    health = manifest["health"]
    for i in range(n):
        got = sess.run(None, {"x": golden["input_0"][i].reshape(1, 64)})[0]
        np.testing.assert_allclose(got.reshape(golden["output_0"][i].shape), golden["output_0"][i],
                                   rtol=health["rtol"], atol=health["atol"])


def test_report_member_matches_the_returned_report(signed_mlp):
    report = json.loads(_members(signed_mlp.path)["report.json"])

    assert report["optimization"] == signed_mlp.report.optimization
    assert report["metrics"]["size"] == signed_mlp.report.metrics["size"]


# --- signing ---------------------------------------------------------------------------------

def test_verify_with_the_right_key(signed_mlp, keys):
    assert _read_and_verify(signed_mlp.path, keys.public) == keys.key_id

    result = CliRunner().invoke(main, ["verify", str(signed_mlp.path), "--pub", str(keys.public),
                                       "--json"])

    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["ok"] is True and out["key_id"] == keys.key_id
    assert out["bundle_id"] == hashlib.sha256(signed_mlp.path.read_bytes()).hexdigest()


def test_verify_with_the_wrong_key_fails(signed_mlp, keys):
    with pytest.raises(SignatureError, match="not trusted"):
        _read_and_verify(signed_mlp.path, keys.other_public)

    result = CliRunner().invoke(main, ["verify", str(signed_mlp.path),
                                       "--pub", str(keys.other_public)])

    assert result.exit_code == 1
    assert "error:" in result.output and "not trusted" in result.output


def test_unsigned_bundle_fails_verify(mlp, keys, tmp_path):
    built = build(model=str(mlp.model), target="rpi4", quantize="none",
                  eval=str(mlp.eval), out=str(tmp_path),
                  variants=False)
    assert "signature.json" not in _members(built.path)
    assert any("unsigned" in w for w in built.report.warnings)

    result = CliRunner().invoke(main, ["verify", str(built.path), "--pub", str(keys.public)])

    assert result.exit_code == 1
    assert "not signed" in result.output
    with pytest.raises(SignatureError, match="not signed"):
        _read_and_verify(built.path, keys.public)


# --- tampering -------------------------------------------------------------------------------

@pytest.mark.parametrize("member", MEMBERS)
def test_one_changed_byte_in_any_member_is_caught(signed_mlp, keys, tmp_path, member):
    tampered = rewrite_member(signed_mlp.path, tmp_path / "t.edgepack", member)
    assert _members(tampered)[member] != _members(signed_mlp.path)[member]

    with pytest.raises(BundleError):
        _read_and_verify(tampered, keys.public)
    result = CliRunner().invoke(main, ["verify", str(tampered), "--pub", str(keys.public)])
    assert result.exit_code == 1
    assert result.output.startswith("error:")


@pytest.mark.parametrize("member", MEMBERS)
def test_one_flipped_raw_byte_in_stored_data_is_caught(signed_mlp, keys, tmp_path, member):
    start, length = member_data_offsets(signed_mlp.path)[member]
    tampered = flip_byte(signed_mlp.path, tmp_path / "t.edgepack", start + length // 2)

    with pytest.raises(BundleError):
        _read_and_verify(tampered, keys.public)


def test_truncated_bundle_is_caught(signed_mlp, keys, tmp_path):
    data = signed_mlp.path.read_bytes()
    cut = tmp_path / "cut.edgepack"
    cut.write_bytes(data[: len(data) - 100])

    with pytest.raises(BundleError):
        _read_and_verify(cut, keys.public)


def _central_directory_entry(path: Path, member: str) -> int:
    raw = path.read_bytes()
    pos = raw.find(b"PK\x01\x02")
    while pos != -1:
        name_len = int.from_bytes(raw[pos + 28:pos + 30], "little")
        if raw[pos + 46:pos + 46 + name_len].decode() == member:
            return pos
        pos = raw.find(b"PK\x01\x02", pos + 4)
    raise AssertionError(f"{member} not in the central directory")


@pytest.mark.parametrize("field_offset", [8, 10], ids=["encrypted-flag", "compression-method"])
def test_corrupt_zip_metadata_is_a_bundle_error(signed_mlp, keys, tmp_path, field_offset):
    entry = _central_directory_entry(signed_mlp.path, "model.onnx")
    tampered = flip_byte(signed_mlp.path, tmp_path / "t.edgepack", entry + field_offset)

    with pytest.raises(BundleError):
        _read_and_verify(tampered, keys.public)


# --- reproducibility -------------------------------------------------------------------------

def _build_int8(model: Path, mlp, out: Path) -> Path:
    return build(model=str(model), target="rpi4", quantize="int8",
                 calibration=str(mlp.calib), eval=str(mlp.eval),
                 out=str(out), variants=False).path


@pytest.mark.parametrize("which", ["model", "legacy"])
def test_building_twice_gives_identical_model_and_golden(mlp, tmp_path, which):
    model = getattr(mlp, which)

    a = _members(_build_int8(model, mlp, tmp_path / "a"))
    b = _members(_build_int8(model, mlp, tmp_path / "b"))

    assert a["model.onnx"] == b["model.onnx"]
    assert a["golden.npz"] == b["golden.npz"]
    ma, mb = json.loads(a["manifest.json"]), json.loads(b["manifest.json"])
    assert ma["created"] == mb["created"]
    assert ma["model"]["sha256"] == mb["model"]["sha256"]
    assert ma["files"]["golden.npz"] == mb["files"]["golden.npz"]


def test_identical_across_processes_with_other_hash_seeds(mlp, tmp_path):
    here = _members(_build_int8(mlp.model, mlp, tmp_path / "here"))
    script = (
        "import sys\n"
        "from edgepack.host.build import build\n"
        "build(model=sys.argv[1], target='rpi4', quantize='int8', "
        "calibration=sys.argv[2], eval=sys.argv[3], out=sys.argv[4], variants=False)\n")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "SOURCE_DATE_EPOCH": "1700000000"}

    subprocess.run([sys.executable, "-c", script, str(mlp.model), str(mlp.calib),
                    str(mlp.eval), str(tmp_path / "there")], check=True, env=env,
                   capture_output=True)

    there = _members(tmp_path / "there" / "mlp-1.0.0-rpi4.edgepack")
    assert there["model.onnx"] == here["model.onnx"]
    assert there["golden.npz"] == here["golden.npz"]


# --- inspect ---------------------------------------------------------------------------------

def test_inspect_json(signed_mlp, keys):
    result = CliRunner().invoke(main, ["inspect", str(signed_mlp.path), "--json"])

    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["bundle_id"] == hashlib.sha256(signed_mlp.path.read_bytes()).hexdigest()
    assert out["bytes"] == signed_mlp.path.stat().st_size
    assert out["signed_by"] == keys.key_id
    assert out["manifest"]["name"] == "mlp"
    assert out["report"]["optimization"]["mode"] == "int8"
    assert "accuracy" in out["report"]["metrics"]


def test_inspect_human_readable(signed_mlp, keys):
    result = CliRunner().invoke(main, ["inspect", str(signed_mlp.path)])

    assert result.exit_code == 0, result.output
    assert "mlp 1.0.0 for rpi4" in result.output
    assert keys.key_id in result.output


def test_inspect_of_a_non_bundle_is_an_error(tmp_path):
    junk = tmp_path / "junk.edgepack"
    junk.write_bytes(b"nope")

    result = CliRunner().invoke(main, ["inspect", str(junk)])

    assert result.exit_code == 1
    assert "error:" in result.output and "not an edgepack bundle" in result.output


def test_build_cli_json_report(mlp, keys, tmp_path):
    result = CliRunner().invoke(main, [
        "build", str(mlp.model), "-t", "x86-64-vnni", "--quantize", "int8",
        "--calibration", str(mlp.calib), "--eval", str(mlp.eval), "--key", str(keys.private),
        "--name", "digits-mlp", "--version", "2.1.0", "--out", str(tmp_path), "--json"])

    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    path = Path(report["bundle"]["path"])
    assert path == tmp_path / "digits-mlp-2.1.0-x86-64-vnni.edgepack"
    assert report["bundle"]["signed_by"] == keys.key_id
    assert report["bundle"]["bundle_id"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert read_bundle(path).version == "2.1.0"
    assert len([r for r in report["variants"] if r["result"] == "chosen"]) == 1


def test_build_cli_table_output(mlp, tmp_path):
    result = CliRunner().invoke(main, [
        "build", str(mlp.model), "-t", "rpi4", "--quantize", "dynamic", "--eval", str(mlp.eval),
        "--out", str(tmp_path), "-q"])

    assert result.exit_code == 0, result.output
    flat = "".join(result.output.split())  # rich wraps long paths at the terminal width
    assert flat.startswith("built") and "mlp-1.0.0-rpi4.edgepack" in flat
    assert "p50latency" in flat and "accuracy" in flat and "size(bytes)" in flat
    assert isinstance(read_bundle(tmp_path / "mlp-1.0.0-rpi4.edgepack").manifest, dict)


def test_missing_bundle_is_a_bundle_error(signed_mlp):
    with pytest.raises(BundleError, match="cannot read bundle"):
        read_bundle(signed_mlp.path.with_suffix(".missing"))


def test_build_json_stdout_is_pure_json_with_entropy_calibration(mlp, tmp_path):
    result = CliRunner().invoke(main, [
        "build", str(mlp.model), "-t", "rpi4", "--quantize", "int8",
        "--calibration", str(mlp.calib), "--eval", str(mlp.eval),
        "--calibration-method", "entropy", "--out", str(tmp_path), "--json"])

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["optimization"]["calibration_method"] == "entropy"
