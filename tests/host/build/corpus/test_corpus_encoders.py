"""Keras transformer encoders (Embedding, MultiHeadAttention, LayerNormalization, GELU, Softmax)
converted by tf2onnx, through ``prepare_onnx``, agree with Keras."""

from __future__ import annotations

import numpy as np
import pytest
from wild_models import agreement, run_onnx

from edgepack.host.build.onnx_intake import prepare_onnx


@pytest.mark.parametrize("gelu", ["exact", "tanh"])
def test_encoder_prepared_matches_keras(gelu: str, encoders: dict) -> None:
    import keras

    art, onnx_path = encoders[gelu]
    r = prepare_onnx(onnx_path, target_opset=17)
    repaired = [s for s in r.steps if "Erfc" in s]
    assert bool(repaired) == (gelu == "exact")  # tf2onnx writes exact GELU with Erfc
    assert "Erfc" not in {n.op_type for n in r.model.graph.node}
    want = np.asarray(keras.saving.load_model(art.path)(art.inputs["ids"]))
    got = run_onnx(r.model, art.inputs)[0]
    diff, cos = agreement(want, got)
    assert diff < 1e-5 and cos > 0.99999


def test_encoder_ops_survive_intake(encoders: dict) -> None:
    _, onnx_path = encoders["exact"]
    ops = {n.op_type for n in prepare_onnx(onnx_path, target_opset=17).model.graph.node}
    assert {"Gather", "MatMul", "Softmax", "Erf", "ReduceMean"} <= ops


def test_encoder_builds_with_the_cli_and_agrees_with_keras(encoders: dict, tmp_path,
                                                           monkeypatch) -> None:
    """`edgepack build encoder.keras` (exact GELU, as docs/model-intake.md shows it): the import
    repairs tf2onnx's graph, the default search ships a variant that passes the gate, and the
    bundle's model agrees with Keras."""
    import json
    import shutil
    import zipfile

    import keras
    from click.testing import CliRunner

    from edgepack.host.cli import main

    art, _ = encoders["exact"]
    shutil.copy(art.path, tmp_path / "encoder.keras")
    rng = np.random.default_rng(5)
    np.savez(tmp_path / "calib.npz", ids=rng.integers(0, 64, (48, 16)).astype(np.int32))
    monkeypatch.chdir(tmp_path)

    result = CliRunner().invoke(main, ["build", "encoder.keras", "--target", "x86-64-vnni",
                                       "--calibration", "calib.npz", "--out", "dist",
                                       "--json"])

    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert any("Erfc" in n for n in report["model"]["import_notes"])
    acc = report["metrics"]["accuracy"]
    assert acc["drop_points"] <= 1.0
    assert sum(r["result"] == "chosen" for r in report["variants"]) == 1
    with zipfile.ZipFile(report["bundle"]["path"]) as z:
        (tmp_path / "shipped.onnx").write_bytes(z.read("model.onnx"))
    want = np.asarray(keras.saving.load_model(art.path)(art.inputs["ids"]))
    got = np.concatenate([run_onnx(tmp_path / "shipped.onnx", {"ids": row[None]})[0]
                          for row in art.inputs["ids"]])
    diff, cos = agreement(want, got)
    assert cos > 0.99 and diff < 0.05


@pytest.mark.parametrize("gelu", ["exact", "tanh"])
def test_layernorm_and_gelu_fused_into_standard_forms(gelu: str, encoders: dict,
                                                      tmp_path) -> None:
    """tf2onnx's moments-style LayerNorm becomes one LayerNormalization (opset 17) and exact
    GELU the form onnxruntime fuses into one Gelu kernel; the outputs still agree with Keras."""
    import keras
    import onnx
    import onnxruntime as ort

    from edgepack.host.build.onnx_fuse import fuse_standard

    art, onnx_path = encoders[gelu]
    model = prepare_onnx(onnx_path, target_opset=17).model
    before = {n.op_type for n in model.graph.node}
    step = fuse_standard(model)
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert step is not None and "2 LayerNorm block(s)" in step
    assert ops.count("LayerNormalization") == 2 and "LayerNormalization" not in before
    assert ("exact GELU" in step) == (gelu == "exact")
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    runtime_ops = {n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node}
    if gelu == "exact":
        assert "Gelu" in runtime_ops and "Erf" not in runtime_ops
    want = np.asarray(keras.saving.load_model(art.path)(art.inputs["ids"]))
    diff, cos = agreement(want, run_onnx(model, art.inputs)[0])
    assert diff < 1e-5 and cos > 0.99999
    assert fuse_standard(model) is None  # nothing left to fuse


def _moments_block(shape: list[int], extra_output: str | None = None):
    """tf2onnx's spelling of LayerNorm over the last axis of ``x`` (gamma 1..4, beta 0.1)."""
    from onnx import TensorProto, helper, numpy_helper

    c = {n: numpy_helper.from_array(np.asarray(v, np.float32).reshape(s), n) for n, v, s in (
        ("eps", [1e-5], ()), ("gamma", np.arange(1, 5), (4,)), ("beta", np.full(4, 0.1), (4,)))}
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["mean"]),
             helper.make_node("Sub", ["x", "mean"], ["d"]),
             helper.make_node("Mul", ["d", "d"], ["sq"]),
             helper.make_node("GlobalAveragePool", ["sq"], ["var"]),
             helper.make_node("Add", ["var", "eps"], ["ve"]),
             helper.make_node("Sqrt", ["ve"], ["sd"]),
             helper.make_node("Reciprocal", ["sd"], ["r"]),
             helper.make_node("Mul", ["r", "gamma"], ["s"]),
             helper.make_node("Neg", ["mean"], ["nm"]),
             helper.make_node("Mul", ["nm", "s"], ["ms"]),
             helper.make_node("Add", ["ms", "beta"], ["shift"]),
             helper.make_node("Mul", ["x", "s"], ["xs"]),
             helper.make_node("Add", ["xs", "shift"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)]
    if extra_output:
        outputs.append(helper.make_tensor_value_info(extra_output, TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, shape)], outputs, list(c.values()))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_fusion_of_a_moments_block_and_its_lookalikes() -> None:
    """Over the last axis of a rank-3 input the block becomes one LayerNormalization with the
    same outputs; a rank-4 input (GlobalAveragePool averages two axes) or a variance used
    elsewhere leaves it as it is."""
    import onnx

    from edgepack.host.build.onnx_fuse import fuse_standard

    model = _moments_block([2, 3, 4])
    x = np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32)
    want = run_onnx(model, {"x": x})[0]
    assert fuse_standard(model) == "fused 1 LayerNorm block(s) → LayerNormalization"
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["LayerNormalization"]
    assert np.allclose(run_onnx(model, {"x": x})[0], want, atol=1e-5)
    for lookalike in (_moments_block([1, 3, 4, 4]), _moments_block([2, 3, 4], "var")):
        n = len(lookalike.graph.node)
        assert fuse_standard(lookalike) is None and len(lookalike.graph.node) == n
