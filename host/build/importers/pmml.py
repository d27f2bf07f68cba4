"""PMML documents: sklearn-pmml-model → scikit-learn estimator → skl2onnx."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.agent.errors import ModelError
from edgepack.host.build.importers.base import Imported, first_line
from edgepack.host.build.importers.sklearn import from_estimator

__all__ = ["load"]

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

def load(src: Path, *, workdir: Path, opset: int, sample_input: str | None) -> Imported:
    """A PMML document holding a model sklearn-pmml-model reads."""
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
                         f"{first_line(exc)}", stage="import") from None
    est = _plain_sklearn(pmml_est)
    _int_classes(est)
    est.n_features_in_ = n_features
    name = f"PMML <{element}> as {type(est).__name__}"
    notes = [f"{name} (sklearn-pmml-model); input columns follow the PMML DataDictionary order"]
    return from_estimator("pmml", src, est, name, workdir, opset, sample_input, notes,
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
