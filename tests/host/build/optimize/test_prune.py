"""Magnitude pruning of ONNX and Keras models, and what the sparsity buys (compressed size)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from optimize_models import Digits, Teacher, keras_accuracy, onnx_accuracy, to_onnx

from edgepack.agent.errors import ModelError
from edgepack.host.build.prune import polynomial_sparsity, prune_keras, prune_onnx, sparsity_report


def test_prune_onnx_half_sparsity_keeps_accuracy(teacher: Teacher, digits: Digits) -> None:
    result = prune_onnx(teacher.onnx, 0.5)

    assert result.sparsity_achieved == pytest.approx(0.5, abs=1e-3)
    assert {v["op"] for v in result.per_layer.values()} == {"Conv", "MatMul"}
    assert len(result.per_layer) == 4  # two convs, two dense kernels
    report = sparsity_report(result.model_bytes)
    assert report.total_sparsity == pytest.approx(0.5, abs=1e-3)
    assert sparsity_report(teacher.onnx).total_sparsity < 0.01  # the input is untouched
    acc = onnx_accuracy(result.model_bytes, digits.x_test, digits.y_test)
    assert acc >= teacher.accuracy - 0.03
    assert any("unstructured" in n and "compressed size" in n for n in result.notes)


def test_prune_onnx_layer_scope_prunes_every_layer_alike(teacher: Teacher) -> None:
    result = prune_onnx(teacher.onnx, 0.5, scope="layer")

    for name, layer in result.per_layer.items():
        assert layer["sparsity"] == pytest.approx(0.5, abs=1.0 / layer["params"] + 1e-9), name


def test_pruned_model_compresses_smaller(teacher: Teacher) -> None:
    pruned = prune_onnx(teacher.onnx, 0.5).model_bytes

    report = sparsity_report(pruned, baseline=teacher.onnx)

    assert report.compressed_bytes < report.baseline_compressed_bytes
    assert report.compressed_ratio > 1.4
    # Zeros are stored densely: the raw size does not change, only the deflated one.
    assert report.model_bytes == pytest.approx(report.baseline_bytes, rel=0.01)


def test_sparsity_survives_int8_quantization(teacher: Teacher) -> None:
    from edgepack.agent.profiles import load_profile
    from edgepack.host.build.quantize import quantize_dynamic

    scheme = load_profile("rpi4").quantization.scheme
    pruned = prune_onnx(teacher.onnx, 0.5).model_bytes
    q_pruned = quantize_dynamic(pruned, scheme).model_bytes
    q_dense = quantize_dynamic(teacher.onnx, scheme).model_bytes

    report = sparsity_report(q_pruned, baseline=q_dense)

    assert report.total_sparsity == pytest.approx(0.5, abs=0.01)
    assert report.compressed_ratio > 1.2


def test_prune_onnx_refuses_a_quantized_model(teacher: Teacher) -> None:
    from edgepack.agent.profiles import load_profile
    from edgepack.host.build.quantize import quantize_dynamic

    q = quantize_dynamic(teacher.onnx, load_profile("rpi4").quantization.scheme).model_bytes

    with pytest.raises(ModelError, match="before quantizing"):
        prune_onnx(q, 0.5)


@pytest.mark.parametrize("bad", [0, 1, 1.0, -0.2, 1.5, math.nan, "half"])
def test_invalid_sparsity_is_a_clear_error(teacher: Teacher, digits: Digits, bad: object) -> None:
    with pytest.raises(ModelError, match="strictly between 0 and 1"):
        prune_onnx(teacher.onnx, bad)  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="strictly between 0 and 1"):
        prune_keras(teacher.model, bad, (digits.x_train, digits.y_train))  # type: ignore[arg-type]


def test_prune_onnx_rejects_unreadable_bytes() -> None:
    with pytest.raises(ModelError, match="not a readable ONNX model"):
        prune_onnx(b"\x00garbage", 0.5)


def test_polynomial_schedule_ramps_from_zero_to_target() -> None:
    values = [polynomial_sparsity(t, 0.8, 100) for t in range(0, 121)]

    assert values[0] == 0.0
    assert values[100] == values[120] == pytest.approx(0.8)
    assert all(a <= b for a, b in zip(values, values[1:], strict=False))
    assert values[10] > 0.8 * 0.1  # cubic: prunes fast early, slowly near the target


def test_fine_tuning_recovers_what_one_shot_pruning_loses(teacher: Teacher,
                                                          digits: Digits) -> None:
    train = (digits.x_train, digits.y_train)
    base = keras_accuracy(teacher.model, digits.x_test, digits.y_test)

    one_shot, _ = prune_keras(teacher.model, 0.8, train, epochs=0, scope="layer")
    tuned, result = prune_keras(teacher.model, 0.8, train, epochs=2, scope="layer")

    acc_one_shot = keras_accuracy(one_shot, digits.x_test, digits.y_test)
    acc_tuned = keras_accuracy(tuned, digits.x_test, digits.y_test)
    assert acc_tuned > acc_one_shot + 0.05
    assert acc_tuned >= base - 0.02
    assert result.sparsity_achieved == pytest.approx(0.8, abs=1e-3)
    for name, layer in result.per_layer.items():
        assert layer["sparsity"] == pytest.approx(0.8, abs=0.01), name
    # The caller's model stays dense.
    kernel = teacher.model.layers[1].kernel.numpy()
    assert (kernel == 0).mean() < 0.01


def test_prune_keras_global_stays_within_two_points_and_zeros_reach_onnx(
        teacher: Teacher, digits: Digits) -> None:
    import keras

    pruned, result = prune_keras(teacher.model, 0.8, (digits.x_train, digits.y_train), epochs=2)

    assert keras_accuracy(pruned, digits.x_test, digits.y_test) >= \
        keras_accuracy(teacher.model, digits.x_test, digits.y_test) - 0.02
    assert any("polynomial" in n for n in result.notes)
    # No pruning wrappers left: converters see plain layers with zero weights.
    onnx_report = sparsity_report(to_onnx(pruned), baseline=teacher.onnx)
    assert onnx_report.total_sparsity == pytest.approx(0.8, abs=1e-3)
    assert onnx_report.compressed_ratio > 2.5
    # model_bytes is the .keras archive of the pruned model.
    import io
    import zipfile

    assert zipfile.is_zipfile(io.BytesIO(result.model_bytes))
    assert [type(layer) for layer in pruned.layers] == \
        [type(layer) for layer in teacher.model.layers]
    assert isinstance(pruned, keras.Model)
    assert np.isfinite(pruned.predict(digits.x_test[:2], verbose=0)).all()
