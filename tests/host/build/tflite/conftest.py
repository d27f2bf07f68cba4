"""Session fixtures for the TFLite / TFLM tests: small Keras models trained on sklearn's digits,
exported as SavedModels (what ``edgepack.host.build.importers`` hands the TFLite pipeline).

* ``cnn``: the digits CNN of ``examples/digits.py`` (~98 %), calibration and eval ``.npz``.
* ``leaky``: the same shape with LeakyReLU (int8 in TFLite, not on the Edge TPU's op list).
* ``sine``: a Dense model with a sin activation (no int8 kernel anywhere).
* ``big_act``: a 64x64x3 conv net whose activations exceed a Cortex-M4's arena.
* ``wide``: 64→1024→1024→10 Dense layers, over a Cortex-M4's flash partition.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tflite_helpers import SavedModel, build  # noqa: E402

ROOT = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT / "examples"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("SOURCE_DATE_EPOCH", "1700000000")


def _export(model: Any, d: Path) -> Path:
    model.export(str(d / "sm"), format="tf_saved_model", verbose=False)
    return d / "sm"


def _data(d: Path, x_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray) -> tuple[Path, Path]:
    np.savez(d / "calib.npz", image=x_tr[:200])
    np.savez(d / "eval.npz", image=x_te, labels=y_te)
    return d / "calib.npz", d / "eval.npz"


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, ...]:
    from digits import digits_data

    return digits_data()


@pytest.fixture(scope="session")
def cnn(digits: tuple, tmp_path_factory: pytest.TempPathFactory) -> SavedModel:
    from digits import train_keras_cnn

    x_tr, x_te, y_tr, y_te = digits
    d = tmp_path_factory.mktemp("cnn")
    model = train_keras_cnn(x_tr, y_tr, epochs=8)
    return SavedModel(_export(model, d), *_data(d, x_tr, x_te, y_te))


def _fit(model: Any, x: np.ndarray, y: np.ndarray, epochs: int) -> Any:
    import keras

    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="session")
def leaky(digits: tuple, tmp_path_factory: pytest.TempPathFactory) -> SavedModel:
    import keras

    x_tr, x_te, y_tr, y_te = digits
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8, 1), name="image"),
        keras.layers.Conv2D(8, 3, padding="same", name="conv"),
        keras.layers.LeakyReLU(negative_slope=0.1, name="leaky"),
        keras.layers.Flatten(),
        keras.layers.Dense(10, name="logits"),
    ])
    d = tmp_path_factory.mktemp("leaky")
    return SavedModel(_export(_fit(model, x_tr, y_tr, 3), d), *_data(d, x_tr, x_te, y_te))


@pytest.fixture(scope="session")
def sine(digits: tuple, tmp_path_factory: pytest.TempPathFactory) -> SavedModel:
    import keras

    x_tr, x_te, y_tr, y_te = digits
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8, 1), name="image"),
        keras.layers.Flatten(),
        keras.layers.Dense(32, name="hidden"),
        keras.layers.Activation(keras.ops.sin, name="sine_act"),
        keras.layers.Dense(10, name="logits"),
    ])
    d = tmp_path_factory.mktemp("sine")
    return SavedModel(_export(_fit(model, x_tr, y_tr, 3), d), *_data(d, x_tr, x_te, y_te))


@pytest.fixture(scope="session")
def big_act(tmp_path_factory: pytest.TempPathFactory) -> SavedModel:
    """Untrained: only its memory matters. Two 64x64x32 int8 activations live at once = 256 KiB."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((64, 64, 3), name="image"),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(4),
    ])
    d = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)
    x = rng.random((24, 64, 64, 3), dtype=np.float32)
    np.savez(d / "calib.npz", image=x[:16])
    np.savez(d / "eval.npz", image=x[16:])
    return SavedModel(_export(model, d), d / "calib.npz", d / "eval.npz")


@pytest.fixture(scope="session")
def wide(digits: tuple, tmp_path_factory: pytest.TempPathFactory) -> SavedModel:
    import keras

    x_tr, x_te, y_tr, y_te = digits
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8, 1), name="image"),
        keras.layers.Flatten(),
        keras.layers.Dense(1024, activation="relu"),
        keras.layers.Dense(1024, activation="relu"),
        keras.layers.Dense(10),
    ])
    d = tmp_path_factory.mktemp("wide")
    return SavedModel(_export(model, d), *_data(d, x_tr, x_te, y_te))


@pytest.fixture(scope="session")
def cnn_fp32(cnn: SavedModel) -> bytes:
    from edgepack.host.build.convert_tflite import to_tflite

    return to_tflite(cnn.dir, "none").model_bytes


@pytest.fixture(scope="session")
def calib_set(cnn: SavedModel) -> Any:
    from edgepack.host.build.data import Dataset

    with np.load(cnn.calib) as z:
        return Dataset({"image": z["image"][:100]}, None, "calib")


@pytest.fixture(scope="session")
def esp32_build(cnn: SavedModel, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The CNN built for esp32-s3 (tflm bundle with C sources)."""
    return build(cnn, "esp32-s3", tmp_path_factory.mktemp("esp32"))


@pytest.fixture(scope="session")
def coral_build(cnn: SavedModel, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build(cnn, "coral-edgetpu", tmp_path_factory.mktemp("coral"))
