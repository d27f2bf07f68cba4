"""GeneralRegressionModel: regression, generalLinear, generalizedLinear (every link function,
offset and trials), multinomialLogistic and ordinalMultinomial (cumulative links).

Each Parameter's value is the product of its PPMatrix cells: a factor cell is 1 where the field
equals the cell's value, a covariate cell is the field raised to the cell's value. A parameter
without cells is the intercept. A row with a missing predictor has no prediction.
"""

from __future__ import annotations

from .document import Context, attr_float, child, children, unsupported
from .fields import constant
from .graph import Val
from .links import LINKS, inverse_link
from .prediction import Classes, Prediction, from_probabilities

__all__ = ["compile_general_regression"]

_TYPES = {"regression", "generalLinear", "generalizedLinear", "multinomialLogistic",
          "ordinalMultinomial"}


def _parameters(ctx: Context, model, scope: dict) -> tuple[dict, str]:
    """Parameter name -> float64 [N] value, and the rows where a predictor is missing."""
    g = ctx.graph
    factors = {p.get("name") for p in children(child(model, "FactorList"), "Predictor")} \
        if child(model, "FactorList") is not None else set()
    cells: dict = {}
    pp = child(model, "PPMatrix")
    for cell in children(pp, "PPCell") if pp is not None else []:
        cells.setdefault(cell.get("parameterName"), []).append(cell)
    values, missing = {}, ctx.falses
    plist = child(model, "ParameterList")
    for p in children(plist, "Parameter") if plist is not None else []:
        name = p.get("name")
        value = g.add(ctx.zeros, g.scalar(1.0))
        for cell in cells.get(name, []):
            field = cell.get("predictorName")
            if field not in scope:
                raise unsupported(cell, f"predictor {field!r} is not defined here")
            val = scope[field]
            missing = g.or_(missing, val.missing)
            if field in factors:
                code = constant(ctx, val.data_type, cell.get("value"), cell)
                term = g.to_double(g.op("Equal", val.value, g.scalar(code)))
            else:
                exponent = float(cell.get("value", "1"))
                term = g.clean(val)
                if exponent != 1.0:
                    term = g.op("Pow", term, g.scalar(exponent))
            value = g.mul(value, term)
        values[name] = value
    return values, missing


def _linear(ctx: Context, model, params: dict, category: str | None) -> str:
    g = ctx.graph
    total = g.add(ctx.zeros, g.scalar(0.0))
    for cell in children(child(model, "ParamMatrix"), "PCell"):
        if cell.get("targetCategory") not in (None, category):
            continue
        name = cell.get("parameterName")
        if name not in params:
            raise unsupported(cell, f"parameter {name!r} is not in the ParameterList")
        total = g.add(total, g.mul(params[name], g.scalar(attr_float(cell, "beta"))))
    return total


def compile_general_regression(ctx: Context, model, scope: dict,
                               classes: Classes | None) -> Prediction:
    g = ctx.graph
    kind = model.get("modelType")
    if kind not in _TYPES:
        raise unsupported(model, f"modelType={kind!r} is not supported",
                          "use one of " + ", ".join(sorted(_TYPES)))
    ctx.use(f"GeneralRegressionModel/{kind}")
    params, missing = _parameters(ctx, model, scope)
    if kind == "multinomialLogistic":
        return _multinomial(ctx, model, params, missing, classes)
    if kind == "ordinalMultinomial":
        return _ordinal(ctx, model, params, missing, classes)
    eta = _linear(ctx, model, params, None)
    if kind == "generalizedLinear":
        eta, missing = _adjust(ctx, model, scope, eta, missing, "offset")
        link = model.get("linkFunction", "identity")
        if link not in LINKS:
            raise unsupported(model, f"linkFunction={link!r} is not supported")
        ctx.use(f"GeneralRegressionModel/link={link}")
        value = inverse_link(g, link, eta, attr_float(model, "linkParameter"))
        value, missing = _adjust(ctx, model, scope, value, missing, "trials")
    else:
        value = eta
    if classes is None:
        return Prediction(Val(value, missing))
    if len(classes) != 2:
        raise unsupported(model, "a binary GLM classifier needs exactly two target categories")
    ref = model.get("targetReferenceCategory")
    other = [c for c in classes.labels if c != ref] if ref is not None else classes.labels
    event = classes.index(other[0])
    probs = [None, None]
    probs[event] = value
    probs[1 - event] = g.sub(g.scalar(1.0), value)
    return from_probabilities(ctx, probs, missing)


def _adjust(ctx: Context, model, scope: dict, value: str, missing: str, kind: str):
    """Add the offset (``kind="offset"``) or multiply by the trials (``kind="trials"``)."""
    g = ctx.graph
    combine = g.add if kind == "offset" else g.mul
    if model.get(f"{kind}Variable"):
        val = scope[model.get(f"{kind}Variable")]
        return combine(value, g.clean(val)), g.or_(missing, val.missing)
    if model.get(f"{kind}Value"):
        return combine(value, g.scalar(attr_float(model, f"{kind}Value"))), missing
    return value, missing


def _multinomial(ctx: Context, model, params: dict, missing: str,
                 classes: Classes | None) -> Prediction:
    g = ctx.graph
    if classes is None:
        raise unsupported(model, "multinomialLogistic needs a classification target")
    used = {c.get("targetCategory") for c in children(child(model, "ParamMatrix"), "PCell")}
    etas = []
    for label in list(classes.labels):
        if label in used and label != model.get("targetReferenceCategory"):
            etas.append(_linear(ctx, model, params, label))
        else:
            etas.append(g.add(ctx.zeros, g.scalar(0.0)))
    return from_probabilities(ctx, g.softmax(etas), missing)


def _ordinal(ctx: Context, model, params: dict, missing: str,
             classes: Classes | None) -> Prediction:
    g = ctx.graph
    if classes is None:
        raise unsupported(model, "ordinalMultinomial needs a classification target")
    link = model.get("cumulativeLink", "logit")
    if link not in LINKS:
        raise unsupported(model, f"cumulativeLink={link!r} is not supported")
    shared = _linear(ctx, model, params, None)
    probs, previous = [], g.scalar(0.0)
    for label in classes.labels[:-1]:
        intercept = _category_only(ctx, model, params, label)
        cdf = inverse_link(g, link, g.add(intercept, shared))
        probs.append(g.sub(cdf, previous))
        previous = cdf
    probs.append(g.sub(g.scalar(1.0), previous))
    probs = [g.add(ctx.zeros, p) for p in probs]
    return from_probabilities(ctx, probs, missing)


def _category_only(ctx: Context, model, params: dict, category: str) -> str:
    """The part of the linear predictor whose PCells name ``category``."""
    g = ctx.graph
    total = g.add(ctx.zeros, g.scalar(0.0))
    for cell in children(child(model, "ParamMatrix"), "PCell"):
        if cell.get("targetCategory") == category:
            beta = g.scalar(attr_float(cell, "beta"))
            total = g.add(total, g.mul(params[cell.get("parameterName")], beta))
    return total
