"""The digits CNN as Keras trains it, built by edgepack into TFLite bundles with drift.json.

Same data split as :mod:`drift_models` (train, reference = calibration + eval, unseen stream);
the model is ``examples/digits.py``'s Keras CNN (narrower, fewer epochs: a few seconds).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from drift_models import IMAGE, digits_split

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@dataclass(frozen=True)
class KerasDigits:
    """The saved Keras model and the calibration/eval files edgepack builds it with."""

    model: Path
    calibration: Path
    eval: Path


def keras_digits(tmp_path_factory: object) -> KerasDigits:
    """The CNN trained on the drift split's training digits, written with its data once per
    test session (the host and the agent drift tests share it)."""
    folder = Path(tmp_path_factory.getbasetemp()) / "keras-digits"
    found = KerasDigits(folder / "digits_cnn.keras", folder / "calib.npz", folder / "eval.npz")
    if found.model.exists():
        return found
    from digits import train_keras_cnn

    split = digits_split()
    model = train_keras_cnn(split.train, split.train_labels, epochs=6, width=8)
    folder.mkdir(exist_ok=True)
    np.savez(found.calibration, **{IMAGE: split.reference[:300]})
    np.savez(found.eval, **{IMAGE: split.reference[300:]})
    model.save(found.model)  # last: its presence means the folder is complete
    return found


def tflite_bundle(digits: KerasDigits, out: Path, *, target: str, int8: bool,
                  key: Path | None = None) -> object:
    """Build the CNN for ``target`` as a TFLite bundle: float32, or full int8 with uint8 I/O."""
    from edgepack.host.build import build

    return build(model=str(digits.model), target=target, format="tflite",
                 quantize="int8" if int8 else "none", tflite_io="uint8" if int8 else None,
                 calibration=str(digits.calibration), eval=str(digits.eval), out=str(out),
                 variants=False, key=str(key) if key else None)
