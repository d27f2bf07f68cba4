"""TFLite bundles: full int8 / dynamic / fp16 through the LiteRT gate, Edge TPU, errors."""

from __future__ import annotations

import json
import os
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
from tflite_helpers import SavedModel, build

from edgepack.agent.bundle import read_bundle
from edgepack.agent.errors import BudgetError, GateError, ModelError
from edgepack.host.build.convert_tflite import (
    LiteRTSession,
    _schema,
    non_int8_ops,
    quantize_keeping_float,
    rank_sensitive_layers,
    tflite_ops,
    to_tflite,
)
from edgepack.host.build.edgetpu import EDGETPU_OPS


def _manifest(path: Path) -> dict:
    with zipfile.ZipFile(path) as zf:
        return json.loads(zf.read("manifest.json"))


def test_full_int8_within_one_point_of_fp32(cnn: SavedModel, tmp_path: Path) -> None:
    r = build(cnn, "android-arm64", tmp_path, quantize="int8")
    acc = r.report.metrics["accuracy"]
    assert acc["accuracy_fp32"] > 0.9
    assert acc["drop_points"] <= 1.0
    m = read_bundle(r.path).manifest
    assert m["model"]["format"] == "tflite" and m["model"]["file"] == "model.tflite"
    assert m["runtime"]["name"] == "litert"
    assert m["optimization"]["mode"] == "int8"
    assert m["optimization"]["io_type"] == "float32"  # the phone profile keeps float I/O
    assert m["model"]["inputs"][0]["quantization"] is None
    assert m["metrics"]["size_ratio"] > 3.0
    # Every compute op is int8; only the I/O boundary (de)quantizes.
    assert {o.op for o in non_int8_ops(r.model_bytes)} <= {"QUANTIZE", "DEQUANTIZE"}
    assert r.report.metrics["latency"]["runtime"] == "litert"


@pytest.mark.parametrize(("mode", "min_ratio"), [("dynamic", 3.0), ("fp16", 1.8)])
def test_dynamic_and_fp16(cnn: SavedModel, tmp_path: Path, mode: str, min_ratio: float) -> None:
    r = build(cnn, "android-arm64", tmp_path, quantize=mode)
    m = _manifest(r.path)
    assert m["optimization"]["mode"] == mode
    assert m["metrics"]["size_ratio"] > min_ratio
    assert m["metrics"]["drop_points"] <= 1.0
    assert m["health"]["golden"] == "golden.npz"


def test_coral_uint8_io_ops_checked_and_needs_compiler(coral_build, monkeypatch) -> None:
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    m = read_bundle(coral_build.path).manifest
    assert m["optimization"]["mode"] == "int8" and m["optimization"]["io_type"] == "uint8"
    for t in m["model"]["inputs"] + m["model"]["outputs"]:
        assert t["dtype"] == "uint8"
        assert t["quantization"]["scale"] > 0 and 0 <= t["quantization"]["zero_point"] <= 255
    assert m["optimization"]["needs"] == ["edgetpu_compiler"]
    assert any("edgetpu_compiler" in w for w in m["optimization"]["warnings"])
    assert {op for op, _ in tflite_ops(coral_build.model_bytes)} <= EDGETPU_OPS
    assert m["metrics"]["drop_points"] <= 2.0
    assert m["health"]["quantized_io"] is True
    with zipfile.ZipFile(coral_build.path) as zf, zf.open("golden.npz") as f:
        g = np.load(f)
        assert g["input_0"].dtype == np.uint8 and g["output_0"].dtype == np.uint8


def test_coral_runs_edgetpu_compiler_when_on_path(cnn: SavedModel, tmp_path: Path,
                                                  monkeypatch) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "edgetpu_compiler"
    # Stands in for Coral's compiler: same flags, output name and log lines.
    fake.write_text("#!/bin/sh\nout=$3; src=$4\n"
                    "cp \"$src\" \"$out/model_edgetpu.tflite\"\n"
                    "echo 'Number of operations that will run on Edge TPU: 7'\n"
                    "echo 'Number of operations that will run on CPU: 0'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    r = build(cnn, "coral-edgetpu", tmp_path / "out")
    m = read_bundle(r.path).manifest
    assert m["model"]["file"] == "model_edgetpu.tflite"
    assert "model_cpu.tflite" in m["files"]
    assert m["optimization"]["needs"] == []
    assert r.report.edgetpu["tpu_ops"] == 7 and r.report.edgetpu["cpu_ops"] == 0


def test_edgetpu_and_tflm_op_names_exist_in_the_schema() -> None:
    from edgepack.host.build.tflm import TFLM_RESOLVER

    builtin = {k for k in vars(_schema().BuiltinOperator) if not k.startswith("_")}
    assert builtin >= EDGETPU_OPS
    assert set(TFLM_RESOLVER) <= builtin


def test_op_not_on_edgetpu_names_the_layer(leaky: SavedModel, tmp_path: Path) -> None:
    with pytest.raises(GateError) as e:
        build(leaky, "coral-edgetpu", tmp_path)
    assert "LEAKY_RELU" in str(e.value) and "leaky" in str(e.value)


@pytest.mark.parametrize("target", ["esp32-s3", "coral-edgetpu"])
def test_op_without_int8_kernel_on_integer_only_target(sine: SavedModel, tmp_path: Path,
                                                       target: str) -> None:
    with pytest.raises(GateError) as e:
        build(sine, target, tmp_path)
    assert "SIN" in str(e.value) and "sine_act" in str(e.value)


def test_cpu_target_keeps_float_where_an_int8_kernel_is_missing(sine: SavedModel,
                                                               tmp_path: Path) -> None:
    r = build(sine, "android-arm64", tmp_path, quantize="int8")
    assert any("SIN" in n for n in r.report.optimization["notes"])


def test_gate_failure_on_cpu_tries_float_layers_then_dynamic(cnn: SavedModel,
                                                             tmp_path: Path) -> None:
    # A negative allowance fails every candidate: the error says what was tried.
    with pytest.raises(GateError) as e:
        build(cnn, "android-arm64", tmp_path, quantize="int8", max_drop=-1.0)
    assert "selective int8" in str(e.value) and "dynamic" in str(e.value)


def test_selective_int8_keeps_the_named_layers_float(cnn_fp32: bytes, calib_set, cnn) -> None:
    ranked = rank_sensitive_layers(cnn_fp32, calib_set, calib_set.take(slice(0, 16)))
    assert ranked and all(np.isfinite(loss) for _, loss in ranked)
    res = quantize_keeping_float(cnn_fp32, calib_set, [ranked[0][0]])
    float_ops = [o for o in non_int8_ops(res.model_bytes) if o.op not in ("QUANTIZE",
                                                                           "DEQUANTIZE")]
    assert len(float_ops) == 1 and res.float_layers
    sess, ref = LiteRTSession(res.model_bytes), LiteRTSession(cnn_fp32)
    x = calib_set.inputs["image"][:20]
    agree = np.mean([sess.run({"image": x[i:i + 1]})[0].argmax() ==
                     ref.run({"image": x[i:i + 1]})[0].argmax() for i in range(20)])
    assert agree >= 0.9


def test_session_dequantizes_int8_io(cnn: SavedModel, cnn_fp32: bytes, calib_set) -> None:
    q = to_tflite(cnn.dir, "int8", calib=calib_set, io_type="int8", integer_only=True)
    s8, s32 = LiteRTSession(q.model_bytes), LiteRTSession(cnn_fp32)
    assert s8.tensor_specs("inputs", raw=True)[0].dtype == "int8"
    assert s8.tensor_specs("inputs")[0].dtype == "float32"
    x = calib_set.inputs["image"][:1]
    a, b = s8.run({"image": x})[0], s32.run({"serving_default_image:0": x})[0]
    assert a.dtype == np.float32
    cos = float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))
    assert cos > 0.99


def test_tflite_input_packaged_as_is(cnn: SavedModel, calib_set, tmp_path: Path) -> None:
    from types import SimpleNamespace

    q = to_tflite(cnn.dir, "int8", calib=calib_set, io_type="int8", integer_only=True)
    imp = SimpleNamespace(kind="tflite", source="m.tflite", onnx_path=None, saved_model_dir=None,
                          tflite_bytes=q.model_bytes, float_only=False, notes=[])
    r = build(cnn, "cortex-m7", tmp_path, imported=imp)
    m = _manifest(r.path)
    assert m["optimization"]["requested"] == "as-is" and m["optimization"]["mode"] == "int8"
    assert r.model_bytes == q.model_bytes and m["model"]["format"] == "tflm"


def test_onnx_without_onnx2tf_is_a_clear_error(cnn: SavedModel, tmp_path: Path) -> None:
    import importlib.util
    from types import SimpleNamespace

    if importlib.util.find_spec("onnx2tf") is not None:
        pytest.skip("onnx2tf is installed")
    imp = SimpleNamespace(kind="onnx", source="m.onnx", onnx_path=str(tmp_path / "m.onnx"),
                          saved_model_dir=None, tflite_bytes=None, float_only=False, notes=[])
    with pytest.raises(ModelError, match="onnx2tf"):
        build(cnn, "android-arm64", tmp_path, imported=imp)


def test_wide_dense_model_over_mcu_flash(wide: SavedModel, tmp_path: Path) -> None:
    with pytest.raises(BudgetError) as e:
        build(wide, "cortex-m4", tmp_path)
    assert "MB" in str(e.value) and "cortex-m4" in str(e.value)
