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
