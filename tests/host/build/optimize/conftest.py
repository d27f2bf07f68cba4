"""Session fixtures for the pruning and distillation tests: one wide Keras teacher on digits."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[3] / "examples"))

from optimize_models import (  # noqa: E402
    INPUT,
    TEACHER_EPOCHS,
    TEACHER_WIDTH,
    Digits,
    Teacher,
    onnx_accuracy,
    to_onnx,
)


@pytest.fixture(scope="session")
def digits() -> Digits:
    from digits import digits_data

    return Digits(*digits_data())


@pytest.fixture(scope="session")
def teacher(digits: Digits, tmp_path_factory: pytest.TempPathFactory) -> Teacher:
    from digits import train_keras_cnn

    d = tmp_path_factory.mktemp("teacher")
    model = train_keras_cnn(digits.x_train, digits.y_train, epochs=TEACHER_EPOCHS,
                            width=TEACHER_WIDTH)
    onnx_bytes = to_onnx(model)
    model.save(d / "teacher.keras")
    np.savez(d / "train.npz", x=digits.x_train, y=digits.y_train)
    np.savez(d / "val.npz", **{INPUT: digits.x_test, "labels": digits.y_test})
    return Teacher(model, onnx_bytes, onnx_accuracy(onnx_bytes, digits.x_test, digits.y_test),
                   d / "teacher.keras", d / "train.npz", d / "val.npz")
