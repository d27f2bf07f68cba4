"""Typed holders for the importer tests' session models, and a helper to run ONNX outputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Digits:
    x_train: np.ndarray  # (N, 8, 8, 1) float32 in [0, 1]
    x_test: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray

    @property
    def flat_train(self) -> np.ndarray:
        return self.x_train.reshape(len(self.x_train), -1)

    @property
    def flat_test(self) -> np.ndarray:
        return self.x_test.reshape(len(self.x_test), -1)


@dataclass(frozen=True)
class TfModels:
    model: object  # the Keras model itself, for reference outputs
    keras: Path
    h5: Path
    saved_model: Path
    tflite: Path


@dataclass(frozen=True)
class SklModels:
    estimators: dict[str, object]  # name → fitted estimator
    files: dict[tuple[str, str], Path]  # (name, "joblib" | "pickle") → file
    sample: Path  # float64 (20, 64) under key "pixels"


@dataclass(frozen=True)
class PmmlModels:
    logreg: Path
    tree: Path
    logreg_ref: object  # the scikit-learn models the PMML was written from
    tree_ref: object


def run_onnx(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    """All outputs of an ONNX model with one input, keyed by output name."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {sess.get_inputs()[0].name: x})
    return {o.name: v for o, v in zip(sess.get_outputs(), outs, strict=True)}
