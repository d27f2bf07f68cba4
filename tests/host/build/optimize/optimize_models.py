"""Helpers and data classes for the pruning and distillation tests.

The session teacher (conftest.py) is ``examples/digits.py``'s CNN at width 32 (~85k
parameters), trained once; its ONNX form is converted in-process with tf2onnx (seconds, no
SavedModel round trip).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TEACHER_WIDTH = 32
TEACHER_EPOCHS = 12
INPUT = "image"


@dataclass(frozen=True)
class Digits:
    x_train: np.ndarray
    x_test: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray


@dataclass(frozen=True)
class Teacher:
    model: Any
    onnx: bytes
    accuracy: float  # of the ONNX model on the test split
    keras_path: Path
    train_npz: Path  # x / y
    val_npz: Path  # input name / labels


def to_onnx(model: Any) -> bytes:
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec((None, 8, 8, 1), tf.float32, name=INPUT),)
    proto, _ = tf2onnx.convert.from_function(tf.function(lambda x: model(x, training=False)),
                                             input_signature=spec, opset=17)
    return proto.SerializeToString()


def onnx_accuracy(model_bytes: bytes, x: np.ndarray, y: np.ndarray) -> float:
    from edgepack.host.build.validate import Session

    sess = Session(model_bytes)
    name = sess.sess.get_inputs()[0].name
    return float((sess.run({name: x})[0].argmax(axis=1) == y).mean())


def keras_accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    return float((model.predict(x, verbose=0).argmax(axis=1) == y).mean())
