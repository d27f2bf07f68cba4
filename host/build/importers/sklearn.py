"""scikit-learn estimators (pickle/joblib files): skl2onnx, checked against the estimator.

Unpickling runs code from the file: only import pickle/joblib files you trust.
"""

from __future__ import annotations

import re
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.agent.errors import DataError, ModelError
from edgepack.host.build.importers.base import Imported, first_line
from edgepack.host.build.importers.check import VERIFY_SAMPLES, float_only, random_feeds, verify

__all__ = ["from_estimator", "load"]

_SKL2ONNX_LIST = "https://onnx.ai/sklearn-onnx/supported.html"


def load(src: Path, *, workdir: Path, opset: int, sample_input: str | None) -> Imported:
    """A pickled or joblib-dumped fitted estimator (or Pipeline)."""
    est, load_notes = _unpickle(src)
    notes = ["unpickling runs code from the file: only import pickle/joblib files you trust",
             *load_notes]
    return from_estimator("sklearn", src, est, _estimator_name(est), workdir, opset,
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
                             f"({first_line(exc)}). Install the package that defines the "
                             "model's classes.", stage="import") from None
        except Exception as exc:  # pickle/joblib raise many types for foreign bytes
            raise ModelError(f"{src} is not a readable pickle or joblib file "
                             f"({type(exc).__name__}: {first_line(exc)}). Save the fitted "
                             "estimator with joblib.dump(model, 'model.joblib').",
                             stage="import") from None
    for w in caught:
        if type(w.message).__name__ == "InconsistentVersionWarning":
            notes.append(f"warning: {first_line(w.message)}")
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


def from_estimator(kind: str, src: Path, est: Any, name: str, workdir: Path, opset: int,
                    sample_input: str | None, notes: list[str]) -> Imported:
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
    n_features = getattr(est, "n_features_in_", None)
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
        x_check = random_feeds(onnx_path)[input_name]
    notes.append(verify(onnx_path, _sklearn_reference(est, classifier, len(onx.graph.output)),
                         {input_name: x_check}, name))
    reason = float_only(onx, name)
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
                            "(n_features_in_): pass `sample_input=` sample.npz holding an array "
                            "shaped (N, n_features)", stage="import", field="sample_input")
        return ("input", FloatTensorType([None, n_features]), None,
                f"input 'input': float32 (N, {n_features}) from the model's n_features_in_")

    key, arr = _read_sample(Path(sample_input))
    if arr.ndim != 2:
        raise DataError(f"`sample_input=` array '{key}' has shape {arr.shape}; scikit-learn "
                        "models take (N, n_features)", stage="import", field="sample_input")
    if n_features and arr.shape[1] != n_features:
        raise DataError(f"`sample_input=` array '{key}' has {arr.shape[1]} features per sample, "
                        f"but {name} was fitted on {n_features}",
                        stage="import", field="sample_input")
    input_name = key if key.isidentifier() and not key.startswith("arr_") else "input"
    rows = arr[:VERIFY_SAMPLES]
    if arr.dtype.kind == "f":
        note = f"input '{input_name}': float32 (N, {arr.shape[1]}) from the sample input"
        if arr.dtype != np.float32:
            note += (f" (the sample is {arr.dtype}; edge runtimes and int8 quantizers work in "
                     "float32)")
        return input_name, FloatTensorType([None, arr.shape[1]]), rows.astype(np.float32), note
    if arr.dtype.kind in "iu":
        return (input_name, Int64TensorType([None, arr.shape[1]]), rows.astype(np.int64),
                f"input '{input_name}': int64 (N, {arr.shape[1]}) from the sample input "
                f"({arr.dtype} sample)")
    raise DataError(f"`sample_input=` array '{key}' is {arr.dtype}; give numeric features "
                    "(float or int)", stage="import", field="sample_input")


def _read_sample(path: Path) -> tuple[str, np.ndarray]:
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"`sample_input=` {path} is not a readable .npz file ({exc}). Save one "
                        "array shaped (N, n_features) with numpy.savez.",
                        stage="import", field="sample_input") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        return "input", np.asarray(npz)  # a plain .npy holds one array
    with npz:
        arrays = {k: npz[k] for k in npz.files if k != "labels"}
    if len(arrays) != 1:
        raise DataError(f"`sample_input=` {path} holds {len(arrays)} arrays "
                        f"({', '.join(arrays) or 'none'}); give exactly one, shaped "
                        "(N, n_features)", stage="import", field="sample_input")
    key, arr = next(iter(arrays.items()))
    if len(arr) == 0:
        raise DataError(f"`sample_input=` {path} holds zero samples", stage="import",
                        field="sample_input")
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
                         f"{first_line(exc)}", stage="import") from None
    opsets = {o.domain or "ai.onnx": o.version for o in onx.opset_import}
    used = ", ".join(f"{d} {v}" for d, v in sorted(opsets.items()))
    note = f"{name} → skl2onnx (opsets: {used}; asked for {opset})"
    if zipmap_off:
        note += "; zipmap off, so probabilities are a float tensor"
    return onx, note
