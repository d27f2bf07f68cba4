"""Knowledge distillation on digits: a much smaller student close to the teacher."""

from __future__ import annotations

import numpy as np
import pytest
from optimize_models import Digits, Teacher, keras_accuracy

from edgepack.agent.errors import DataError, ModelError
from edgepack.host.build.distill import DistillResult, build_student, distill, load_training_npz


@pytest.fixture(scope="module")
def small(teacher: Teacher, digits: Digits) -> DistillResult:
    return distill(teacher.model, digits.x_train, digits.y_train, student="small", epochs=60,
                   x_val=digits.x_test, y_val=digits.y_test)


def test_small_student_is_4x_smaller_within_2_points(small: DistillResult) -> None:
    assert small.size_ratio >= 4
    assert small.teacher_params >= 4 * small.student_params
    assert small.student_acc >= small.teacher_acc - 0.02
    assert small.teacher_acc > 0.95
    assert small.student_bytes * 4 <= small.teacher_bytes


def test_latency_measured_the_same_way_for_both(small: DistillResult) -> None:
    assert "onnxruntime" in small.latency_method
    assert small.teacher_latency_ms > 0 and small.student_latency_ms > 0
    # The student does ~20x fewer MACs; a generous margin keeps this stable on busy machines.
    assert small.student_latency_ms < small.teacher_latency_ms * 1.5


def test_student_is_a_plain_compiled_logits_model(small: DistillResult, digits: Digits) -> None:
    model = small.student_model
    assert model.inputs[0].name == "image"  # the teacher's input name, so build's data fits
    assert model.output_shape == (None, 10)
    assert keras_accuracy(model, digits.x_test, digits.y_test) == pytest.approx(small.student_acc)
    loss, acc = model.evaluate(digits.x_test, digits.y_test, verbose=0)
    assert acc == pytest.approx(small.student_acc, abs=1e-6)


def test_tiny_student_is_smaller_still(teacher: Teacher, digits: Digits,
                                       small: DistillResult) -> None:
    tiny = distill(teacher.model, digits.x_train, digits.y_train, student="tiny", epochs=15,
                   x_val=digits.x_test, y_val=digits.y_test, measure_latency=False,
                   hard_label_baseline=True)

    assert tiny.student_params < small.student_params
    assert tiny.size_ratio > 20
    assert tiny.student_acc > 0.9
    assert tiny.teacher_latency_ms is None and tiny.latency_method == "not measured"
    # The labels-only baseline is trained and reported next to the distilled student.
    assert tiny.hard_label_acc is not None and tiny.hard_label_acc > 0.85
    assert any("labels alone" in n for n in tiny.notes)


def test_custom_softmax_student_and_holdout(teacher: Teacher, digits: Digits) -> None:
    import keras

    student = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Flatten(),
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    seen = []

    result = distill(teacher.model, digits.x_train, digits.y_train, student=student, epochs=8,
                     measure_latency=False, on_epoch=lambda done, total: seen.append(done))

    assert result.student_model is student
    assert result.eval_samples == round(len(digits.x_train) * 0.15)
    assert "held out" in result.eval_source
    assert result.student_acc > 0.85
    assert seen == list(range(1, 9))


def test_build_student_for_feature_vectors() -> None:
    model = build_student("small", (64,), 3)

    assert model.output_shape == (None, 3)
    assert model.count_params() < 64 * 32 + 32 * 16 + 16 * 3 + 100


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"temperature": 0}, ModelError, "temperature"),
    ({"alpha": 1.5}, ModelError, "alpha"),
    ({"epochs": 0}, ModelError, "epochs"),
    ({"student": "huge"}, ModelError, "unknown student"),
])
def test_bad_arguments(teacher: Teacher, digits: Digits, kwargs: dict, error: type,
                       match: str) -> None:
    with pytest.raises(error, match=match):
        distill(teacher.model, digits.x_train, digits.y_train, **kwargs)


def test_bad_data(teacher: Teacher, digits: Digits) -> None:
    with pytest.raises(DataError, match="teacher takes"):
        distill(teacher.model, digits.x_train.reshape(len(digits.x_train), 64), digits.y_train)
    with pytest.raises(DataError, match="10 classes"):
        distill(teacher.model, digits.x_train, digits.y_train + 5)
    with pytest.raises(DataError, match="labels"):
        distill(teacher.model, digits.x_train, digits.y_train[:-3])


def test_load_training_npz_keys(teacher: Teacher, tmp_path) -> None:
    x, y = load_training_npz(teacher.train_npz, teacher.model)
    xv, yv = load_training_npz(teacher.val_npz, teacher.model, field="val")
    assert x.shape[1:] == xv.shape[1:] == (8, 8, 1)
    assert y.dtype == yv.dtype == np.int64

    np.savez(tmp_path / "nolabels.npz", x=x)
    with pytest.raises(DataError, match="no labels"):
        load_training_npz(tmp_path / "nolabels.npz", teacher.model)
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_training_npz(tmp_path / "junk.npz", teacher.model)
