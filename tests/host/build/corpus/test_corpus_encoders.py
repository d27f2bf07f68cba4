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
