"""Model importers: every input format ``build`` takes, one module per format behind a registry.

::

    .onnx                       → onnx        passed through (pre-flight happens in convert_onnx)
    .keras / .h5                → keras       Keras 3 → SavedModel → tf2onnx + the SavedModel
    SavedModel directory        → savedmodel  tf2onnx (ONNX) + the directory itself (TFLite)
    .tflite                     → tflite      checked, then packaged as is
    .pkl / .pickle / .joblib    → sklearn     scikit-learn estimator → skl2onnx
    .pmml (.xml holding <PMML>) → pmml        edgepack's PMML 4.x converter (host/build/pmml)

:data:`IMPORTERS` says how each format is recognised (suffix, first bytes, directory layout)
and which module loads it; adding a format is one entry there. The format modules import
TensorFlow, Keras, tf2onnx, skl2onnx, joblib and onnx inside their functions.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgepack.agent.errors import ModelError
from edgepack.host.build.importers.base import HDF5_MAGIC, TFLITE_ID, Imported

__all__ = ["IMPORTERS", "KINDS", "SUPPORTED_FORMATS", "Imported", "Importer", "detect_kind",
           "import_model"]


@dataclass(frozen=True)
class Importer:
    """One input format: how to recognise it and the module whose ``load()`` reads it.

    ``load(src, *, workdir, opset, sample_input) -> Imported`` lives in ``module`` (imported on
    use). ``checked_suffixes`` are suffixes trusted only when ``magic`` agrees with the content;
    ``mismatch`` is what to say when it does not.
    """

    kind: str
    module: str
    suffixes: tuple[str, ...] = ()
    magic: Callable[[bytes], bool] | None = None
    checked_suffixes: tuple[str, ...] = ()
    mismatch: str = ""
    directory: Callable[[Path], bool] | None = None

    def load(self, src: Path, *, workdir: Path, opset: int,
             sample_input: str | None) -> Imported:
        mod = importlib.import_module(self.module)
        return mod.load(src, workdir=workdir, opset=opset, sample_input=sample_input)


def _is_saved_model(path: Path) -> bool:
    return (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file()


_PKG = "edgepack.host.build.importers"
IMPORTERS: tuple[Importer, ...] = (
    Importer("onnx", f"{_PKG}.onnx", (".onnx",)),
    Importer("keras", f"{_PKG}.keras", (".keras", ".h5", ".hdf5"),
             magic=lambda head: head.startswith(HDF5_MAGIC)),
    Importer("saved_model", f"{_PKG}.savedmodel", directory=_is_saved_model),
    Importer("tflite", f"{_PKG}.tflite", (".tflite",), magic=lambda head: head[4:8] == TFLITE_ID),
    Importer("sklearn", f"{_PKG}.sklearn", (".pkl", ".pickle", ".joblib")),
    Importer("pmml", f"{_PKG}.pmml", (".pmml",), magic=lambda head: b"<PMML" in head,
             checked_suffixes=(".xml",), mismatch="is XML but not a PMML document (no <PMML> "
             "element)"),
)
KINDS = tuple(i.kind for i in IMPORTERS)
SUPPORTED_FORMATS = ("ONNX (.onnx), Keras (.keras, .h5), a TensorFlow SavedModel directory "
                     "(with saved_model.pb), TFLite (.tflite), scikit-learn (.pkl, .pickle, "
                     ".joblib) and PMML (.pmml, or .xml holding a <PMML> document)")


def _importer(path: Path) -> Importer:
    if path.is_dir():
        for imp in IMPORTERS:
            if imp.directory is not None and imp.directory(path):
                return imp
        raise ModelError(f"directory {path} is not a TensorFlow SavedModel (no saved_model.pb "
                         f"inside). edgepack reads {SUPPORTED_FORMATS}.", stage="import")
    if not path.is_file():
        raise ModelError(f"model {path} does not exist", stage="import")
    suffix = path.suffix.lower()
    for imp in IMPORTERS:
        if suffix in imp.suffixes:
            return imp
    head = _head(path, 4096)
    for imp in IMPORTERS:
        if suffix in imp.checked_suffixes:
            if imp.magic is not None and imp.magic(head):
                return imp
            raise ModelError(f"{path} {imp.mismatch}. edgepack reads {SUPPORTED_FORMATS}.",
                             stage="import")
    for imp in IMPORTERS:
        if imp.magic is not None and imp.magic(head):
            return imp
    raise ModelError(f"cannot tell the format of {path} (suffix '{path.suffix}'). edgepack "
                     f"reads {SUPPORTED_FORMATS}.", stage="import")


def detect_kind(path: str | Path) -> str:
    """The format of ``path`` (one of :data:`KINDS`), from its suffix or, failing that, content.

    Raises :class:`ModelError` for a missing path or a format edgepack does not read.
    """
    return _importer(Path(path)).kind


def _head(path: Path, n: int) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read(n)
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror}", stage="import") from None


def import_model(path: str | Path, *, workdir: Path, opset: int = 17,
                 sample_input: str | None = None) -> Imported:
    """Read the model at ``path`` and convert it for the engine, writing files into ``workdir``.

    ``opset`` is the ONNX opset asked of the converters. ``sample_input`` (an ``.npz`` holding one
    array shaped ``(N, n_features)``) defines a scikit-learn model's input: its float arrays give
    a float32 input, integer arrays an int64 one; without it the model's feature count gives a
    float32 ``(None, n_features)`` input. PMML and TensorFlow models define their own inputs.
    """
    src = Path(path)
    importer = _importer(src)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    return importer.load(src, workdir=workdir, opset=opset, sample_input=sample_input)
