"""Bad input gets a message naming the problem and the fix, a non-zero exit, and no bundle."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from build_models import IN_NAME
from click.testing import CliRunner, Result

from edgepack.host.cli import main

ROOT = Path(__file__).resolve().parents[4]


def _build(args: list[str], out: Path) -> Result:
    return CliRunner().invoke(main, ["build", *args, "--out", str(out), "-q"])


def _assert_clean_failure(result: Result, out: Path, *needles: str, code: int = 1) -> None:
    """A handled error: exit code, 'error: ...' (not a traceback), and nothing left in --out."""
    assert result.exit_code == code, result.output
    # CliRunner turns an uncaught exception into exit 1 too; a handled one is a SystemExit.
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        repr(result.exception)
    for needle in needles:
        assert needle in result.output, result.output
    assert not out.exists() or list(out.iterdir()) == []


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "dist"


def _profile(tmp_path: Path, model_mb: float) -> Path:
    text = (ROOT / "targets" / "rpi4.toml").read_text()
    text = text.replace('name = "rpi4"', 'name = "tiny-board"')
    text = text.replace("model_mb = 200", f"model_mb = {model_mb}")
    path = tmp_path / "tiny-board.toml"
    path.write_text(text)
    return path


def test_random_bytes_are_not_a_model(tmp_path, out):
    bad = tmp_path / "noise.onnx"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))

    result = _build([str(bad), "-t", "rpi4", "--quantize", "none"], out)

    _assert_clean_failure(result, out, "error:", "not a readable ONNX model")


def test_truncated_onnx(mlp, tmp_path, out):
    data = mlp.model.read_bytes()
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(data[: len(data) // 2])

    result = _build([str(bad), "-t", "rpi4", "--quantize", "none"], out)

    _assert_clean_failure(result, out, "error:", "truncated")


def test_text_file_is_refused(tmp_path, out):
    bad = tmp_path / "model.txt"
    bad.write_text("not a model\n")

    result = _build([str(bad), "-t", "rpi4", "--quantize", "none"], out)

    _assert_clean_failure(result, out, "error:", "cannot tell the format", "ONNX (.onnx)")


@pytest.mark.parametrize("arrays, needles", [
    pytest.param({"a": np.zeros((4, 64), np.float32), "b": np.zeros((4, 64), np.float32)},
                 ("no array for model input(s) x", "Key the arrays by input name"),
                 id="wrong-names"),
    pytest.param({IN_NAME: np.zeros((4, 63), np.float32)},
                 ("shape (4, 63)", "expects 64"), id="wrong-shape"),
    pytest.param({IN_NAME: np.zeros((4, 8, 8), np.float32)},
                 ("shape (4, 8, 8)",), id="wrong-rank"),
    pytest.param({IN_NAME: np.array([["a"] * 64] * 4)},
                 ("<U1", "float32", "astype"), id="strings"),
    pytest.param({IN_NAME: np.zeros((4, 64), bool)}, ("bool", "float32"), id="bool"),
    pytest.param({IN_NAME: np.zeros((0, 64), np.float32)}, ("zero samples",), id="empty"),
])
def test_calibration_that_does_not_fit(mlp, tmp_path, out, arrays, needles):
    calib = tmp_path / "calib.npz"
    np.savez(calib, **arrays)

    result = _build([str(mlp.model), "-t", "rpi4", "--quantize", "int8",
                     "--calibration", str(calib)], out)

    _assert_clean_failure(result, out, "error:", "--calibration", *needles)


def test_empty_eval_data(mlp, tmp_path, out):
    ev = tmp_path / "eval.npz"
    np.savez(ev, **{IN_NAME: np.zeros((0, 64), np.float32), "labels": np.zeros(0, np.int64)})

    result = _build([str(mlp.model), "-t", "rpi4", "--quantize", "none", "--eval", str(ev)], out)

    _assert_clean_failure(result, out, "error:", "--eval", "zero samples")


def test_labels_count_mismatch(mlp, tmp_path, out):
    ev = tmp_path / "eval.npz"
    np.savez(ev, **{IN_NAME: mlp.x_test[:10], "labels": mlp.y_test[:9]})

    result = _build([str(mlp.model), "-t", "rpi4", "--quantize", "none", "--eval", str(ev)], out)

    _assert_clean_failure(result, out, "error:", "'labels' has 9 entries for 10 samples")


def test_not_an_npz(mlp, tmp_path, out):
    calib = tmp_path / "calib.npz"
    calib.write_bytes(b"definitely not a zip")

    result = _build([str(mlp.model), "-t", "rpi4", "--quantize", "int8",
                     "--calibration", str(calib)], out)

    _assert_clean_failure(result, out, "error:", "not a readable .npz")


def test_object_array_calibration_is_a_data_error(mlp, tmp_path, out):
    calib = tmp_path / "calib.npz"
    np.savez(calib, **{IN_NAME: np.array([[None] * 64] * 4, dtype=object)})

    result = _build([str(mlp.model), "-t", "rpi4", "--quantize", "int8",
                     "--calibration", str(calib)], out)

    _assert_clean_failure(result, out, "error:", "--calibration")


def test_nan_calibration_is_a_data_error(mlp, tmp_path, out):
    calib = tmp_path / "calib.npz"
    np.savez(calib, **{IN_NAME: np.full((16, 64), np.nan, np.float32)})

    result = _build([str(mlp.model), "-t", "rpi4", "--quantize", "int8",
                     "--calibration", str(calib)], out)

    _assert_clean_failure(result, out, "error:", "NaN")


def test_int8_without_calibration_is_refused(mlp, out):
    result = _build([str(mlp.model), "-t", "rpi4", "--quantize", "int8"], out)

    _assert_clean_failure(result, out, "error:", "--calibration", "--quantize dynamic")


def test_auto_means_the_profile_default_and_needs_calibration_too(mlp, out):
    # rpi4's default is int8
    result = _build([str(mlp.model), "-t", "rpi4"], out)

    _assert_clean_failure(result, out, "--calibration", "--quantize dynamic")


def test_unknown_target_is_a_usage_error_listing_targets(mlp, out):
    result = _build([str(mlp.model), "-t", "rpi44", "--quantize", "none"], out)

    _assert_clean_failure(result, out, "unknown target 'rpi44'", "Known targets", "rpi4",
                          "x86-64-vnni", code=2)


def test_model_over_budget_before_any_long_work(mlp, tmp_path, out):
    profile = _profile(tmp_path, 0.001)  # ~1 KB; the MLP is ~10 KB fp32, ~2.5 KB even at int8

    result = _build([str(mlp.model), "-t", str(profile), "--quantize", "int8",
                     "--calibration", str(mlp.calib)], out)

    _assert_clean_failure(result, out, "error:", "tiny-board", "budget")


def test_optimized_model_over_budget(mlp, tmp_path, out):
    # Passes the pre-flight estimate (fp32 / 4 ≈ 2.5 KB < 4 KB) but the int8 QDQ model is ~5 KB.
    profile = _profile(tmp_path, 0.004)

    result = _build([str(mlp.model), "-t", str(profile), "--quantize", "int8",
                     "--calibration", str(mlp.calib), "--eval", str(mlp.eval)], out)

    _assert_clean_failure(result, out, "error:", "optimized model", "budget")


def test_unsupported_op_is_named(mlp, out):
    result = _build([str(mlp.custom_op), "-t", "rpi4", "--quantize", "none"], out)

    _assert_clean_failure(result, out, "error:", "com.example:FancyRelu")


def test_non_onnx_target_is_refused(mlp, out):
    result = _build([str(mlp.model), "-t", "esp32-s3", "--quantize", "none"], out)

    _assert_clean_failure(result, out, "error:", "esp32-s3", "targets list")


def test_public_key_passed_as_signing_key(mlp, keys, out):
    result = _build([str(mlp.model), "-t", "rpi4", "--quantize", "none",
                     "--key", str(keys.public)], out)

    _assert_clean_failure(result, out, "error:", ".pub")


def test_bad_bundle_name(mlp, out):
    result = _build([str(mlp.model), "-t", "rpi4", "--quantize", "none",
                     "--name", "../escape"], out)

    _assert_clean_failure(result, out, "error:", "bundle name")


def test_missing_model_is_a_usage_error(tmp_path, out):
    result = _build([str(tmp_path / "nope.onnx"), "-t", "rpi4"], out)

    _assert_clean_failure(result, out, "does not exist", code=2)


def test_failure_leaves_existing_bundles_alone(mlp, tmp_path, out):
    out.mkdir()
    keep = out / "other-1.0.0-rpi4.edgepack"
    keep.write_bytes(b"someone else's bundle")

    result = _build([str(mlp.model), "-t", "rpi4", "--quantize", "int8"], out)

    assert result.exit_code == 1
    assert sorted(os.listdir(out)) == [keep.name]
    assert keep.read_bytes() == b"someone else's bundle"
