"""Session fixtures for the ``edgepack build`` tests: every model is built once per session.

* ``mlp``: a 64→32→10 Gemm/Relu MLP written with onnx.helper (weights trained on digits), with
  variants: an opset-11 graph with initializers listed as inputs and a ConstantOfShape weight,
  and one using an op no runtime has; calibration/eval ``.npz`` files.
* ``digits``: the Keras CNN of ``examples/digits.py`` exported with tf2onnx.
* ``logreg``: a skl2onnx LogisticRegression (int64 labels + ZipMap outputs).
* ``signed_mlp`` / ``digits_vnni``: bundles several tests inspect (signed int8 MLP for rpi4;
  digits int8 for x86-64-vnni with the candidate schemes measured).
* ``keys``: a fleet key pair and a second, untrusted public key.

Every test runs with its own temporary directory as the working directory.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).parent
ROOT = HERE.parents[3]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "examples"))

from build_models import (  # noqa: E402
    IN_NAME,
    MlpWeights,
    digits_flat,
    make_mlp,
    make_sklearn_logreg,
    train_mlp_weights,
)

# Fixed creation time for every build made here (reproducibility tests compare bytes).
EPOCH = "1700000000"


@dataclass(frozen=True)
class MlpFiles:
    dir: Path
    weights: MlpWeights
    model: Path  # opset 17, dynamic batch 'N'
    legacy: Path  # opset 11, initializers as inputs, W2 from ConstantOfShape + Add
    custom_op: Path  # com.example:FancyRelu
    calib: Path  # 200 training images under the input name
    eval: Path  # 450 test images + labels
    x_test: np.ndarray
    y_test: np.ndarray
    x_train: np.ndarray


@dataclass(frozen=True)
class DigitsFiles:
    model: Path
    calib: Path
    eval: Path
    input_name: str


@dataclass(frozen=True)
class LogregFiles:
    model: Path
    calib: Path
    eval: Path


@dataclass(frozen=True)
class Keys:
    private: Path
    public: Path
    key_id: str
    other_public: Path


@dataclass(frozen=True)
class Built:
    path: Path
    report: dict


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its own directory: stray files land there, never in the repo."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)


def _build(**kwargs: object) -> Built:
    from edgepack.host.build import build

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOURCE_DATE_EPOCH", EPOCH)
        r = build(**kwargs)
    return Built(r.path, r.report)


@pytest.fixture(scope="session")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> MlpFiles:
    d = tmp_path_factory.mktemp("mlp")
    x_tr, x_te, y_tr, y_te = digits_flat()
    w = train_mlp_weights(x_tr, y_tr)
    np.savez(d / "calib.npz", **{IN_NAME: x_tr[:200]})
    np.savez(d / "eval.npz", **{IN_NAME: x_te, "labels": y_te})
    return MlpFiles(
        dir=d, weights=w,
        model=make_mlp(d / "mlp.onnx", w),
        legacy=make_mlp(d / "legacy.onnx", w, opset=11, legacy=True),
        custom_op=make_mlp(d / "custom.onnx", w, custom_op=True),
        calib=d / "calib.npz", eval=d / "eval.npz",
        x_test=x_te, y_test=y_te, x_train=x_tr)


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> DigitsFiles:
    import onnx
    from digits import write_digits_example

    d = tmp_path_factory.mktemp("digits")
    files = write_digits_example(d, epochs=12)
    name = onnx.load(files["model"]).graph.input[0].name
    return DigitsFiles(files["model"], files["calibration"], files["eval"], name)


@pytest.fixture(scope="session")
def logreg(tmp_path_factory: pytest.TempPathFactory) -> LogregFiles:
    d = tmp_path_factory.mktemp("logreg")
    x_tr, x_te, y_tr, y_te = digits_flat()
    np.savez(d / "calib.npz", input=x_tr[:100])
    np.savez(d / "eval.npz", input=x_te[:100], labels=y_te[:100])
    return LogregFiles(make_sklearn_logreg(d / "logreg.onnx", x_tr, y_tr),
                       d / "calib.npz", d / "eval.npz")


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    from edgepack.host.keys import generate_keys

    d = tmp_path_factory.mktemp("keys")
    priv, pub, kid = generate_keys(d, "fleet")
    _, other_pub, _ = generate_keys(d, "other")
    return Keys(priv, pub, kid, other_pub)


@pytest.fixture(scope="session")
def signed_mlp(mlp: MlpFiles, keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Built:
    """int8 MLP for rpi4, signed, gated on labelled eval data."""
    return _build(model=str(mlp.model), target="rpi4", quantize="int8",
                  calibration=str(mlp.calib), eval=str(mlp.eval), key=str(keys.private),
                  out=str(tmp_path_factory.mktemp("signed")), variants=False)


@pytest.fixture(scope="session")
def digits_vnni(digits: DigitsFiles, keys: Keys,
                tmp_path_factory: pytest.TempPathFactory) -> Built:
    """Digits CNN, int8 for x86-64-vnni with the profile's candidate schemes measured."""
    return _build(model=str(digits.model), target="x86-64-vnni", quantize="int8",
                  calibration=str(digits.calib), eval=str(digits.eval),
                  key=str(keys.private), out=str(tmp_path_factory.mktemp("digits-vnni")),
                  variants=True)
