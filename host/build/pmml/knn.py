"""NearestNeighborModel: the training instances as a constant matrix, distances to every one,
TopK, then the neighbours' targets averaged (regression) or voted (classification).

Distances: euclidean, squaredEuclidean, cityBlock, chebychev and minkowski with field weights;
``probabilities`` are vote shares; a tied vote goes to the first class in ``classes`` order
(the reference evaluator breaks ties its own way). A row with a missing input has no prediction.
"""

from __future__ import annotations

import numpy as np

from .document import Context, attr_float, child, children, unsupported
from .fields import constant
from .graph import Val
from .prediction import Classes, Prediction, argmax_label
from .transforms import column_name, table_rows

__all__ = ["compile_knn"]

_MEASURES = {"euclidean", "squaredEuclidean", "cityBlock", "chebychev", "minkowski"}


def compile_knn(ctx: Context, model, scope: dict, classes: Classes | None) -> Prediction:
    g = ctx.graph
    k = int(model.get("numberOfNeighbors", "1"))
    ti = child(model, "TrainingInstances")
    table = child(ti, "InlineTable") if ti is not None else None
    if table is None:
        raise unsupported(model, "needs TrainingInstances with an InlineTable",
                          "inline the training instances")
    columns = {f.get("field"): column_name(f.get("column", f.get("field")))
               for f in children(child(ti, "InstanceFields"), "InstanceField")}
    rows = table_rows(table)
    knn_inputs = children(child(model, "KNNInputs"), "KNNInput")
    measure_el = child(model, "ComparisonMeasure")
    measure = next((c.tag for c in children(measure_el)), "euclidean")
    if measure not in _MEASURES or measure_el.get("kind", "distance") != "distance":
        raise unsupported(measure_el, f"comparison {measure!r} is not supported",
                          "use a distance: " + ", ".join(sorted(_MEASURES)))
    ctx.use(f"NearestNeighborModel/{measure}")
    diffs, missing = [], ctx.falses
    for inp in knn_inputs:
        name = inp.get("field")
        if name not in scope:
            raise unsupported(inp, f"field {name!r} is not defined here")
        val = scope[name]
        missing = g.or_(missing, val.missing)
        train = np.array([constant(ctx, val.data_type, r[columns[name]], inp) for r in rows])
        weight = attr_float(inp, "fieldWeight", 1.0)
        compare = inp.get("compareFunction", measure_el.get("compareFunction", "absDiff"))
        x = g.column(g.clean(val))
        if compare == "absDiff":
            d = g.op("Abs", g.sub(x, g.const(train[None, :])))
        elif compare == "delta":
            d = g.to_double(g.op("Not", g.op("Equal", x, g.const(train[None, :]))))
        else:
            raise unsupported(inp, f"compareFunction={compare!r} is not supported",
                              "use absDiff or delta")
        diffs.append((d, weight))
    dist = _distance(g, measure, diffs, measure_el)
    neg = g.op("Neg", dist)
    _, idx = g.op("TopK", neg, g.const([k], np.int64), axis=1, outputs=2)
    target = model_target(model)
    if classes is None:
        values = np.array([float(r[columns[target]]) for r in rows])
        picked = g.op("Gather", g.const(values), idx, axis=0)
        method = model.get("continuousScoringMethod", "average")
        if method != "average":
            raise unsupported(model, f"continuousScoringMethod={method!r} is not supported",
                              "use average")
        value = g.div(g.op("ReduceSum", picked, g.const([1], np.int64), keepdims=0),
                      g.scalar(float(k)))
        return Prediction(Val(value, missing))
    labels = np.array([float(classes.index(r[columns[target]])) for r in rows])
    picked = g.op("Gather", g.const(labels), idx, axis=0)
    if model.get("categoricalScoringMethod", "majorityVote") != "majorityVote":
        raise unsupported(model, "only categoricalScoringMethod=majorityVote is supported")
    axis = g.const([1], np.int64)
    votes = [g.op("ReduceSum", g.to_double(g.op("Equal", picked, g.scalar(float(c)))), axis,
                  keepdims=0) for c in range(len(classes))]
    probs = [g.div(v, g.scalar(float(k))) for v in votes]
    return Prediction(Val(argmax_label(ctx, votes), missing), probs)


def model_target(model) -> str:
    from .models import target_field

    return target_field(model)


def _distance(g, measure: str, diffs: list, el) -> str:
    if measure == "chebychev":
        out = None
        for d, w in diffs:
            term = g.mul(d, g.scalar(w))
            out = term if out is None else g.op("Max", out, term)
        return out
    power = {"euclidean": 2.0, "squaredEuclidean": 2.0, "cityBlock": 1.0}.get(measure)
    if power is None:
        power = attr_float(child(el, "minkowski"), "p-parameter", 2.0)
    total = None
    for d, w in diffs:
        term = g.mul(g.op("Pow", d, g.scalar(power)) if power != 1.0 else d, g.scalar(w))
        total = term if total is None else g.add(total, term)
    if measure in {"euclidean", "minkowski"}:
        return g.op("Pow", total, g.scalar(1.0 / power))
    return total
