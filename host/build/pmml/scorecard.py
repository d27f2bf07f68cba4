"""Scorecard: initialScore plus, per Characteristic, the partial score of the first Attribute whose
predicate is TRUE (a fixed ``partialScore`` or a ComplexPartialScore expression).

A Characteristic where no Attribute is TRUE leaves the row without a score. Reason codes are
not computed (the score is).
"""

from __future__ import annotations

from .document import Context, attr_float, child, children, unsupported
from .graph import Val
from .predicates import find_predicate, predicate
from .prediction import Classes, Prediction
from .transforms import expression

__all__ = ["compile_scorecard"]


def compile_scorecard(ctx: Context, model, scope: dict, classes: Classes | None) -> Prediction:
    g = ctx.graph
    if classes is not None:
        raise unsupported(model, "a classification Scorecard is not supported",
                          "export the scorecard as a regression (score) model")
    total = g.add(ctx.zeros, g.scalar(attr_float(model, "initialScore", 0.0)))
    missing = ctx.falses
    chars = child(model, "Characteristics")
    for ch in children(chars, "Characteristic") if chars is not None else []:
        score, matched = g.add(ctx.zeros, g.scalar(0.0)), ctx.falses
        bad = ctx.falses
        for attr in children(ch, "Attribute"):
            true, _ = predicate(ctx, find_predicate(attr), scope)
            take = g.and_(true, g.not_(matched))
            complex_score = child(attr, "ComplexPartialScore")
            if complex_score is not None:
                val = expression(ctx, [c for c in children(complex_score)][0], scope)
                part, bad = val.value, g.or_(bad, g.and_(take, val.missing))
            elif attr.get("partialScore") is not None or ch.get("baselineScore") is not None:
                part = g.scalar(attr_float(attr, "partialScore", 0.0))
            else:
                raise unsupported(attr, "has no partialScore", "add one")
            score = g.where(take, part, score)
            matched = g.or_(matched, true)
        total = g.add(total, score)
        missing = g.or_(missing, g.not_(matched), bad)
    ctx.use("Scorecard")
    return Prediction(Val(total, missing))
