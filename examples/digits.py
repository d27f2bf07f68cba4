"""Example model: a small CNN trained on scikit-learn's bundled digits data, exported to ONNX.

Used by ``make demo``, the benchmarks and the tests; nothing is downloaded. Run it directly to
write ``model.onnx``, ``calib.npz`` and ``eval.npz`` into a folder::

    python examples/digits.py --out .demo/
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def digits_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, x_test, y_train, y_test): 8x8x1 float32 images in [0, 1], int64 labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    y = d.target.astype(np.int64)
    return tuple(train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y))


def train_keras_cnn(x: np.ndarray, y: np.ndarray, *, epochs: int = 12, seed: int = 0,
                    width: int = 16) -> object:
    """A small Keras CNN (~98% on digits)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((8, 8, 1), name="image"),
        keras.layers.Conv2D(width, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(width * 2, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10, name="logits"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0)
    return model


def keras_to_onnx(model: object, out: Path, opset: int = 17) -> Path:
    """Keras 3 → SavedModel → tf2onnx (``from_keras`` fails with Keras 3)."""
    with tempfile.TemporaryDirectory(prefix="edgepack-sm-") as tmp:
        model.export(tmp, format="tf_saved_model", verbose=False)
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
        r = subprocess.run([sys.executable, "-m", "tf2onnx.convert", "--saved-model", tmp,
                            "--output", str(out), "--opset", str(opset)],
                           capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"tf2onnx failed:\n{r.stderr[-2000:]}")
    return out


def write_digits_example(out_dir: str | Path, *, epochs: int = 12) -> dict[str, Path]:
    """Train the CNN and write model.onnx, calib.npz (200 train images) and eval.npz."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x_tr, x_te, y_tr, y_te = digits_data()
    model = train_keras_cnn(x_tr, y_tr, epochs=epochs)
    onnx_path = keras_to_onnx(model, out / "digits.onnx")
    import onnx

    name = onnx.load(onnx_path).graph.input[0].name
    np.savez(out / "calib.npz", **{name: x_tr[:200]})
    np.savez(out / "eval.npz", **{name: x_te, "labels": y_te})
    return {"model": onnx_path, "calibration": out / "calib.npz", "eval": out / "eval.npz"}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".demo")
    ap.add_argument("--epochs", type=int, default=12)
    args = ap.parse_args()
    for k, v in write_digits_example(args.out, epochs=args.epochs).items():
        print(f"{k:12s} {v}")
