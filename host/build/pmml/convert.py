"""``convert_pmml(path)``: a PMML 4.1-4.4 document in, an ONNX model and its description out.

Outputs are plain tensors: for classification ``label`` [N] (strings as the document writes
them, int64 for integer targets) and ``probabilities`` [N, n_classes] in ``classes`` order; for
regression ``predicted`` [N] float64. A row without a prediction (missing values under
``nullPrediction``, ``invalidValueTreatment="returnInvalid"`` on an invalid value, no segment
taking part…) has ``NaN`` numbers and an empty label (the int64 minimum for integer targets).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepack.agent.errors import ModelError

from .document import Context, child, children, collect_strings, read_document, unsupported
from .fields import InputField, input_values, read_data_dictionary
from .graph import Graph, Vocabulary
from .models import MODEL_TAGS, compile_model, make_classes, target_field
from .transforms import read_functions

__all__ = ["convert_pmml", "PmmlModel", "OutputField", "InputField"]

INT_MISSING = np.iinfo(np.int64).min


@dataclass(frozen=True)
class OutputField:
    """An output of the converted model: name, tensor dtype and shape (None = rows)."""

    name: str
    dtype: str
    shape: tuple


@dataclass(frozen=True)
class PmmlModel:
    """The converted model and what it is made of (for the build report)."""

    onnx: object
    inputs: tuple
    outputs: tuple
    task: str
    classes: tuple
    features: tuple
    target: str | None = None
    producer: str = ""  # Header/Application name and version, as the document gives them
    version: str = ""  # the document's PMML version
    element: str = ""  # the top model element (TreeModel, MiningModel, ...)


def convert_pmml(path) -> PmmlModel:
    """Convert the PMML document at ``path``; raise ModelError naming element and line."""
    path = Path(path)
    root = read_document(path)
    try:
        return _convert(root)
    except ModelError as exc:
        exc.context.setdefault("path", str(path))
        raise
    except RecursionError:
        raise ModelError(f"{path}: the tree is too deep to convert; limit its depth before "
                         "export", path=str(path)) from None
    except (KeyError, ValueError, IndexError, TypeError, AttributeError) as exc:
        raise ModelError(f"{path}: the document could not be converted ({type(exc).__name__}: "
                         f"{exc}); check it validates against the PMML schema, or report it "
                         "with the document", path=str(path)) from exc


def _convert(root) -> PmmlModel:
    vocab = Vocabulary(collect_strings(root))
    ctx = Context(root, Graph(), vocab)
    read_data_dictionary(ctx)
    read_functions(ctx)
    models = [c for c in children(root) if c.tag in MODEL_TAGS]
    if not models:
        raise unsupported(root, "the document holds no model", "export a model into it")
    model = models[0]
    ctx.use(f"PMML-{root.get('version', '4')}")
    active = _active_fields(model, ctx)
    if not active:
        raise unsupported(model, "the model has no active input field", "export a model "
                          "that reads at least one field")
    inputs, raw = _inputs(ctx, active)
    pred, _ = compile_model(ctx, model, {}, raw=raw)
    return _finish(ctx, model, inputs, pred)


def _active_fields(model, ctx: Context) -> list[str]:
    schema = child(model, "MiningSchema")
    if schema is None:
        raise unsupported(model, "the model has no MiningSchema", "add one")
    names = []
    for mf in children(schema, "MiningField"):
        if mf.get("usageType", "active") == "active":
            name = mf.get("name")
            if name not in ctx.data_fields:
                raise unsupported(mf, f"active field {name!r} is not in the DataDictionary",
                                  "declare it there")
            names.append(name)
    return names


def _inputs(ctx: Context, active: list[str]):
    g = ctx.graph
    inputs, raw = input_values(ctx, active)
    first = raw[active[0]][0].value
    ctx.falses = g.false_like(first)
    ctx.zeros = g.to_double(ctx.falses)
    return inputs, raw


def _finish(ctx: Context, model, inputs: list, pred) -> PmmlModel:
    from onnx import TensorProto, helper

    g = ctx.graph
    missing = pred.value.missing
    if ctx.invalid:
        missing = g.or_(missing, *ctx.invalid)
    target = target_field(model)
    if model.get("functionName") == "regression":
        value = g.where(missing, g.scalar(np.nan), pred.value.value)
        g.nodes.append(helper.make_node("Identity", [value], ["predicted"]))
        outputs = [helper.make_tensor_value_info("predicted", TensorProto.DOUBLE, [None])]
        described = (OutputField("predicted", "float64", (None,)),)
        task, classes = "regression", ()
    else:
        classes = tuple(make_classes(ctx, model).labels)
        spec = ctx.data_fields.get(target)
        integer = spec is not None and spec.data_type == "integer"
        n = len(classes)
        safe = g.op("Cast", g.where(missing, g.scalar(float(n)), pred.value.value), to=7)
        if integer:
            table = g.const([int(float(c)) for c in classes] + [INT_MISSING], np.int64)
            label_type, label_dtype = TensorProto.INT64, "int64"
        else:
            table = g.const(list(classes) + [""], object)
            label_type, label_dtype = TensorProto.STRING, "string"
        g.nodes.append(helper.make_node("Gather", [table, safe], ["label"], axis=0))
        probs = g.concat([g.where(missing, g.scalar(np.nan), p) for p in pred.probs])
        g.nodes.append(helper.make_node("Identity", [probs], ["probabilities"]))
        outputs = [helper.make_tensor_value_info("label", label_type, [None]),
                   helper.make_tensor_value_info("probabilities", TensorProto.DOUBLE, [None, n])]
        described = (OutputField("label", label_dtype, (None,)),
                     OutputField("probabilities", "float64", (None, n)))
        task = "classification"
    _prune(g, ["label", "probabilities", "predicted"])
    onnx_model = g.model(inputs, outputs)
    return PmmlModel(onnx_model, tuple(ctx.inputs), described, task, classes,
                     tuple(sorted(ctx.features)), target, _producer(ctx.root),
                     ctx.root.get("version", ""), model.tag)


def _producer(root) -> str:
    header = child(root, "Header")
    app = child(header, "Application") if header is not None else None
    if app is None:
        return ""
    return " ".join(p for p in (app.get("name", ""), app.get("version", "")) if p)


def _prune(g: Graph, outputs: list[str]) -> None:
    """Drop nodes and initializers no output depends on."""
    needed = set(outputs)
    kept = []
    for node in reversed(g.nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    g.nodes[:] = list(reversed(kept))
    g.initializers[:] = [t for t in g.initializers if t.name in needed]

