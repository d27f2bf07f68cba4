"""Format detection, ONNX pass-through and the Imported record."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
from importer_models import Digits, SklModels
from onnx import TensorProto, helper

from edgepack.agent.errors import EdgepackError, ModelError
from edgepack.host.build.importers import KINDS, detect_kind, import_model


@pytest.mark.parametrize(("name", "kind"), [
    ("m.onnx", "onnx"), ("m.keras", "keras"), ("m.h5", "keras"), ("M.TFLITE", "tflite"),
    ("m.pkl", "sklearn"), ("m.pickle", "sklearn"), ("m.joblib", "sklearn"), ("m.pmml", "pmml"),
])
def test_kind_by_suffix(name: str, kind: str, tmp_path: Path) -> None:
    (tmp_path / name).write_bytes(b"x")
    assert detect_kind(tmp_path / name) == kind
    assert kind in KINDS


@pytest.mark.parametrize(("head", "kind"), [
    (b"\x1c\x00\x00\x00TFL3\x00\x00", "tflite"),
    (b"\x89HDF\r\n\x1a\n\x00\x00", "keras"),
    (b'<?xml version="1.0"?>\n<PMML version="4.4">', "pmml"),
])
def test_kind_by_content_without_suffix(head: bytes, kind: str, tmp_path: Path) -> None:
    (tmp_path / "model").write_bytes(head + b"\x00" * 64)
    assert detect_kind(tmp_path / "model") == kind


def test_saved_model_directory_is_detected(tmp_path: Path) -> None:
    (tmp_path / "saved_model.pb").write_bytes(b"")
    assert detect_kind(tmp_path) == "saved_model"


def test_unknown_suffix_lists_supported_formats(tmp_path: Path) -> None:
    (tmp_path / "model.pt").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelError, match="cannot tell the format of .*model.pt") as err:
        import_model(tmp_path / "model.pt", workdir=tmp_path / "w")
    for fmt in (".onnx", ".keras", ".h5", "SavedModel", ".tflite", ".pkl", ".joblib", ".pmml"):
        assert fmt in str(err.value)
    assert isinstance(err.value, EdgepackError)


def test_missing_model(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        import_model(tmp_path / "nope.onnx", workdir=tmp_path / "w")


def _tiny_onnx(path: Path, op: str) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel())
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])] if op == "MatMul" else [
        helper.make_node("Relu", ["x"], ["y"])]
    graph = helper.make_graph(nodes, "g", [x], [y], [w] if op == "MatMul" else [])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_onnx_passes_through(tmp_path: Path) -> None:
    src = _tiny_onnx(tmp_path / "m.onnx", "MatMul")

    imp = import_model(src, workdir=tmp_path / "w")

    assert (imp.kind, imp.onnx_path, imp.float_only) == ("onnx", src, False)
    assert imp.notes == ("ONNX model, opset 17",)


def test_onnx_without_int8_kernels_is_float_only(tmp_path: Path) -> None:
    imp = import_model(_tiny_onnx(tmp_path / "relu.onnx", "Relu"), workdir=tmp_path / "w")

    assert imp.float_only
    assert "relu.onnx: its ONNX ops (Relu) have no int8 kernels, kept float32" in imp.notes


def test_onnx_tree_ensemble_is_float_only(skl_models: SklModels, digits: Digits,
                                          tmp_path: Path) -> None:
    forest = import_model(skl_models.files["forest", "joblib"], workdir=tmp_path / "a")

    again = import_model(forest.onnx_path, workdir=tmp_path / "b")

    assert again.kind == "onnx" and again.float_only
    assert any("tree ensemble" in n for n in again.notes)


def test_broken_onnx(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(np.random.default_rng(5).bytes(512))
    with pytest.raises(ModelError, match="not a readable ONNX model"):
        import_model(tmp_path / "m.onnx", workdir=tmp_path / "w")


def test_imported_is_frozen(tmp_path: Path) -> None:
    imp = import_model(_tiny_onnx(tmp_path / "m.onnx", "MatMul"), workdir=tmp_path / "w")
    with pytest.raises(dataclasses.FrozenInstanceError):
        imp.kind = "keras"  # type: ignore[misc]
