"""``inspect_tflite``, ``check_with_tflm`` and ``check_with_litert`` on the corpus TFLite models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from wild_models import agreement

from edgepack.agent.errors import ModelError
from edgepack.host.build.tflite_intake import (
    check_with_litert,
    check_with_tflm,
    dequantize_output,
    inspect_tflite,
)

EXPECTED = {  # artifact → (quantized, weights_quantized, input dtype, report dtype)
    "tflite_float": (None, False, "float32", "float32"),
    "tflite_int8": ("int8", True, "int8", "int8"),
    "tflite_16x8": ("16x8", True, "int16", "16x8"),
    "tflite_uint8-io": ("int8", True, "uint8", "int8"),
    "tflite_dynamic": (None, True, "float32", "dynamic-int8"),
    "tflite_float16": (None, False, "float32", "float16"),
    "tflite_litert_refused": ("int8", True, "int8", "int8"),
    "tflite_uint8": ("uint8", True, "uint8", "uint8"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_inspect_reports_true_dtype_and_size(name: str, tflite_corpus: dict) -> None:
    art = tflite_corpus[name]
    info = inspect_tflite(art.path)
    quantized, weights_quantized, in_dtype, dtype = EXPECTED[name]
    assert info.quantized == quantized
    assert info.weights_quantized == weights_quantized
    assert info.dtype == dtype
    assert info.size_bytes == art.path.stat().st_size
    assert info.inputs[0].dtype == in_dtype and info.inputs[0].shape == (-1, 16, 16, 3)
    assert info.outputs[0].shape == (-1, 10)
    assert info.inputs[0].quantized == (in_dtype != "float32")
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "SOFTMAX"} <= set(info.ops)
    if quantized in ("int8", "16x8"):
        assert info.weight_bytes.get("float32", 0) == 0
        assert info.weight_bytes["int8"] >= 2_000


def test_quantized_sizes_are_smaller_than_float(tflite_corpus: dict) -> None:
    fp = inspect_tflite(tflite_corpus["tflite_float"].path)
    q8 = inspect_tflite(tflite_corpus["tflite_int8"].path)
    assert q8.weight_bytes["int8"] * 3.5 < fp.weight_bytes["float32"]
    assert q8.size_bytes < fp.size_bytes


def test_tflm_runs_int8_and_bisects_the_arena(tflite_corpus: dict) -> None:
    art = tflite_corpus["tflite_int8"]
    r = check_with_tflm(art.path, art.inputs)  # float image, quantized on the way in
    assert r.ok, r.reason
    # activations: 16x16x8 int8 (2 KiB) twice at most, plus TFLM's own structures
    assert 2_048 < r.arena_bytes < 32_768 and r.arena_bytes % 16 == 0
    smaller = check_with_tflm(art.path, art.inputs, max_arena=r.arena_bytes - 16)
    assert not smaller.ok
    lite = check_with_litert(art.path, art.inputs)
    assert lite.ok
    assert np.abs(r.outputs[0].astype(int) - lite.outputs[0].astype(int)).max() <= 1


def test_tflm_float_matches_litert(tflite_corpus: dict) -> None:
    art = tflite_corpus["tflite_float"]
    micro, lite = check_with_tflm(art.path, art.inputs), check_with_litert(art.path, art.inputs)
    assert micro.ok and lite.ok
    diff, cos = agreement(micro.outputs[0], lite.outputs[0])
    assert diff < 1e-5 and cos > 0.99999


def test_16x8_runs_in_both_interpreters(tflite_corpus: dict) -> None:
    art = tflite_corpus["tflite_16x8"]
    info = inspect_tflite(art.path)
    micro, lite = check_with_tflm(art.path, art.inputs), check_with_litert(art.path, art.inputs)
    assert micro.ok and lite.ok
    a, b = (dequantize_output(o.outputs[0], info.outputs[0]) for o in (micro, lite))
    assert np.abs(a - b).max() < 1e-3


def test_litert_refusal_is_a_reason_and_tflm_still_runs_it(tflite_corpus: dict) -> None:
    art = tflite_corpus["tflite_litert_refused"]
    inputs = tflite_corpus["tflite_int8"].inputs
    lite = check_with_litert(art.path, inputs)
    assert not lite.ok and lite.outputs == ()
    assert lite.reason.startswith("LiteRT refuses it:") and "CONV_2D" in lite.reason
    micro = check_with_tflm(art.path, inputs)
    assert micro.ok, micro.reason
    assert inspect_tflite(art.path).quantized == "int8"


def test_tflm_refusal_is_a_reason(tflite_corpus: dict) -> None:
    art = tflite_corpus["tflite_dynamic"]
    r = check_with_tflm(art.path, art.inputs, max_arena=1 << 20)
    assert not r.ok
    assert "FULLY_CONNECTED" in r.reason and "INT8" in r.reason


def test_float16_weights_are_reported_and_tflm_says_why(tflite_corpus: dict) -> None:
    art = tflite_corpus["tflite_float16"]
    info = inspect_tflite(art.path)
    assert info.weight_bytes["float16"] > 5_000 and "float32" not in info.weight_bytes
    assert info.ops[0] == "DEQUANTIZE"
    assert check_with_litert(art.path, art.inputs).ok
    micro = check_with_tflm(art.path, art.inputs, max_arena=1 << 20)
    assert not micro.ok and "DEQUANTIZE" in micro.reason


def test_uint8_per_channel_is_inspected_though_no_interpreter_runs_it(tflite_corpus: dict,
                                                                     ) -> None:
    art = tflite_corpus["tflite_uint8"]
    inputs = tflite_corpus["tflite_int8"].inputs
    assert inspect_tflite(art.path).weight_bytes["uint8"] >= 2_000
    lite, micro = check_with_litert(art.path, inputs), check_with_tflm(art.path, inputs)
    assert not lite.ok and "CONV_2D" in lite.reason
    assert not micro.ok and "CONV_2D" in micro.reason


def test_not_a_tflite_file(tmp_path: Path) -> None:
    bad = tmp_path / "m.tflite"
    bad.write_bytes(b"\0" * 64)
    with pytest.raises(ModelError, match="not a TFLite flatbuffer"):
        inspect_tflite(bad)
