"""NaiveBayesModel: PairCounts for categorical inputs (optionally discretized by a DerivedField),
Gaussian and Poisson TargetValueStats for continuous ones, priors from BayesOutput.

Computed in log space: a missing input, or a category the counts do not list, is left out; a
zero count takes ``threshold``.
"""

from __future__ import annotations

import numpy as np

from .document import Context, attr_float, child, children, unsupported
from .fields import constant
from .graph import Val
from .prediction import Classes, Prediction, from_probabilities
from .transforms import expression

__all__ = ["compile_naive_bayes"]


def _counts(el, classes: Classes) -> np.ndarray:
    out = np.zeros(len(classes))
    for tvc in children(child(el, "TargetValueCounts"), "TargetValueCount"):
        k = classes.index(tvc.get("value"))
        if k >= len(out):
            out = np.resize(out, k + 1)
        out[k] = attr_float(tvc, "count", 0.0)
    return out


def compile_naive_bayes(ctx: Context, model, scope: dict, classes: Classes | None) -> Prediction:
    g = ctx.graph
    if classes is None:
        raise unsupported(model, "a naive Bayes model must classify")
    threshold = attr_float(model, "threshold", 0.0)
    priors = _counts(child(model, "BayesOutput"), classes)
    n = len(priors)
    log_like = [g.add(ctx.zeros, g.scalar(float(np.log(p)) if p > 0 else -np.inf))
                for p in priors]
    for bi in children(child(model, "BayesInputs"), "BayesInput"):
        name = bi.get("fieldName")
        derived = child(bi, "DerivedField")
        if derived is not None:
            val = expression(ctx, [c for c in children(derived)][0], scope)
        elif name in scope:
            val = scope[name]
        else:
            raise unsupported(bi, f"field {name!r} is not defined here")
        stats = child(bi, "TargetValueStats")
        if stats is not None:
            terms = _continuous(ctx, stats, val, classes, threshold)
        else:
            terms = _categorical(ctx, bi, val, classes, priors, threshold)
        for k, t in terms.items():
            log_like[k] = g.add(log_like[k], t)
    probs = g.softmax(log_like[:n])
    probs += [g.add(ctx.zeros, g.scalar(0.0))] * (len(classes) - n)
    return from_probabilities(ctx, probs, ctx.falses)


def _continuous(ctx: Context, stats, val: Val, classes: Classes, threshold: float) -> dict:
    g = ctx.graph
    x = g.clean(val)
    out = {}
    for s in children(stats, "TargetValueStat"):
        k = classes.index(s.get("value"))
        gauss, poisson = child(s, "GaussianDistribution"), child(s, "PoissonDistribution")
        if gauss is not None:
            mean, var = attr_float(gauss, "mean"), attr_float(gauss, "variance")
            z = g.sub(x, g.scalar(mean))
            density = g.op("Exp", g.div(g.mul(z, z), g.scalar(-2.0 * var)))
            density = g.div(density, g.scalar(float(np.sqrt(2 * np.pi * var))))
            ctx.use("NaiveBayesModel/GaussianDistribution")
        elif poisson is not None:
            mean = attr_float(poisson, "mean")
            density = g.div(g.mul(g.op("Exp", g.scalar(-mean)),
                                  g.op("Pow", g.scalar(mean), x)),
                            g.op("Exp", _lgamma1(g, x)))
            ctx.use("NaiveBayesModel/PoissonDistribution")
        else:
            raise unsupported(s, "needs a GaussianDistribution or PoissonDistribution")
        density = g.op("Max", density, g.scalar(threshold)) if threshold > 0 else density
        out[k] = g.where(val.missing, g.scalar(0.0), g.op("Log", density))
    return out


def _lgamma1(g, x: str) -> str:
    """log(x!) for small non-negative integers x (Poisson counts) by a product table up to 170."""
    table = np.cumsum(np.log(np.maximum(np.arange(171, dtype=np.float64), 1.0)))
    idx = g.op("Cast", g.op("Min", g.op("Max", x, g.scalar(0.0)), g.scalar(170.0)), to=7)
    return g.op("Gather", g.const(table), idx, axis=0)


def _categorical(ctx: Context, bi, val: Val, classes: Classes, priors: np.ndarray,
                 threshold: float) -> dict:
    g = ctx.graph
    ctx.use("NaiveBayesModel/PairCounts")
    pairs = children(bi, "PairCounts")
    n = len(priors)
    table = np.zeros((len(pairs), n))
    for i, pc in enumerate(pairs):
        counts = _counts(pc, classes)
        table[i, :len(counts)] = counts[:n]
    totals = table.sum(axis=0)
    hits = [g.op("Equal", val.value, g.scalar(constant(ctx, val.data_type, pc.get("value"), pc)))
            for pc in pairs]
    skip = g.or_(val.missing, g.not_(g.or_(*hits))) if hits else val.missing
    out = {}
    for k in range(n):
        logs = np.log(np.where(table[:, k] > 0,
                               table[:, k] / totals[k] if totals[k] > 0 else 0.0,
                               threshold if threshold > 0 else 1e-300))
        term = g.add(ctx.zeros, g.scalar(0.0))
        for hit, log_p in zip(hits, logs, strict=True):
            term = g.where(hit, g.scalar(float(log_p)), term)
        out[k] = g.where(skip, g.scalar(0.0), term)
    return out
