"""Every ``--quantize`` mode on an ARM target and an x86 target; pre-flight of awkward graphs."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from build_models import IN_NAME, OUT_NAME

from edgepack.agent.profiles import load_profile
from edgepack.host.build import build

TARGETS = ("rpi4", "x86-64-vnni")
MODES = ("int8", "dynamic", "fp16", "none", "auto")
_QDQ = {"QuantizeLinear", "DequantizeLinear"}
_DYNAMIC = {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul",
            "MatMulIntegerToFloat", "ConvInteger"}


def _member(path: Path, name: str) -> bytes:
    with zipfile.ZipFile(path) as zf:
        return zf.read(name)


def _run_model(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {IN_NAME: x[i:i + 1]})[0] for i in range(len(x))])


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_builds_a_gated_bundle(mlp, tmp_path, target, mode):
    # setup
    cfg = dict(model=str(mlp.model), target=target, quantize=mode,
               calibration=str(mlp.calib), eval=str(mlp.eval),
               out=str(tmp_path), variants=False)
    expected = load_profile(target).quantization.default if mode == "auto" else mode

    # execute
    result = build(**cfg)

    # assert
    import onnx

    opt = result.report.optimization
    assert result.path == tmp_path / f"mlp-1.0.0-{target}.edgepack"
    assert opt["requested"] == expected
    assert opt["mode"] == expected
    model_bytes = _member(result.path, "model.onnx")
    model = onnx.load_from_string(model_bytes)
    ops = {n.op_type for n in model.graph.node}
    if expected == "int8":
        assert ops >= _QDQ or any(o.startswith("QLinear") for o in ops)
        assert opt["quantized_ops"] >= 2  # both Gemms
        assert opt["calibration_samples"] == 200
    elif expected == "dynamic":
        assert ops & _DYNAMIC, ops
    elif expected == "fp16":
        assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
        # float32 I/O kept by default
        for vi in (*model.graph.input, *model.graph.output):
            assert vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    else:
        assert not ops & (_QDQ | _DYNAMIC)
        assert ops == {"Gemm", "Relu"}
    acc = result.report.metrics["accuracy"]
    assert acc["drop_points"] <= load_profile(target).quantization.max_drop_points
    ref = mlp.weights.logits(mlp.x_test)
    out = _run_model(model_bytes, mlp.x_test)
    if expected == "none":
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    elif expected == "fp16":
        np.testing.assert_allclose(out, ref, rtol=1e-2, atol=5e-2)
    else:
        assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.97
    ratio = result.report.metrics["size"]["ratio"]
    if expected == "none":
        assert ratio == pytest.approx(1.0)
    else:
        assert ratio > 1.5


def test_int8_weights_are_stored_as_int8(digits, tmp_path):
    result = build(model=str(digits.model), target="rpi4", quantize="int8",
                   calibration=str(digits.calib), eval=str(digits.eval),
                   out=str(tmp_path), variants=False)

    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(_member(result.path, "model.onnx"))
    by_dtype: dict[str, int] = {}
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        by_dtype[str(arr.dtype)] = by_dtype.get(str(arr.dtype), 0) + arr.nbytes
    # ~38k weights: all of them int8, only scales/biases left in wider types.
    assert by_dtype.get("int8", 0) > 30_000
    assert by_dtype.get("float32", 0) < 4_000
    assert result.report.metrics["size"]["ratio"] > 2.5


def test_legacy_graph_is_upgraded_and_folded(mlp, tmp_path):
    # opset 11, initializers listed as inputs, W2 computed by ConstantOfShape + Add
    result = build(model=str(mlp.legacy), target="rpi4", quantize="int8",
                   calibration=str(mlp.calib), eval=str(mlp.eval),
                   out=str(tmp_path), variants=False)

    import onnx

    steps = " | ".join(result.report.model["preflight"])
    assert "opset 11 → 17" in steps
    assert "listed as graph inputs" in steps
    assert "constants folded" in steps
    assert result.report.model["source_opset"] == 11
    manifest = result.report.model
    assert [i["name"] for i in manifest["inputs"]] == [IN_NAME]
    model = onnx.load_from_string(_member(result.path, "model.onnx"))
    assert {n.op_type for n in model.graph.node}.isdisjoint({"ConstantOfShape", "Add"})
    inits = {i.name for i in model.graph.initializer}
    # Each Gemm's weight is an int8 initializer behind a DequantizeLinear: W2 was folded in time.
    dq_of_init = {n.output[0] for n in model.graph.node
                  if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    assert len(gemms) == 2
    assert all(g.input[1] in dq_of_init for g in gemms)
    assert result.report.optimization["quantized_ops"] >= 2
    out = _run_model(_member(result.path, "model.onnx"), mlp.x_test)
    ref = mlp.weights.logits(mlp.x_test)
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.97


def test_legacy_graph_fp32_matches_numpy(mlp, tmp_path):
    result = build(model=str(mlp.legacy), target="rpi4", quantize="none",
                   eval=str(mlp.eval), out=str(tmp_path),
                   variants=False)

    out = _run_model(_member(result.path, "model.onnx"), mlp.x_test[:50])
    np.testing.assert_allclose(out, mlp.weights.logits(mlp.x_test[:50]), rtol=1e-4, atol=1e-4)


def test_dynamic_batch_is_fixed_to_one(mlp, tmp_path):
    result = build(model=str(mlp.model), target="rpi4", quantize="none",
                   eval=str(mlp.eval), out=str(tmp_path),
                   variants=False)

    import json

    manifest = json.loads(_member(result.path, "manifest.json"))
    assert manifest["model"]["inputs"][0]["shape"] == [1, 64]
    assert manifest["model"]["outputs"][0]["shape"] == [1, 10]
    assert any("dynamic batch fixed to 1" in s for s in result.report.model["preflight"])


def test_batch_flag_fixes_a_larger_batch(mlp, tmp_path):
    result = build(model=str(mlp.model), target="rpi4", quantize="none",
                   eval=str(mlp.eval), batch=4, out=str(tmp_path),
                   variants=False)

    assert result.report.model["inputs"][0]["shape"] == [4, 64]


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_calibration_method_and_sample_cap_recorded(mlp, tmp_path, method):
    result = build(model=str(mlp.model), target="rpi4", quantize="int8",
                   calibration=str(mlp.calib), eval=str(mlp.eval),
                   calibration_method=method, calibration_samples=50,
                   out=str(tmp_path), variants=False)

    opt = result.report.optimization
    assert opt["calibration_method"] == method
    assert result.report.metrics["accuracy"]["drop_points"] <= 1.0
    assert opt["calibration_samples"] == 50
    assert len(opt["calibration_fingerprint"]) == 16


def test_single_input_model_accepts_any_array_key(mlp, tmp_path):
    calib = tmp_path / "anykey.npz"
    np.savez(calib, images=mlp.x_train[:60])

    result = build(model=str(mlp.model), target="rpi4", quantize="int8",
                   calibration=str(calib), eval=str(mlp.eval),
                   out=str(tmp_path / "dist"), variants=False)

    assert result.report.optimization["calibration_samples"] == 60
    assert result.report.optimization["mode"] == "int8"


def test_calibration_larger_than_the_cap_builds(mlp, tmp_path):
    calib = tmp_path / "big.npz"
    np.savez(calib, **{IN_NAME: mlp.x_train[:300]})

    result = build(model=str(mlp.model), target="rpi4", quantize="int8",
                   calibration=str(calib), eval=str(mlp.eval),
                   out=str(tmp_path / "dist"), variants=False)

    assert result.report.optimization["calibration_samples"] == 256


def test_sklearn_labels_and_zipmap_build_and_say_what_was_not_compared(logreg, tmp_path):
    result = build(model=str(logreg.model), target="rpi4", quantize="none",
                   eval=str(logreg.eval), out=str(tmp_path),
                   variants=False, allow_non_tensor_outputs=True)

    acc = result.report.metrics["accuracy"]
    assert acc["compared"] == ["output_label"]
    assert "output_probability" in acc["not_compared"]
    assert "not compared" in acc["not_compared"]["output_probability"]
    assert acc["top1_agreement"] == 1.0
    assert acc["accuracy_fp32"] == acc["accuracy_optimized"] > 0.85
    with np.load(io.BytesIO(_member(result.path, "golden.npz"))) as golden:
        assert sorted(golden.files) == ["input_0", "output_0"]  # the ZipMap has no golden
        assert golden["output_0"].dtype == np.int64


def test_sklearn_model_dynamic_says_nothing_was_quantized(logreg, tmp_path):
    result = build(model=str(logreg.model), target="rpi4", quantize="dynamic",
                   eval=str(logreg.eval), out=str(tmp_path),
                   variants=False, allow_non_tensor_outputs=True)

    assert result.report.optimization["requested"] == "dynamic"
    assert result.report.optimization["mode"] == "none"
    assert any("nothing in this model was quantized" in w for w in result.report.warnings)


def test_build_leaves_no_stray_files_in_the_working_directory(logreg, tmp_path):
    # onnxruntime's symbolic shape inference drops 'sym_shape_infer_temp.onnx' into the working
    # directory when it cannot infer a graph (skl2onnx ai.onnx.ml ops): pre-flight must not.
    work = tmp_path / "work"
    work.mkdir()
    os.chdir(work)

    build(model=str(logreg.model), target="rpi4", quantize="none",
          eval=str(logreg.eval), out=str(tmp_path / "dist"),
          variants=False, allow_non_tensor_outputs=True)

    assert sorted(os.listdir(work)) == []


def test_sklearn_model_int8_builds_with_a_warning(logreg, tmp_path):
    result = build(model=str(logreg.model), target="rpi4", quantize="int8",
                   calibration=str(logreg.calib), eval=str(logreg.eval),
                   out=str(tmp_path), variants=False, allow_non_tensor_outputs=True)

    assert result.report.optimization["mode"] == "none"
    assert result.report.optimization["nodes_in_float"] == []
    assert any("nothing in this model was quantized" in w for w in result.report.warnings)
    assert "output_probability" in result.report.metrics["accuracy"]["not_compared"]


def test_output_name_is_kept(mlp, tmp_path):
    result = build(model=str(mlp.model), target="x86-64-vnni", quantize="fp16",
                   eval=str(mlp.eval), out=str(tmp_path),
                   variants=False)

    assert [o["name"] for o in result.report.model["outputs"]] == [OUT_NAME]
    assert "float32 I/O" in result.report.optimization["summary"]
