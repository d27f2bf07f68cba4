"""RegressionModel: NumericPredictor (with exponent), CategoricalPredictor, PredictorTerm, and the
normalization methods for regression and classification.

A row with a missing number has no prediction; a missing category adds nothing. For classification,
``softmax`` and ``simplemax`` normalize over all tables; the other methods map each table but the
last through their inverse link and give the last one ``1 - sum(others)``.
"""

from __future__ import annotations

from .document import Context, attr_float, children, unsupported
from .fields import constant
from .graph import Val
from .links import inverse_link
from .prediction import Classes, Prediction, from_probabilities

__all__ = ["compile_regression", "linear_table"]

_METHODS = {"none", "softmax", "simplemax", "logit", "probit", "cloglog", "loglog", "cauchit",
            "exp"}


def linear_table(ctx: Context, table, scope: dict) -> Val:
    """intercept + sum of predictor terms of one RegressionTable."""
    g = ctx.graph
    total = g.add(ctx.zeros, g.scalar(attr_float(table, "intercept", 0.0)))
    missing = ctx.falses
    for p in children(table, "NumericPredictor"):
        val = _field(scope, p, p.get("name"))
        x = g.clean(val)
        exponent = attr_float(p, "exponent", 1.0)
        if exponent != 1.0:
            x = g.op("Pow", x, g.scalar(exponent))
        total = g.add(total, g.mul(x, g.scalar(attr_float(p, "coefficient"))))
        missing = g.or_(missing, val.missing)
        ctx.use("NumericPredictor")
    for p in children(table, "CategoricalPredictor"):
        val = _field(scope, p, p.get("name"))
        hit = g.op("Equal", val.value, g.scalar(constant(ctx, val.data_type, p.get("value"), p)))
        # a missing category matches no predictor (it adds nothing, as for an unseen one)
        total = g.add(total, g.mul(g.to_double(g.and_(hit, g.not_(val.missing))),
                                   g.scalar(attr_float(p, "coefficient"))))
        ctx.use("CategoricalPredictor")
    for p in children(table, "PredictorTerm"):
        term = g.scalar(attr_float(p, "coefficient"))
        for ref in children(p, "FieldRef"):
            val = _field(scope, ref, ref.get("field"))
            term = g.mul(term, g.clean(val))
            missing = g.or_(missing, val.missing)
        total = g.add(total, term)
        ctx.use("PredictorTerm")
    return Val(total, missing)


def _field(scope: dict, el, name: str) -> Val:
    if name not in scope:
        raise unsupported(el, f"field {name!r} is not defined here",
                          "define it in the DataDictionary or a DerivedField")
    return scope[name]


def compile_regression(ctx: Context, model, scope: dict, classes: Classes | None) -> Prediction:
    g = ctx.graph
    method = model.get("normalizationMethod", "none")
    if method not in _METHODS:
        raise unsupported(model, f"normalizationMethod={method!r} is not supported",
                          "use one of " + ", ".join(sorted(_METHODS)))
    ctx.use(f"RegressionModel/normalizationMethod={method}")
    tables = children(model, "RegressionTable")
    if not tables:
        raise unsupported(model, "has no RegressionTable", "re-export the model")
    if classes is None:
        val = linear_table(ctx, tables[0], scope)
        method = "logit" if method == "softmax" else method
        if method in {"simplemax"}:
            raise unsupported(model, "normalizationMethod=simplemax needs classification")
        return Prediction(Val(inverse_link(g, method, val.value), val.missing))
    ys = [linear_table(ctx, t, scope) for t in tables]
    missing = g.or_(*[y.missing for y in ys])
    order = [classes.index(t.get("targetCategory")) for t in tables]
    if method in {"softmax", "simplemax"}:
        xs = [y.value for y in ys]
        if method == "softmax":
            probs = g.softmax(xs)
        else:
            total = g.total(xs)
            probs = [g.div(x, total) for x in xs]
    else:
        probs = [inverse_link(g, method, y.value) for y in ys[:-1]]
        rest = g.scalar(1.0)
        for p in probs:
            rest = g.sub(rest, p)
        probs.append(g.add(ctx.zeros, rest))
    by_class = [g.add(ctx.zeros, g.scalar(0.0))] * len(classes)
    for k, p in zip(order, probs, strict=True):
        by_class[k] = p
    return from_probabilities(ctx, by_class, missing)
