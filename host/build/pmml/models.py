"""One model element in, one :class:`Prediction` out: MiningSchema, LocalTransformations, the
model body (by element name), Targets, and the OutputFields later segments may read."""

from __future__ import annotations

import functools

import numpy as np

from .document import Context, attr_float, child, children, unsupported
from .fields import apply_schema
from .graph import Val
from .prediction import Classes, Prediction
from .transforms import derive_fields, expression

__all__ = ["compile_model", "MODEL_TAGS", "target_field", "make_classes"]

MODEL_TAGS = {"TreeModel", "MiningModel", "RegressionModel", "GeneralRegressionModel",
              "NeuralNetwork", "SupportVectorMachineModel", "NearestNeighborModel",
              "NaiveBayesModel", "Scorecard", "RuleSetModel", "ClusteringModel",
              "AssociationModel", "SequenceModel", "TextModel", "TimeSeriesModel",
              "BaselineModel", "GaussianProcessModel", "AnomalyDetectionModel"}
_CLASS_ATTRS = {("ScoreDistribution", "value"), ("RegressionTable", "targetCategory"),
                ("PCell", "targetCategory"), ("SupportVectorMachine", "targetCategory"),
                ("SupportVectorMachine", "alternateTargetCategory"),
                ("TargetValueCount", "value"), ("TargetValue", "value")}


def target_field(model) -> str | None:
    schema = child(model, "MiningSchema")
    for mf in children(schema, "MiningField") if schema is not None else []:
        if mf.get("usageType") in {"target", "predicted"}:
            return mf.get("name")
    return None


def make_classes(ctx: Context, model) -> Classes:
    """Class labels: the target's declared values, else every label the model mentions."""
    name = target_field(model)
    spec = ctx.data_fields.get(name)
    numeric = spec is not None and not spec.is_string
    classes = Classes(spec.valid if spec is not None else (), numeric)
    if not classes.fixed:
        for el in model.iter():
            if not isinstance(el.tag, str):
                continue
            for tag, attr in _CLASS_ATTRS:
                if el.tag == tag and el.get(attr) is not None:
                    classes.index(el.get(attr))
            if el.tag == "Node" and el.get("score") is not None and _in_classifier_tree(el):
                classes.index(el.get("score"))
            if el.tag == "NormDiscrete" and el.getparent().tag == "DerivedField" and \
                    el.getparent().getparent().tag == "NeuralOutput":
                classes.index(el.get("value"))
    return classes


def _in_classifier_tree(node) -> bool:
    parent = node.getparent()
    while parent is not None and parent.tag != "TreeModel":
        parent = parent.getparent()
    return parent is not None and parent.get("functionName") == "classification"


def compile_model(ctx: Context, model, scope: dict, raw: dict | None = None,
                  classes: Classes | None = None) -> tuple[Prediction, dict]:
    """Compile ``model`` in ``scope``; return its prediction and its OutputFields by name."""
    tag = model.tag
    if tag not in _bodies():
        raise unsupported(model, f"<{tag}> is not supported",
                          "export the model as a tree, ensemble, regression, GLM, neural "
                          "network, SVM, k-NN, naive Bayes or scorecard model")
    ctx.use(tag)
    if model.get("isScorable") == "false":
        raise unsupported(model, "the model is marked isScorable=\"false\"",
                          "export a model that can score")
    function = model.get("functionName")
    if function not in {"classification", "regression"}:
        raise unsupported(model, f"functionName={function!r} is not supported",
                          "export a classification or regression model")
    inner = ctx.scoped(scope)
    view = apply_schema(inner, model, raw)
    if raw is not None:
        view = derive_fields(inner, child(ctx.root, "TransformationDictionary"), view,
                             tolerant=True)
    view = derive_fields(inner, child(model, "LocalTransformations"), view)
    inner = inner.scoped(view)
    if function == "classification" and classes is None:
        classes = make_classes(ctx, model)
    if function == "regression":
        classes = None
    pred = _bodies()[tag](inner, model, view, classes)
    if classes is None:
        pred = _targets(inner, model, pred)
    return pred, _output_fields(inner, model, view, pred, classes)


def _targets(ctx: Context, model, pred: Prediction) -> Prediction:
    g = ctx.graph
    targets = child(model, "Targets")
    if targets is None:
        return pred
    value = pred.value.value
    for t in children(targets, "Target"):
        ctx.use("Targets")
        lo, hi = attr_float(t, "min"), attr_float(t, "max")
        if lo is not None:
            value = g.op("Max", value, g.scalar(lo))
        if hi is not None:
            value = g.op("Min", value, g.scalar(hi))
        factor, shift = attr_float(t, "rescaleFactor", 1.0), attr_float(t, "rescaleConstant", 0.0)
        value = g.add(g.mul(value, g.scalar(factor)), g.scalar(shift))
        cast = t.get("castInteger")
        if cast is not None:
            ctx.use(f"Targets/castInteger={cast}")
            value = {"round": lambda v: g.op("Floor", g.add(v, g.scalar(0.5))),
                     "ceiling": lambda v: g.op("Ceil", v),
                     "floor": lambda v: g.op("Floor", v)}[cast](value)
        default = attr_float(t, "defaultValue")
        if default is not None:
            value = g.where(pred.value.missing, g.scalar(default), value)
            return Prediction(Val(value, ctx.falses), pred.probs)
    return Prediction(Val(value, pred.value.missing), pred.probs)


def _output_fields(ctx: Context, model, view: dict, pred: Prediction,
                   classes: Classes | None) -> dict:
    g = ctx.graph
    out: dict = {}
    output = child(model, "Output")
    if output is None:
        return out
    for of in children(output, "OutputField"):
        feature = of.get("feature", "predictedValue")
        name = of.get("name")
        if feature == "predictedValue":
            if classes is None:
                out[name] = pred.value
            else:
                codes = [ctx.vocab.code(c) for c in classes.labels] + [np.nan]
                safe = g.where(pred.value.missing, g.scalar(float(len(classes))),
                               pred.value.value)
                code = g.op("Gather", g.const(codes), g.op("Cast", safe, to=7), axis=0)
                out[name] = Val(code, pred.value.missing, True, "string")
        elif feature == "probability" and classes is not None:
            value = of.get("value")
            if value is None:
                continue
            p = pred.probs[classes.index(value)]
            out[name] = Val(p, pred.value.missing)
        elif feature == "transformedValue" and _has_expression(of):
            scope = dict(view)
            scope.update(out)
            expr = [c for c in children(of) if c.tag != "Decisions"][0]
            out[name] = expression(ctx, expr, scope)
    if out:
        ctx.use("Output")
    return out


def _has_expression(of) -> bool:
    return any(c.tag != "Decisions" for c in children(of))


@functools.cache
def _bodies() -> dict:
    """Model element name -> compile function (imported on first use: they import us)."""
    from .general_regression import compile_general_regression
    from .knn import compile_knn
    from .mining import compile_mining
    from .naive_bayes import compile_naive_bayes
    from .neural import compile_neural
    from .regression import compile_regression
    from .scorecard import compile_scorecard
    from .svm import compile_svm
    from .tree import compile_tree

    return {"TreeModel": compile_tree, "MiningModel": compile_mining,
            "RegressionModel": compile_regression,
            "GeneralRegressionModel": compile_general_regression,
            "NeuralNetwork": compile_neural, "SupportVectorMachineModel": compile_svm,
            "NearestNeighborModel": compile_knn, "NaiveBayesModel": compile_naive_bayes,
            "Scorecard": compile_scorecard}
