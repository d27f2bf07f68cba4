"""Keras models (``.keras``, legacy ``.h5``): Keras 3 → SavedModel → tf2onnx, plus the
SavedModel for TFLite."""

from __future__ import annotations

import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.agent.errors import ModelError
from edgepack.host.build.importers.base import HDF5_MAGIC, Imported, first_line
from edgepack.host.build.importers.check import random_feeds, verify
from edgepack.host.build.importers.savedmodel import import_tf, single_output, tf2onnx, tf_result

__all__ = ["load"]


def _check_keras_file(src: Path) -> None:
    """Recognise a broken or foreign file before Keras prints a confusing error about it."""
    if src.suffix.lower() == ".keras":
        if not zipfile.is_zipfile(src):
            raise ModelError(f"{src} is not a Keras 3 archive (.keras files are zip archives). "
                             "Is it truncated, or another format? Save it again with "
                             "model.save('model.keras').", stage="import")
        with zipfile.ZipFile(src) as z:
            if "config.json" not in z.namelist():
                raise ModelError(f"{src} is a zip archive without config.json: not a Keras "
                                 "model. Save it with model.save('model.keras').",
                                 stage="import")
        return
    # HDF5 files may start with a user block of 512 · 2^k bytes.
    with src.open("rb") as f:
        for offset in (0, 512, 1024, 2048, 4096):
            f.seek(offset)
            if f.read(8) == HDF5_MAGIC:
                return
    raise ModelError(f"{src} is not an HDF5 file, so not a legacy Keras .h5 model. Is it "
                     "truncated, or another format? Save it again with model.save('model.h5') "
                     "or, better, model.save('model.keras').", stage="import")


def load(src: Path, *, workdir: Path, opset: int, sample_input: str | None) -> Imported:
    """A Keras model file, loaded without compiling (safe mode: no Lambda layers)."""
    _check_keras_file(src)
    import_tf()
    import keras

    try:
        model = keras.models.load_model(src, compile=False)
    except Exception as exc:
        hint = ""
        msg = first_line(exc)
        if "custom" in msg.lower() or "could not locate" in msg.lower():
            hint = (" Custom layers must be importable and registered with "
                    "@keras.saving.register_keras_serializable.")
        elif "lambda" in msg.lower() or "safe_mode" in msg:
            hint = " Lambda layers are refused (safe mode): replace them with a registered layer."
        raise ModelError(f"Keras {keras.__version__} cannot load {src.name}: {msg}.{hint}",
                         stage="import") from None
    saved = workdir / "saved_model"
    shutil.rmtree(saved, ignore_errors=True)
    try:
        model.export(str(saved), format="tf_saved_model", verbose=False)
    except Exception as exc:
        raise ModelError(f"Keras could not export {src.name} as a SavedModel: "
                         f"{first_line(exc)}", stage="import") from None
    onnx_path = workdir / f"{src.stem}.onnx"
    repairs = tf2onnx(saved, onnx_path, opset, workdir, src.name)

    notes = [f"Keras {keras.__version__} {type(model).__name__} ({model.count_params():,} "
             f"parameters) → SavedModel → tf2onnx opset {opset}", *repairs]
    if src.suffix.lower() in (".h5", ".hdf5"):
        notes.append("legacy HDF5 (.h5) file: prefer the .keras format")
    notes.append(verify(onnx_path, _keras_reference(model), random_feeds(onnx_path),
                         "the Keras model"))
    return tf_result("keras", src, onnx_path, saved, notes)


def _keras_reference(model: Any) -> Callable[[dict[str, np.ndarray]], list[Any]]:
    def run(feeds: dict[str, np.ndarray]) -> list[Any]:
        args = list(feeds.values())
        out = model(args[0] if len(args) == 1 else args, training=False)
        return single_output(out)

    return run
