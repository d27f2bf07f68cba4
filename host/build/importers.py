"""Model importers: every input format ``edgepack build`` takes, turned into what the pipeline needs.

::

    .onnx                       → passed through (pre-flight happens in convert_onnx)
    .keras / .h5                → Keras 3 → SavedModel → tf2onnx (ONNX) + the SavedModel (TFLite)
    SavedModel directory        → tf2onnx (ONNX) + the directory itself (TFLite)
    .tflite                     → checked, then packaged as is
    .pkl / .pickle / .joblib    → scikit-learn estimator → skl2onnx
    .pmml (.xml holding <PMML>) → sklearn-pmml-model → scikit-learn estimator → skl2onnx

Converted models are run once in onnxruntime next to the source model on a few inputs, so a
conversion that changes the model's outputs fails here instead of silently becoming the
accuracy gate's float reference. Models whose ONNX graph has nothing with an int8 kernel (tree
ensembles above all) come back with ``float_only=True``: the pipeline keeps them float and says so.

TensorFlow, Keras, tf2onnx, skl2onnx, joblib and sklearn-pmml-model are imported inside the
functions that need them.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.agent.errors import DataError, ModelError

__all__ = ["Imported", "KINDS", "SUPPORTED_FORMATS", "detect_kind", "import_model"]

KINDS = ("onnx", "keras", "saved_model", "tflite", "sklearn", "pmml")
SUPPORTED_FORMATS = ("ONNX (.onnx), Keras (.keras, .h5), a TensorFlow SavedModel directory "
                     "(with saved_model.pb), TFLite (.tflite), scikit-learn (.pkl, .pickle, "
                     ".joblib) and PMML (.pmml, or .xml holding a <PMML> document)")

_SUFFIXES = {
    ".onnx": "onnx", ".keras": "keras", ".h5": "keras", ".hdf5": "keras", ".tflite": "tflite",
    ".pkl": "sklearn", ".pickle": "sklearn", ".joblib": "sklearn", ".pmml": "pmml",
}
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_TFLITE_ID = b"TFL3"
_TF2ONNX_TIMEOUT = 1800  # seconds; big SavedModels take minutes, a hung converter must not hang CI

# Relative difference (to the output's magnitude) above which a conversion counts as broken.
_VERIFY_TOL = 1e-3
_VERIFY_SAMPLES = 16

# ONNX ops onnxruntime's quantizer gives int8 kernels; a graph with none of them gains nothing
# from quantization, so it stays float.
_INT8_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "Attention", "LSTM", "GRU",
                       "Gather", "EmbedLayerNormalization", "Einsum"})
_TREE_OPS = frozenset({"TreeEnsembleClassifier", "TreeEnsembleRegressor", "TreeEnsemble"})

# PMML model elements (PMML 4.4) and the ones sklearn-pmml-model reads.
_PMML_MODELS = ("AnomalyDetectionModel", "AssociationModel", "BayesianNetworkModel",
                "BaselineModel", "ClusteringModel", "GaussianProcessModel",
                "GeneralRegressionModel", "MiningModel", "NaiveBayesModel",
                "NearestNeighborModel", "NeuralNetwork", "RegressionModel", "RuleSetModel",
                "Scorecard", "SequenceModel", "SupportVectorMachineModel", "TextModel",
                "TimeSeriesModel", "TreeModel")
_PMML_SUPPORTED = ("RegressionModel", "GeneralRegressionModel", "TreeModel",
                   "MiningModel (random forest or gradient boosting segmentation)",
                   "NeuralNetwork", "SupportVectorMachineModel", "NaiveBayesModel",
                   "NearestNeighborModel")
_SKL2ONNX_LIST = "https://onnx.ai/sklearn-onnx/supported.html"


@dataclass(frozen=True)
class Imported:
    """A model read from any supported format, in the form the build pipeline consumes."""

    kind: str  # one of KINDS
    source: Path
    onnx_path: Path | None  # always set for onnx / keras / saved_model / sklearn / pmml
    saved_model_dir: Path | None  # keras / saved_model: the TFLite converter's input
    tflite_bytes: bytes | None  # tflite: packaged as is
    float_only: bool  # nothing in the model has int8 kernels: keep it float and say so
    notes: tuple[str, ...]  # what the importer did, for the build report


# --------------------------------------------------------------------------------------------
# detection


def detect_kind(path: str | Path) -> str:
    """The format of ``path`` (one of :data:`KINDS`), from its suffix or, failing that, content.

    Raises :class:`ModelError` for a missing path or a format edgepack does not read.
    """
    path = Path(path)
    if path.is_dir():
        if (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file():
            return "saved_model"
        raise ModelError(f"directory {path} is not a TensorFlow SavedModel (no saved_model.pb "
                         f"inside). edgepack reads {SUPPORTED_FORMATS}.", stage="import")
    if not path.is_file():
        raise ModelError(f"model {path} does not exist", stage="import")
    suffix = path.suffix.lower()
    if suffix in _SUFFIXES:
        return _SUFFIXES[suffix]
    head = _head(path, 4096)
    if suffix == ".xml":
        if b"<PMML" in head:
            return "pmml"
        raise ModelError(f"{path} is XML but not a PMML document (no <PMML> element). "
                         f"edgepack reads {SUPPORTED_FORMATS}.", stage="import")
    if head[4:8] == _TFLITE_ID:
        return "tflite"
    if head.startswith(_HDF5_MAGIC):
        return "keras"
    if b"<PMML" in head:
        return "pmml"
    raise ModelError(f"cannot tell the format of {path} (suffix '{path.suffix}'). edgepack "
                     f"reads {SUPPORTED_FORMATS}.", stage="import")


def _head(path: Path, n: int) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read(n)
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror}", stage="import") from None


# --------------------------------------------------------------------------------------------
# entry point


def import_model(path: str | Path, *, workdir: Path, opset: int = 17,
                 sample_input: str | None = None) -> Imported:
    """Read the model at ``path`` and convert it for the pipeline, writing files into ``workdir``.

    ``opset`` is the ONNX opset asked of the converters. ``sample_input`` (an ``.npz`` holding one
    array shaped ``(N, n_features)``) defines a scikit-learn or PMML model's input: its float
    arrays give a float32 input, integer arrays an int64 one; without it the model's feature
    count gives a float32 ``(None, n_features)`` input. TensorFlow models define their own inputs.
    """
    src = Path(path)
    kind = detect_kind(src)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if kind == "onnx":
        return _import_onnx(src)
    if kind == "keras":
        return _import_keras(src, workdir, opset)
    if kind == "saved_model":
        return _import_saved_model(src, workdir, opset)
    if kind == "tflite":
        return _import_tflite(src)
    if kind == "sklearn":
        return _import_sklearn(src, workdir, opset, sample_input)
    return _import_pmml(src, workdir, opset, sample_input)


# --------------------------------------------------------------------------------------------
# ONNX graph facts


def _load_onnx(path: Path) -> Any:
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise ModelError(f"{path} is not a readable ONNX model ({type(exc).__name__}). Is it "
                         "truncated, or a different format? Export it again.",
                         stage="import") from None


def _op_types(graph: Any) -> Iterator[str]:
    """Op types of a graph and of its subgraphs (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node.op_type
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _op_types(attr.g)
            for g in attr.graphs:
                yield from _op_types(g)


def _default_opset(model: Any) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _float_only(model: Any, what: str) -> str | None:
    """Why ``model`` must stay float, or None when it has int8-quantizable ops."""
    ops = set(_op_types(model.graph))
    trees = sorted(ops & _TREE_OPS)
    if trees:
        return (f"{what}: tree ensemble (ONNX {', '.join(trees)}), kept float32 "
                "(no int8 kernels for tree ensembles)")
    if ops and not ops & _INT8_OPS:
        return (f"{what}: its ONNX ops ({', '.join(sorted(ops))}) have no int8 kernels, "
                "kept float32")
    return None


def _import_onnx(src: Path) -> Imported:
    model = _load_onnx(src)
    notes = [f"ONNX model, opset {_default_opset(model)}"]
    reason = _float_only(model, src.name)
    if reason:
        notes.append(reason)
    return Imported("onnx", src, src, None, None, reason is not None, tuple(notes))


# --------------------------------------------------------------------------------------------
# checking a conversion


def _verify(onnx_path: Path, reference: Callable[[dict[str, np.ndarray]], Sequence[Any]],
            feeds: dict[str, np.ndarray], what: str) -> str:
    """Run the ONNX model and the source model on ``feeds``; fail if their outputs disagree.

    ``reference`` returns the source model's outputs in ONNX output order; an entry of None is
    not compared (e.g. class labels, reported as an agreement rate instead).
    """
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        got = sess.run(None, feeds)
    except Exception as exc:
        raise ModelError(f"the ONNX model converted from {what} does not run in onnxruntime: "
                         f"{_first_line(exc)}", stage="import") from None
    try:
        want = reference(feeds)
    except Exception as exc:  # e.g. a transformer that rejects random inputs, several outputs
        return f"conversion not checked against {what}: {_first_line(exc)}"
    n = len(next(iter(feeds.values())))
    worst = 0.0
    parts = []
    for out, g, w in zip(sess.get_outputs(), got, want, strict=False):
        if w is None:
            continue
        g, w = np.asarray(g), np.asarray(w)
        if g.dtype.kind in "iuUSOb" or w.dtype.kind in "iuUSOb":
            agree = float(np.mean(g.reshape(-1) == w.reshape(-1).astype(g.dtype)))
            parts.append(f"{out.name} agree on {agree:.0%}")
            continue
        if g.size != w.size:
            raise ModelError(f"ONNX output '{out.name}' has shape {g.shape} but {what} gives "
                             f"{w.shape}: the conversion is broken", stage="import")
        diff = float(np.max(np.abs(g.reshape(-1).astype(np.float64) - w.reshape(-1))))
        scale = 1.0 + float(np.max(np.abs(w)))
        if diff > _VERIFY_TOL * scale:
            raise ModelError(f"the ONNX model does not reproduce {what}: output '{out.name}' "
                             f"differs by up to {diff:.3g} on {n} check inputs. The converter "
                             "mishandled this model; report it upstream, or export ONNX "
                             "yourself and build that.", stage="import")
        worst = max(worst, diff)
    detail = "; ".join([f"max |Δ| {worst:.2g}", *parts])
    return f"checked: ONNX matches {what} on {n} inputs ({detail})"


def _random_feeds(onnx_path: Path, batch: int = _VERIFY_SAMPLES) -> dict[str, np.ndarray]:
    """Random inputs shaped like the model's (dynamic dims → ``batch`` first, 1 elsewhere)."""
    from edgepack.host.build.convert_onnx import tensor_specs

    ins, _ = tensor_specs(_load_onnx(onnx_path))
    rng = np.random.default_rng(0)
    feeds = {}
    for s in ins:
        shape = tuple((batch if i == 0 else 1) if d is None else d for i, d in enumerate(s.shape))
        dt = np.dtype(s.dtype)
        feeds[s.name] = (rng.random(shape).astype(dt) if dt.kind == "f"
                         else rng.integers(0, 2, shape).astype(dt))
    return feeds


# --------------------------------------------------------------------------------------------
# TensorFlow: Keras files and SavedModels


def _tf_env() -> dict[str, str]:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}


def _tf2onnx(saved_model: Path, out: Path, opset: int, workdir: Path, what: str) -> None:
    """SavedModel → ONNX in a child process (TensorFlow's graph state stays out of ours)."""
    cmd = [sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(saved_model),
           "--output", str(out), "--opset", str(opset)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=_tf_env(),
                           timeout=_TF2ONNX_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise ModelError(f"tf2onnx did not finish converting {what} within "
                         f"{_TF2ONNX_TIMEOUT} s", stage="import") from None
    if r.returncode == 0 and out.is_file():
        return
    log = workdir / "tf2onnx.log"
    log.write_text(r.stdout + r.stderr)
    lines = [ln.strip() for ln in r.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.search(r"(Error|Exception)\b", ln)]
    reason = (errors or lines or ["no output"])[-1]
    raise ModelError(f"tf2onnx could not convert {what} to ONNX opset {opset}: {reason[:400]} "
                     f"(full log: {log})", stage="import")


def _import_tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    return tf


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
            if f.read(8) == _HDF5_MAGIC:
                return
    raise ModelError(f"{src} is not an HDF5 file, so not a legacy Keras .h5 model. Is it "
                     "truncated, or another format? Save it again with model.save('model.h5') "
                     "or, better, model.save('model.keras').", stage="import")


def _import_keras(src: Path, workdir: Path, opset: int) -> Imported:
    _check_keras_file(src)
    _import_tf()
    import keras

    try:
        model = keras.models.load_model(src, compile=False)
    except Exception as exc:
        hint = ""
        msg = _first_line(exc)
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
                         f"{_first_line(exc)}", stage="import") from None
    onnx_path = workdir / f"{src.stem}.onnx"
    _tf2onnx(saved, onnx_path, opset, workdir, src.name)

    notes = [f"Keras {keras.__version__} {type(model).__name__} ({model.count_params():,} "
             f"parameters) → SavedModel → tf2onnx opset {opset}"]
    if src.suffix.lower() in (".h5", ".hdf5"):
        notes.append("legacy HDF5 (.h5) file: prefer the .keras format")
    notes.append(_verify(onnx_path, _keras_reference(model), _random_feeds(onnx_path),
                         "the Keras model"))
    return _tf_result("keras", src, onnx_path, saved, notes)


def _keras_reference(model: Any) -> Callable[[dict[str, np.ndarray]], list[Any]]:
    def run(feeds: dict[str, np.ndarray]) -> list[Any]:
        args = list(feeds.values())
        out = model(args[0] if len(args) == 1 else args, training=False)
        return _single_output(out)

    return run


def _single_output(out: Any) -> list[Any]:
    """One output compared; several are skipped (their ONNX order is tf2onnx's, not ours)."""
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, list | tuple):
        if len(out) != 1:
            raise ValueError(f"{len(out)} outputs: only single-output models are checked")
        out = out[0]
    return [np.asarray(out)]


def _import_saved_model(src: Path, workdir: Path, opset: int) -> Imported:
    onnx_path = workdir / f"{src.resolve().name or 'saved_model'}.onnx"
    _tf2onnx(src, onnx_path, opset, workdir, f"SavedModel {src}")
    notes = [f"TensorFlow SavedModel → tf2onnx opset {opset} (signature serving_default)"]
    notes.append(_verify(onnx_path, _saved_model_reference(src), _random_feeds(onnx_path),
                         "the SavedModel"))
    return _tf_result("saved_model", src, onnx_path, src, notes)


def _saved_model_reference(src: Path) -> Callable[[dict[str, np.ndarray]], list[Any]]:
    def run(feeds: dict[str, np.ndarray]) -> list[Any]:
        tf = _import_tf()
        fn = tf.saved_model.load(str(src)).signatures["serving_default"]
        names = list(fn.structured_input_signature[1])
        if sorted(names) != sorted(feeds):
            raise ValueError(f"signature inputs {names} differ from ONNX inputs {list(feeds)}")
        return _single_output(fn(**{k: tf.constant(v) for k, v in feeds.items()}))

    return run


def _tf_result(kind: str, src: Path, onnx_path: Path, saved: Path,
               notes: list[str]) -> Imported:
    reason = _float_only(_load_onnx(onnx_path), src.name)
    if reason:
        notes.append(reason)
    return Imported(kind, src, onnx_path, saved, None, reason is not None, tuple(notes))


# --------------------------------------------------------------------------------------------
# TFLite


def _import_tflite(src: Path) -> Imported:
    try:
        data = src.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read {src}: {exc.strerror}", stage="import") from None
    if len(data) < 8 or data[4:8] != _TFLITE_ID:
        raise ModelError(f"{src} is not a TFLite model (no 'TFL3' flatbuffer identifier at "
                         "bytes 4-8). Is it truncated, or another format? Convert it again "
                         "with tf.lite.TFLiteConverter.", stage="import")
    interp = _tflite_interpreter(data, src)
    notes = [f"TFLite flatbuffer ({len(data):,} bytes), packaged as is"]
    if interp is not None:
        ins = ", ".join(f"{d['name']} {d['dtype'].__name__}{list(d['shape'])}"
                        for d in interp.get_input_details())
        notes.append(f"loads in LiteRT; inputs: {ins}")
    return Imported("tflite", src, None, None, data, False, tuple(notes))


def _tflite_interpreter(data: bytes, src: Path) -> Any:
    """Load the model in LiteRT (or tf.lite) so a corrupt body fails here; None if neither."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            Interpreter = _import_tf().lite.Interpreter  # noqa: N806
        except ImportError:
            return None
    try:
        interp = Interpreter(model_content=data)
        interp.allocate_tensors()
    except Exception as exc:
        raise ModelError(f"{src} has a TFLite header but does not load in LiteRT: "
                         f"{_first_line(exc)}. Is it truncated or corrupt?",
                         stage="import") from None
    return interp


# --------------------------------------------------------------------------------------------
# scikit-learn


def _import_sklearn(src: Path, workdir: Path, opset: int, sample_input: str | None) -> Imported:
    est, load_notes = _unpickle(src)
    notes = ["unpickling runs code from the file: only import pickle/joblib files you trust",
             *load_notes]
    return _from_estimator("sklearn", src, est, _estimator_name(est), workdir, opset,
                           sample_input, notes)


def _unpickle(src: Path) -> tuple[Any, list[str]]:
    import joblib

    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            obj = joblib.load(src)
        except (ModuleNotFoundError, AttributeError) as exc:
            raise ModelError(f"{src.name} was pickled with code that is not installed here "
                             f"({_first_line(exc)}). Install the package that defines the "
                             "model's classes.", stage="import") from None
        except Exception as exc:  # pickle/joblib raise many types for foreign bytes
            raise ModelError(f"{src} is not a readable pickle or joblib file "
                             f"({type(exc).__name__}: {_first_line(exc)}). Save the fitted "
                             "estimator with joblib.dump(model, 'model.joblib').",
                             stage="import") from None
    for w in caught:
        if type(w.message).__name__ == "InconsistentVersionWarning":
            notes.append(f"warning: {_first_line(w.message)}")
    from sklearn.base import BaseEstimator

    if not isinstance(obj, BaseEstimator):
        raise ModelError(f"{src.name} holds a {type(obj).__module__}.{type(obj).__name__}, not "
                         "a scikit-learn estimator. Pickle the fitted estimator or Pipeline "
                         "itself.", stage="import")
    return obj, notes


def _estimator_name(est: Any) -> str:
    steps = getattr(est, "steps", None)
    if steps:
        return f"{type(est).__name__}({' → '.join(type(s).__name__ for _, s in steps)})"
    return type(est).__name__


def _from_estimator(kind: str, src: Path, est: Any, name: str, workdir: Path, opset: int,
                    sample_input: str | None, notes: list[str],
                    n_features: int | None = None) -> Imported:
    from sklearn.base import is_classifier
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    try:
        check_is_fitted(est)
    except NotFittedError:
        raise ModelError(f"{name} in {src.name} is not fitted: call fit() before saving it",
                         stage="import") from None
    except TypeError:
        pass  # not an estimator check_is_fitted understands; skl2onnx will judge
    n_features = n_features if n_features is not None else getattr(est, "n_features_in_", None)
    input_name, input_type, x_check, input_note = _input_type(sample_input, n_features, name)
    notes.append(input_note)

    onnx_path = workdir / f"{src.stem}.onnx"
    onx, conv_note = _skl2onnx(est, name, input_name, input_type, opset)
    onnx_path.write_bytes(onx.SerializeToString())
    notes.append(conv_note)
    outs = ", ".join(f"{o.name} ({_elem_name(o)})" for o in onx.graph.output)
    notes.append(f"outputs: {outs}")
    classifier = is_classifier(est)
    if classifier and hasattr(est, "classes_") and np.asarray(est.classes_).dtype.kind in "USO":
        notes.append("class labels are strings, so the label output is a string tensor; "
                     f"probability columns follow classes {list(est.classes_)[:20]}")

    if x_check is None:
        x_check = _random_feeds(onnx_path)[input_name]
    notes.append(_verify(onnx_path, _sklearn_reference(est, classifier, len(onx.graph.output)),
                         {input_name: x_check}, name))
    reason = _float_only(onx, name)
    if reason:
        notes.append(reason)
    return Imported(kind, src, onnx_path, None, None, reason is not None, tuple(notes))


def _sklearn_reference(est: Any, classifier: bool,
                       n_outputs: int) -> Callable[[dict[str, np.ndarray]], list[Any]]:
    def run(feeds: dict[str, np.ndarray]) -> list[Any]:
        x = next(iter(feeds.values()))
        if classifier:
            want: list[Any] = [est.predict(x)]
            if n_outputs > 1:
                want.append(est.predict_proba(x) if hasattr(est, "predict_proba") else None)
            return want
        return [np.asarray(est.predict(x)).reshape(len(x), -1)]

    return run


def _elem_name(vi: Any) -> str:
    from edgepack.host.build.convert_onnx import onnx_dtype_name

    t = vi.type
    if t.WhichOneof("value") != "tensor_type":
        return t.WhichOneof("value") or "unknown"
    dims = ["?" if not d.dim_value else str(d.dim_value) for d in t.tensor_type.shape.dim]
    return f"{onnx_dtype_name(t.tensor_type.elem_type)}[{', '.join(dims)}]"


def _input_type(sample_input: str | None, n_features: int | None,
                name: str) -> tuple[str, Any, np.ndarray | None, str]:
    """(input name, skl2onnx tensor type, up to 16 check rows, note) for the model's input."""
    from skl2onnx.common.data_types import FloatTensorType, Int64TensorType

    if sample_input is None:
        if not n_features:
            raise DataError(f"{name} does not record its number of features "
                            "(n_features_in_): pass --sample-input sample.npz holding an array "
                            "shaped (N, n_features)", stage="import")
        return ("input", FloatTensorType([None, n_features]), None,
                f"input 'input': float32 (N, {n_features}) from the model's n_features_in_")

    key, arr = _read_sample(Path(sample_input))
    if arr.ndim != 2:
        raise DataError(f"--sample-input array '{key}' has shape {arr.shape}; scikit-learn "
                        "models take (N, n_features)", stage="import")
    if n_features and arr.shape[1] != n_features:
        raise DataError(f"--sample-input array '{key}' has {arr.shape[1]} features per sample, "
                        f"but {name} was fitted on {n_features}", stage="import")
    input_name = key if key.isidentifier() and not key.startswith("arr_") else "input"
    rows = arr[:_VERIFY_SAMPLES]
    if arr.dtype.kind == "f":
        note = f"input '{input_name}': float32 (N, {arr.shape[1]}) from --sample-input"
        if arr.dtype != np.float32:
            note += (f" (the sample is {arr.dtype}; edge runtimes and int8 quantizers work in "
                     "float32)")
        return input_name, FloatTensorType([None, arr.shape[1]]), rows.astype(np.float32), note
    if arr.dtype.kind in "iu":
        return (input_name, Int64TensorType([None, arr.shape[1]]), rows.astype(np.int64),
                f"input '{input_name}': int64 (N, {arr.shape[1]}) from --sample-input "
                f"({arr.dtype} sample)")
    raise DataError(f"--sample-input array '{key}' is {arr.dtype}; give numeric features "
                    "(float or int)", stage="import")


def _read_sample(path: Path) -> tuple[str, np.ndarray]:
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"--sample-input {path} is not a readable .npz file ({exc}). Save one "
                        "array shaped (N, n_features) with numpy.savez.", stage="import") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        return "input", np.asarray(npz)  # a plain .npy holds one array
    with npz:
        arrays = {k: npz[k] for k in npz.files if k != "labels"}
    if len(arrays) != 1:
        raise DataError(f"--sample-input {path} holds {len(arrays)} arrays "
                        f"({', '.join(arrays) or 'none'}); give exactly one, shaped "
                        "(N, n_features)", stage="import")
    key, arr = next(iter(arrays.items()))
    if len(arr) == 0:
        raise DataError(f"--sample-input {path} holds zero samples", stage="import")
    return key, arr


def _skl2onnx(est: Any, name: str, input_name: str, input_type: Any,
              opset: int) -> tuple[Any, str]:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.exceptions import MissingConverter, MissingShapeCalculator
    from sklearn.base import is_classifier

    kwargs = {"initial_types": [(input_name, input_type)],
              "target_opset": {"": opset, "ai.onnx.ml": 3}}
    zipmap_off = is_classifier(est)
    try:
        with warnings.catch_warnings():
            # PMML trees carry no impurities, so feature_importances_ divides 0 by 0.
            warnings.simplefilter("ignore", RuntimeWarning)
            try:
                onx = convert_sklearn(est, options={"zipmap": False} if zipmap_off else None,
                                      **kwargs)
            except (NameError, RuntimeError, ValueError) as exc:
                if not zipmap_off or "zipmap" not in str(exc).lower():
                    raise
                zipmap_off = False  # no zipmap option for this classifier: outputs are tensors
                onx = convert_sklearn(est, **kwargs)
    except (MissingConverter, MissingShapeCalculator) as exc:
        m = re.search(r"<class '([\w.]+)'>", str(exc))
        which = m.group(1).rsplit(".", 1)[-1] if m else name
        raise ModelError(f"skl2onnx has no converter for {which} (in {name}). Use an estimator "
                         f"skl2onnx supports (skl2onnx.supported_converters(), or "
                         f"{_SKL2ONNX_LIST}), or register a converter for it.",
                         stage="import") from None
    except Exception as exc:
        raise ModelError(f"skl2onnx could not convert {name}: {type(exc).__name__}: "
                         f"{_first_line(exc)}", stage="import") from None
    opsets = {o.domain or "ai.onnx": o.version for o in onx.opset_import}
    used = ", ".join(f"{d} {v}" for d, v in sorted(opsets.items()))
    note = f"{name} → skl2onnx (opsets: {used}; asked for {opset})"
    if zipmap_off:
        note += "; zipmap off, so probabilities are a float tensor"
    return onx, note


# --------------------------------------------------------------------------------------------
# PMML


def _import_pmml(src: Path, workdir: Path, opset: int, sample_input: str | None) -> Imported:
    root = _parse_pmml(src)
    model_el = next((e for e in root if _local(e.tag) in _PMML_MODELS), None)
    if model_el is None:
        raise ModelError(f"{src} holds no PMML model element. Supported: "
                         f"{', '.join(_PMML_SUPPORTED)}.", stage="import")
    element = _local(model_el.tag)
    if element not in {s.split(" ")[0] for s in _PMML_SUPPORTED}:
        raise ModelError(f"PMML <{element}> in {src.name} is not supported: edgepack converts "
                         f"PMML through sklearn-pmml-model, which reads "
                         f"{', '.join(_PMML_SUPPORTED)}.", stage="import")
    n_features = _pmml_numeric_inputs(root, src)

    from sklearn_pmml_model.auto_detect import auto_detect_estimator

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pmml_est = auto_detect_estimator(str(src))
    except Exception as exc:  # sklearn-pmml-model raises bare Exceptions
        raise ModelError(f"sklearn-pmml-model cannot read the <{element}> in {src.name}: "
                         f"{_first_line(exc)}", stage="import") from None
    est = _plain_sklearn(pmml_est)
    _int_classes(est)
    est.n_features_in_ = n_features
    name = f"PMML <{element}> as {type(est).__name__}"
    notes = [f"{name} (sklearn-pmml-model); input columns follow the PMML DataDictionary order"]
    return _from_estimator("pmml", src, est, name, workdir, opset, sample_input, notes,
                           n_features=n_features)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _parse_pmml(src: Path) -> Any:
    from xml.etree import ElementTree

    try:
        root = ElementTree.parse(src).getroot()
    except ElementTree.ParseError as exc:
        raise ModelError(f"{src} is not well-formed XML ({exc}), so not a PMML document. Is it "
                         "truncated? Export it again.", stage="import") from None
    except OSError as exc:
        raise ModelError(f"cannot read {src}: {exc.strerror}", stage="import") from None
    if _local(root.tag) != "PMML":
        raise ModelError(f"{src} is XML with root <{_local(root.tag)}>, not a <PMML> document",
                         stage="import")
    return root


def _pmml_numeric_inputs(root: Any, src: Path) -> int:
    """Number of input fields; ONNX conversion needs them all continuous and untransformed."""
    fields = [e for e in root.iter() if _local(e.tag) == "DataField"]
    targets = {e.get("name") for e in root.iter() if _local(e.tag) == "MiningField"
               and e.get("usageType") in ("target", "predicted")}
    inputs = [f for f in fields if f.get("name") not in targets]
    categorical = [f.get("name") for f in inputs if f.get("optype") != "continuous"]
    if categorical:
        raise ModelError(f"PMML input field(s) {', '.join(categorical[:5])} in {src.name} are "
                         "categorical or ordinal: only "
                         "continuous (numeric) inputs convert to ONNX. Encode them as numbers "
                         "before training, or export ONNX directly.", stage="import")
    transforms = [e for e in root.iter() if _local(e.tag) in (
        "TransformationDictionary", "LocalTransformations")
        and any(_local(c.tag) == "DerivedField" for c in e)]
    if transforms:
        raise ModelError(f"{src.name} uses PMML <{_local(transforms[0].tag)}> preprocessing, "
                         "which sklearn-pmml-model does not carry into the model. Export the "
                         "model without derived fields (preprocess the data instead).",
                         stage="import")
    if not inputs:
        raise ModelError(f"{src.name} declares no input DataFields", stage="import")
    return len(inputs)


def _plain_sklearn(obj: Any) -> Any:
    """The scikit-learn estimator under a sklearn-pmml-model one (skl2onnx dispatches on type).

    Its trees are rebuilt as scikit-learn trees too: sklearn-pmml-model's own Tree cannot hand
    its nodes to numpy 2.
    """
    cls = type(obj)
    if cls.__module__.startswith("sklearn_pmml_model") and hasattr(obj, "__dict__"):
        base = next((c for c in cls.__mro__ if c.__module__.startswith("sklearn.")
                     and c.__name__ != "BaseEstimator"), None)
        if base is None:
            raise ModelError(f"sklearn-pmml-model's {cls.__name__} has no scikit-learn "
                             "counterpart to convert", stage="import")
        plain = base.__new__(base)
        plain.__dict__.update(vars(obj))
        obj = plain
    if type(getattr(obj, "tree_", None)).__module__.startswith("sklearn_pmml_model"):
        obj.tree_ = _sklearn_tree(obj.tree_)
    for attr in ("estimators_", "init_"):
        sub = getattr(obj, attr, None)
        if isinstance(sub, np.ndarray) and sub.dtype == object:
            setattr(obj, attr, np.vectorize(_plain_sklearn, otypes=[object])(sub))
        elif isinstance(sub, list):
            setattr(obj, attr, [_plain_sklearn(s) for s in sub])
        elif sub is not None and hasattr(sub, "__dict__") and attr == "init_":
            setattr(obj, attr, _plain_sklearn(sub))
    return obj


@contextlib.contextmanager
def _numpy1_flag() -> Iterator[None]:
    """sklearn-pmml-model's Cython Tree still reads ``numpy.NPY_DEFAULT``, gone in numpy 2."""
    missing = "NPY_DEFAULT" not in vars(np)
    if missing:
        np.NPY_DEFAULT = 0x0501  # NPY_ARRAY_CARRAY: C-contiguous, aligned, writeable
    try:
        yield
    finally:
        if missing:
            del np.NPY_DEFAULT


def _sklearn_tree(tree: Any) -> Any:
    from sklearn.tree._tree import NODE_DTYPE, Tree

    with _numpy1_flag():
        state = tree.__getstate__()
    if np.any(np.asarray(getattr(tree, "n_categories", [-1])) > 0):
        raise ModelError("the PMML tree splits on categorical fields, which ONNX trees cannot "
                         "express", stage="import")
    old = state["nodes"]
    nodes = np.zeros(len(old), dtype=NODE_DTYPE)
    for f in ("left_child", "right_child", "feature", "impurity", "n_node_samples",
              "weighted_n_node_samples"):
        nodes[f] = old[f]
    nodes["threshold"] = np.frombuffer(old["split_value"].tobytes(), dtype="<f8")
    values = np.asarray(state["values"], dtype=np.float64)
    if np.max(tree.n_classes) > 1:
        # scikit-learn ≥ 1.4 classification trees hold class fractions; sklearn-pmml-model's
        # forest segments hold record counts.
        totals = values.sum(axis=-1, keepdims=True)
        values = np.divide(values, totals, out=np.zeros_like(values), where=totals > 0)
    new = Tree(tree.n_features, np.asarray(tree.n_classes, dtype=np.intp), tree.n_outputs)
    new.__setstate__({"max_depth": state["max_depth"], "node_count": state["node_count"],
                      "nodes": nodes, "values": np.ascontiguousarray(values)})
    return new


def _int_classes(est: Any) -> None:
    """PMML class values arrive as strings; integer-valued ones become int64 labels."""
    classes = getattr(est, "classes_", None)
    if classes is None or np.asarray(classes).dtype.kind in "iu":
        return
    try:
        as_int = np.array([int(str(c)) for c in classes], dtype=np.int64)
    except ValueError:
        return
    if [str(c) for c in as_int] == [str(c) for c in classes]:
        est.classes_ = as_int


def _first_line(exc: object) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
