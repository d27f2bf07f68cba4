"""`edgepack build m.tflite --target T`, typed as a user types it, on the corpus TFLite models:
already-quantized models are packaged as they are (no calibration asked for) with their true
dtype and size; microcontroller targets run them in TFLite Micro and take the arena from its
measured allocation; what TFLM or LiteRT cannot run is an error message, never a traceback."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgepack.agent.bundle import read_bundle
from edgepack.host.build.tflite_intake import check_with_tflm
from edgepack.host.cli.main import main

# artifact → the dtype its bundle must report
AS_IS = {"tflite_int8": "int8", "tflite_16x8": "16x8", "tflite_uint8-io": "int8",
         "tflite_dynamic": "dynamic-int8", "tflite_float16": "float16",
         "tflite_litert_refused": "int8"}
TFLM_REFUSES = {"tflite_dynamic": "FULLY_CONNECTED", "tflite_float16": "DEQUANTIZE"}
LITERT_REFUSES = {"tflite_litert_refused"}
README_SKLEARN = "edgepack build clf.joblib --target rpi4 --sample-input sample.npz"
README_TFLITE = ("edgepack build model.tflite --target esp32-s3",  # already int8: as it is
                 "edgepack build model.tflite --target rpi4")


def _cli(tmp_path: Path, monkeypatch, model: Path, *args: str):
    shutil.copy(model, tmp_path / model.name)
    monkeypatch.chdir(tmp_path)
    return CliRunner().invoke(main, ["build", model.name, *args])


def _bundle(tmp_path: Path) -> Path:
    (path,) = (tmp_path / "o").glob("*.edgepack")
    return path


def _refused(result, *words: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    for w in words:
        assert w in result.output, result.output


@pytest.mark.parametrize("target", ["esp32-s3", "rpi4"])
@pytest.mark.parametrize("name", sorted(AS_IS))
def test_quantized_tflite_packaged_as_is(tflite_corpus, tmp_path, monkeypatch, name, target):
    art = tflite_corpus[name]
    r = _cli(tmp_path, monkeypatch, art.path, "--target", target, "--out", "o", "--json", "-q")
    if target == "esp32-s3" and name in TFLM_REFUSES:
        _refused(r, "TFLite Micro cannot run it", TFLM_REFUSES[name], "esp32-s3")
        return
    if target == "rpi4" and name in LITERT_REFUSES:
        _refused(r, "LiteRT", "refuses", "rpi4")
        return
    assert r.exit_code == 0, r.output
    assert "calibration" not in r.stderr.lower()
    report = json.loads(r.stdout)
    m = read_bundle(_bundle(tmp_path)).manifest
    opt = m["optimization"]
    assert opt["dtype"] == AS_IS[name] and opt["requested"] == "as-is"
    assert opt["calibration_samples"] == 0 and opt["calibration_method"] is None
    size = art.path.stat().st_size
    assert m["model"]["bytes"] == size and m["metrics"]["optimized_bytes"] == size
    assert m["metrics"]["size_ratio"] == 1.0 and m["metrics"]["drop_points"] == pytest.approx(0.0, abs=1e-9)
    assert "as fp32" not in json.dumps(report)
    if target == "esp32-s3":
        assert m["model"]["format"] == "tflm" and m["runtime"]["name"] == "tflm"
        measured = report["tflm"]["measured_arena"]
        assert measured["measured"] and m["budgets"]["arena_kb"] == measured["arena_kb"]
        micro = check_with_tflm(art.path, [np.zeros((1, 16, 16, 3), np.float32)])
        assert micro.ok and measured["tflm_arena_bytes"] == micro.arena_bytes
        want = max(micro.arena_bytes * 1.10, measured["estimate_bytes"])
        assert want <= m["budgets"]["arena_kb"] * 1024 < want + 1024
    else:
        assert m["model"]["format"] == "tflite" and m["runtime"]["name"] == "litert"
        assert m["budgets"].get("arena_kb") is None


def test_float_tflite_without_calibration_says_what_to_do(tflite_corpus, tmp_path, monkeypatch):
    r = _cli(tmp_path, monkeypatch, tflite_corpus["tflite_float"].path, "--target", "rpi4")
    _refused(r, "float network", "--calibration", "--quantize dynamic or none")
    r = _cli(tmp_path, monkeypatch, tflite_corpus["tflite_float"].path, "--target", "esp32-s3")
    _refused(r, "integer-only", "--calibration")


def test_float_tflite_with_calibration_becomes_int8_for_a_microcontroller(
        tflite_corpus, tmp_path, monkeypatch):
    art = tflite_corpus["tflite_float"]
    x = np.random.default_rng(3).random((40, 16, 16, 3), np.float32)
    np.savez(tmp_path / "calib.npz", image=x)
    # The corpus CNN is untrained (a near-uniform softmax whose top-1 flips with any rounding):
    # the gate is not what this test is about (the digits CNN tests int8 accuracy).
    r = _cli(tmp_path, monkeypatch, art.path, "--target", "esp32-s3", "--calibration",
             "calib.npz", "--max-drop", "100", "--out", "o", "-q")
    assert r.exit_code == 0, r.output
    m = read_bundle(_bundle(tmp_path)).manifest
    assert m["optimization"]["dtype"] == "int8" and m["optimization"]["tool"] == \
        "ai-edge-quantizer"
    assert m["model"]["format"] == "tflm" and m["metrics"]["size_ratio"] > 1.4


def test_requantizing_a_quantized_model_is_refused(tflite_corpus, tmp_path, monkeypatch):
    path = tflite_corpus["tflite_int8"].path
    r = _cli(tmp_path, monkeypatch, path, "--target", "rpi4", "--quantize", "dynamic")
    _refused(r, "already quantized (int8)", "float source")
    r = _cli(tmp_path, monkeypatch, path, "--target", "rpi4", "--format", "onnx")
    _refused(r, "--format onnx", "TFLite")
    r = _cli(tmp_path, monkeypatch, path, "--target", "rpi4", "--quantize", "int8", "--out", "o")
    assert r.exit_code == 0, r.output  # a no-op: int8 asked of an int8 model


def test_readme_sklearn_command_asks_for_no_calibration(tmp_path, monkeypatch):
    import joblib
    from sklearn.datasets import load_iris
    from sklearn.ensemble import RandomForestClassifier

    x, y = load_iris(return_X_y=True)
    joblib.dump(RandomForestClassifier(n_estimators=10, random_state=0).fit(x, y),
                tmp_path / "clf.joblib")
    np.savez(tmp_path / "sample.npz", X=x[:32].astype(np.float32))
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, shlex.split(README_SKLEARN)[1:])
    assert r.exit_code == 0, r.output
    m = read_bundle(tmp_path / "dist" / "clf-1.0.0-rpi4.edgepack").manifest
    assert m["model"]["format"] == "onnx" and m["optimization"]["mode"] == "none"


def test_readme_tflite_commands(tflite_corpus, tmp_path, monkeypatch):
    shutil.copy(tflite_corpus["tflite_int8"].path, tmp_path / "model.tflite")
    monkeypatch.chdir(tmp_path)
    for command, fmt in zip(README_TFLITE, ("tflm", "tflite"), strict=True):
        r = CliRunner().invoke(main, shlex.split(command)[1:])
        assert r.exit_code == 0, r.output
        target = shlex.split(command)[-1]
        m = read_bundle(tmp_path / "dist" / f"model-1.0.0-{target}.edgepack").manifest
        assert m["model"]["format"] == fmt and m["optimization"]["dtype"] == "int8"
