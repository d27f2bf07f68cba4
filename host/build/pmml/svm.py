"""SupportVectorMachineModel: linear, polynomial, radial-basis and sigmoid kernels over the
VectorDictionary (dense or sparse instances), one machine per column of one MatMul.

Classification votes: a machine whose value is below ``threshold`` votes for its
``targetCategory``, otherwise for ``alternateTargetCategory`` (one-against-one); one-against-all
picks the smallest value (the largest with ``maxWins``). ``probabilities`` are vote shares.
"""

from __future__ import annotations

import numpy as np

from .arrays import parse_array
from .document import Context, attr_float, child, children, unsupported
from .fields import constant
from .graph import Val
from .prediction import Classes, Prediction, argmax_label

__all__ = ["compile_svm"]


def _vector(inst, n: int) -> np.ndarray:
    sparse = child(inst, "REAL-SparseArray")
    if sparse is None:
        sparse = child(inst, "INT-SparseArray")
    if sparse is not None:
        out = np.zeros(int(sparse.get("n", n)))
        idx, vals = child(sparse, "Indices"), child(sparse, "REAL-Entries")
        if vals is None:
            vals = child(sparse, "INT-Entries")
        if idx is not None and vals is not None:
            for i, v in zip(parse_array(idx), parse_array(vals), strict=True):
                out[int(i) - 1] = float(v)
        return out
    arr = child(inst, "Array")
    if arr is None:
        raise unsupported(inst, "has no Array or REAL-SparseArray")
    return np.array([float(t) for t in parse_array(arr)])


def _features(ctx: Context, fields_el, scope: dict):
    g = ctx.graph
    cols, missing = [], ctx.falses
    for f in children(fields_el):
        name = f.get("field") if f.tag == "FieldRef" else f.get("name")
        if name not in scope:
            raise unsupported(f, f"field {name!r} is not defined here")
        val = scope[name]
        missing = g.or_(missing, val.missing)
        if f.tag == "CategoricalPredictor":
            hit = g.op("Equal", val.value, g.scalar(constant(ctx, val.data_type, f.get("value"),
                                                               f)))
            cols.append(g.mul(g.to_double(hit), g.scalar(attr_float(f, "coefficient", 1.0))))
        else:
            cols.append(g.clean(val))
    return g.concat(cols), missing, len(cols)


def _kernel(ctx: Context, model, x: str, sv: np.ndarray) -> str:
    g = ctx.graph
    dot = g.op("MatMul", x, g.const(sv.T))
    for tag in ("LinearKernelType", "PolynomialKernelType", "RadialBasisKernelType",
                "SigmoidKernelType"):
        k = child(model, tag)
        if k is None:
            continue
        ctx.use(f"SupportVectorMachineModel/{tag}")
        gamma, coef0 = attr_float(k, "gamma", 1.0), attr_float(k, "coef0", 1.0)
        if tag == "LinearKernelType":
            return dot
        if tag == "PolynomialKernelType":
            base = g.add(g.mul(dot, g.scalar(gamma)), g.scalar(coef0))
            return g.op("Pow", base, g.scalar(attr_float(k, "degree", 1.0)))
        if tag == "SigmoidKernelType":
            return g.op("Tanh", g.add(g.mul(dot, g.scalar(gamma)), g.scalar(coef0)))
        xx = g.op("ReduceSum", g.mul(x, x), g.const([1], np.int64), keepdims=1)
        dist = g.add(g.sub(xx, g.mul(dot, g.scalar(2.0))), g.const((sv * sv).sum(axis=1)))
        return g.op("Exp", g.mul(dist, g.scalar(-gamma)))
    raise unsupported(model, "has no kernel element", "add a *KernelType element")


def compile_svm(ctx: Context, model, scope: dict, classes: Classes | None) -> Prediction:
    g = ctx.graph
    vd = child(model, "VectorDictionary")
    machines = children(model, "SupportVectorMachine")
    if vd is None or not machines:
        raise unsupported(model, "needs a VectorDictionary and SupportVectorMachine elements")
    x, missing, n = _features(ctx, child(vd, "VectorFields"), scope)
    ids = [v.get("id") for v in children(vd, "VectorInstance")]
    vectors = np.vstack([_vector(v, n) for v in children(vd, "VectorInstance")]) if ids \
        else np.zeros((0, n))
    coefs, bias = np.zeros((max(len(ids), 1), len(machines))), np.zeros(len(machines))
    linear = model.get("svmRepresentation", "SupportVectors") == "Coefficients"
    for j, m in enumerate(machines):
        cs = child(m, "Coefficients")
        bias[j] = attr_float(cs, "absoluteValue", 0.0)
        values = [attr_float(c, "value", 0.0) for c in children(cs, "Coefficient")]
        if linear:
            coefs = np.zeros((n, len(machines))) if j == 0 else coefs
            coefs[:, j] = values
            continue
        refs = [r.get("vectorId") for r in children(child(m, "SupportVectors"),
                                                     "SupportVector")]
        for ref, c in zip(refs, values, strict=True):
            coefs[ids.index(ref), j] += c
    k = x if linear else _kernel(ctx, model, x, vectors)
    f = g.add(g.op("MatMul", k, g.const(coefs)), g.const(bias))
    if classes is None:
        return Prediction(Val(g.take(f, 0), missing))
    return _vote(ctx, model, machines, f, missing, classes)


def _vote(ctx, model, machines, f, missing, classes: Classes) -> Prediction:
    g = ctx.graph
    method = model.get("classificationMethod", "OneAgainstAll")
    threshold = attr_float(model, "threshold", 0.0)
    n = len(classes)
    votes = [g.add(ctx.zeros, g.scalar(0.0)) for _ in range(n)]
    if method == "OneAgainstOne" or len(machines) == 1:
        for j, m in enumerate(machines):
            first = classes.index(m.get("targetCategory"))
            alt = m.get("alternateTargetCategory")
            below = g.to_double(g.op("Less", g.take(f, j), g.scalar(threshold)))
            votes[first] = g.add(votes[first], below)
            if alt is not None:
                k = classes.index(alt)
                votes[k] = g.add(votes[k], g.sub(g.scalar(1.0), below))
        total = g.scalar(float(len(machines)))
        probs = [g.div(v, total) for v in votes]
        return Prediction(Val(argmax_label(ctx, votes), missing), probs)
    scores = [g.take(f, j) for j in range(len(machines))]
    if model.get("maxWins") != "true":
        scores = [g.op("Neg", s) for s in scores]
    order = [classes.index(m.get("targetCategory")) for m in machines]
    best = argmax_label(ctx, scores)
    label = g.op("Gather", g.const([float(o) for o in order]), g.op("Cast", best, to=7), axis=0)
    probs = [g.to_double(g.op("Equal", label, g.scalar(float(k)))) for k in range(n)]
    return Prediction(Val(label, missing), probs)
