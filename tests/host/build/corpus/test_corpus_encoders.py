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
