"""Symmetric int8 schemes reuse the asymmetric MinMax calibration: same model as calibrating."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgepack.agent.profiles import QuantScheme
from edgepack.host.build.data import Dataset
from edgepack.host.build.quantize import quantize_static


def _mlp() -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
         helper.make_node("Relu", ["h"], ["r"], name="act"),
         helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2")],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(rng.normal(size=(16, 32)).astype(np.float32), "W1"),
         numpy_helper.from_array(rng.normal(size=(32, 4)).astype(np.float32), "W2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString()


def test_symmetric_ranges_derived_from_the_asymmetric_cache_match_a_calibration(
        tmp_path: Path) -> None:
    model = _mlp()
    x = np.random.default_rng(1).normal(1.0, 2.0, size=(20, 16)).astype(np.float32)
    calib = Dataset({"x": x}, None, "test")
    u8 = QuantScheme(format="QDQ", activation_type="uint8", weight_type="int8", per_channel=True)
    s8 = QuantScheme(format="QDQ", activation_type="int8", weight_type="int8", per_channel=True)

    quantize_static(model, calib, u8, cache_dir=tmp_path)  # calibrates, writes asym ranges
    derived = quantize_static(model, calib, s8, cache_dir=tmp_path)
    fresh = quantize_static(model, calib, s8)

    assert (tmp_path / "ranges-minmax-sym.json").exists()
    assert derived.model_bytes == fresh.model_bytes


def test_weight_zero_points_dropped_with_the_same_outputs_and_kernels(tmp_path: Path) -> None:
    """QDQ models ship without the all-zero weight/bias zero points: same outputs, same fused
    integer kernels in onnxruntime, fewer bytes."""
    import onnx
    import onnxruntime as ort
    from onnxruntime import quantization as q

    from edgepack.host.build.quantize import drop_zero_points

    src, ref = tmp_path / "fp32.onnx", tmp_path / "ref.onnx"
    src.write_bytes(_mlp())
    x = np.random.default_rng(1).normal(1.0, 2.0, size=(20, 16)).astype(np.float32)

    class Reader:
        rows = iter([{"x": r[None]} for r in x])

        def get_next(self):
            return next(self.rows, None)

    q.quantize_static(str(src), str(ref), Reader(), quant_format=q.QuantFormat.QDQ,
                      per_channel=True, activation_type=q.QuantType.QUInt8,
                      weight_type=q.QuantType.QInt8)
    model = onnx.load(ref)
    assert drop_zero_points(model) == 2  # W1 and W2
    shipped = quantize_static(_mlp(), Dataset({"x": x}, None, "test"), QuantScheme(
        format="QDQ", activation_type="uint8", weight_type="int8", per_channel=True))
    assert len(shipped.model_bytes) < ref.stat().st_size
    assert shipped.model_bytes == model.SerializeToString()
    weights = [n for n in model.graph.node
               if n.op_type == "DequantizeLinear" and n.input[0].startswith("W")]
    assert weights and all(len(n.input) == 2 for n in weights)

    def run(model_bytes: bytes) -> tuple[np.ndarray, list[str]]:
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        s = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
        ops = sorted(n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node)
        return np.concatenate([s.run(None, {"x": r[None]})[0] for r in x]), ops

    (want, want_ops), (got, got_ops) = run(ref.read_bytes()), run(shipped.model_bytes)
    assert np.array_equal(want, got) and want_ops == got_ops
    assert "QLinearMatMul" in got_ops or "MatMulIntegerToFloat" in got_ops
