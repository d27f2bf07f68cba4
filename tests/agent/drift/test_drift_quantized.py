"""Quantized int8/uint8 tensors are profiled and sketched in float terms: a reference made from
the model's own integers (with their scale and zero point) equals one made from the dequantized
floats, and a device fed integers sends the same window as one fed those floats."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from drift_models import IMAGE, LOGITS, DigitsCnn

from edgepack.agent.drift import DriftSketcher, DriftSpec, dequantize
from edgepack.agent.errors import BundleError
from edgepack.host.build.drift_reference import (
    DriftSample,
    make_reference,
    reference_json,
    reference_member,
)

IN_Q = (1 / 255, 0)  # uint8 pixels
OUT_Q = (0.125, -3)  # int8 logits


def _quantize(x: np.ndarray, q: tuple[float, int], dtype: type) -> np.ndarray:
    info = np.iinfo(dtype)
    return np.clip(np.round(x / q[0]) + q[1], info.min, info.max).astype(dtype)


def _without_sketches(ref: dict) -> dict:
    return {k: {f: v for f, v in fig.items() if f != "sketch"}
            for k, fig in ref["figures"].items()}


@pytest.fixture(scope="module")
def quantized(cnn: DigitsCnn) -> tuple[dict, dict]:
    x = _quantize(cnn.split.reference, IN_Q, np.uint8)
    y = _quantize(cnn.logits(dequantize(x, *IN_Q)), OUT_Q, np.int8)
    return {IMAGE: x}, {LOGITS: y}


def test_reference_of_quantized_tensors_is_the_one_of_their_float_values(quantized) -> None:
    (ins, outs), quant = quantized, {IMAGE: IN_Q, LOGITS: OUT_Q}
    ref = make_reference(ins, outs, task="classification", quantization=quant)
    floats = make_reference({IMAGE: dequantize(ins[IMAGE], *IN_Q)},
                            {LOGITS: dequantize(outs[LOGITS], *OUT_Q)}, task="classification")
    assert _without_sketches(ref) == _without_sketches(floats)  # KLL compaction is random
    assert ref["figures"]["i0.px"]["edges"][-1] <= 1.0
    spec = DriftSpec.from_reference(json.loads(reference_json(ref)))
    assert (spec.inputs[0].kind, spec.inputs[0].scale, spec.inputs[0].zero_point) == (
        "image", pytest.approx(IN_Q[0]), 0)
    assert (spec.outputs[0].kind, spec.outputs[0].activation, spec.outputs[0].scale,
            spec.outputs[0].zero_point) == ("probabilities", "softmax", 0.125, -3)
    # float tensors keep the spec as it was: no scale in their JSON
    assert "scale" not in floats["spec"]["inputs"][0]
    assert DriftSpec.from_reference(floats).inputs[0].scale == 0.0


def test_reference_member_says_which_tensors_it_dequantized(quantized) -> None:
    ins, outs = quantized
    member, entry = reference_member(DriftSample(ins, outs, {IMAGE: IN_Q, LOGITS: OUT_Q}))
    assert entry["task"] == "classification"  # read from the dequantized int8 scores
    assert entry["dequantized"] == [IMAGE, LOGITS] and entry["figures"] == 4
    assert list(member) == ["drift.json"]


def test_a_device_fed_integers_sends_the_window_of_their_float_values(cnn, quantized) -> None:
    from datasketches import kll_floats_sketch

    ins, outs = quantized
    ref = make_reference(ins, outs, task="classification",
                         quantization={IMAGE: IN_Q, LOGITS: OUT_Q})
    spec = DriftSpec.from_reference(ref)
    raw, flt = (DriftSketcher(spec, sample_rate=1.0, seed=3) for _ in range(2))
    for i in range(50):
        x, y = ins[IMAGE][i:i + 1], outs[LOGITS][i:i + 1]
        raw.observe({IMAGE: x}, {LOGITS: y})
        flt.observe({IMAGE: dequantize(x, *IN_Q)}, {LOGITS: dequantize(y, *OUT_Q)})
    a, b = raw.take_window(), flt.take_window()
    assert (a["c"], a["sum"], a["rows"]) == (b["c"], b["sum"], b["rows"])
    assert set(a["s"]) == set(b["s"]) == {"i0.c0", "i0.px"}
    for key in a["s"]:  # the same values went in (KLL compaction is random: not the bytes)
        sa, sb = (kll_floats_sketch.deserialize(base64.b64decode(w["s"][key])) for w in (a, b))
        assert (sa.n, sa.get_min_value(), sa.get_max_value()) == (
            sb.n, sb.get_min_value(), sb.get_max_value())
    assert sa.get_max_value() <= 1.0


@pytest.mark.parametrize("scale", ["-1", "nan", "inf"])
def test_a_bad_scale_in_drift_json_is_a_bundle_error(cnn: DigitsCnn, scale: str) -> None:
    doc = json.loads(reference_json(cnn.reference))
    doc["spec"]["inputs"][0]["scale"] = float(scale)
    with pytest.raises(BundleError, match="spec is malformed"):
        DriftSpec.from_reference(doc)
