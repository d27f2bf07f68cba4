"""MiningModel segmentation: sum, average, weightedAverage, median-free votes, modelChain,
selectFirst, max and min.

A segment takes part in a row when its predicate is TRUE. The result is missing when a
taking-part segment has no prediction (``missingPredictionTreatment`` ``continue`` and
``returnMissing``) or none takes part; ``skipSegment`` leaves such segments out. ``modelChain`` lets each segment read the OutputFields of the segments before it.
"""

from __future__ import annotations

from .document import Context, attr_float, child, children, unsupported
from .graph import Val
from .predicates import find_predicate, predicate
from .prediction import Classes, Prediction, argmax_label

__all__ = ["compile_mining"]

_REGRESSION = {"sum", "average", "weightedAverage", "weightedSum", "selectFirst", "modelChain",
               "max", "min"}
_CLASSIFICATION = {"majorityVote", "weightedMajorityVote", "average", "weightedAverage",
                   "selectFirst", "modelChain"}


def compile_mining(ctx: Context, model, scope: dict, classes: Classes | None) -> Prediction:
    from .models import MODEL_TAGS, compile_model, target_field

    seg = child(model, "Segmentation")
    if seg is None:
        raise unsupported(model, "has no Segmentation", "re-export the ensemble")
    method = seg.get("multipleModelMethod")
    allowed = _REGRESSION if classes is None else _CLASSIFICATION
    if method not in allowed:
        raise unsupported(seg, f"multipleModelMethod={method!r} is not supported for "
                          f"{'regression' if classes is None else 'classification'}",
                          "use one of " + ", ".join(sorted(allowed)))
    ctx.use(f"MiningModel/{method}")
    own_target = target_field(model)
    fast = _forest(ctx, seg, scope, classes, method)
    if fast is not None:
        return fast
    chain = dict(scope)
    parts = []
    for s in children(seg, "Segment"):
        true, _ = predicate(ctx, find_predicate(s), chain)
        inner = [c for c in children(s) if c.tag in MODEL_TAGS]
        if not inner:
            raise unsupported(s, "holds no model", "re-export the ensemble")
        same = target_field(inner[0]) in {None, own_target}
        pred, outputs = compile_model(ctx, inner[0], chain,
                                      classes=classes if same else None)
        if method == "modelChain":
            chain.update(outputs)
        parts.append((true, pred, attr_float(s, "weight", 1.0)))
    if not parts:
        raise unsupported(seg, "has no Segment", "re-export the ensemble")
    if method in {"selectFirst", "modelChain"}:
        # a chain's intermediate segments may score other targets: only ours compete
        parts = [p for p in parts if (p[1].probs is None) == (classes is None)] or parts
        return _pick(ctx, parts, first=method == "selectFirst")
    if seg.get("missingPredictionTreatment") == "skipSegment":
        parts = [(ctx.graph.and_(t, ctx.graph.not_(p.value.missing)), p, w) for t, p, w in parts]
    if classes is None:
        return _combine_values(ctx, method, parts)
    if method in {"majorityVote", "weightedMajorityVote"}:
        return _vote(ctx, parts, len(classes), weighted=method == "weightedMajorityVote")
    return _average_probs(ctx, parts, len(classes), weighted=method == "weightedAverage")


def _forest(ctx: Context, seg, scope: dict, classes: Classes | None, method: str):
    from .models import MODEL_TAGS
    from .tree import leaf_row
    from .tree_ensemble import forest_ensemble

    segments = []
    for s in children(seg, "Segment"):
        inner = [c for c in children(s) if c.tag in MODEL_TAGS]
        if not inner:
            return None
        segments.append((s, inner[0], attr_float(s, "weight", 1.0)))
    return forest_ensemble(ctx, segments, scope, classes, method,
                           lambda node: leaf_row(node, classes))


def _pick(ctx: Context, parts: list, first: bool) -> Prediction:
    g = ctx.graph
    order = list(reversed(parts)) if first else parts
    _, head, _ = order[0]
    value, missing = head.value.value, g.or_(head.value.missing, g.not_(order[0][0]))
    probs = list(head.probs) if head.probs is not None else None
    for true, pred, _ in order[1:]:
        value = g.where(true, pred.value.value, value)
        missing = g.choose(true, pred.value.missing, missing)
        if probs is not None:
            probs = [g.where(true, p, q) for p, q in zip(pred.probs, probs, strict=True)]
    return Prediction(Val(value, missing, head.value.is_string, head.value.data_type), probs)


def _combine_values(ctx: Context, method: str, parts: list) -> Prediction:
    g = ctx.graph
    zero = g.scalar(0.0)
    total, weights, missing, count = None, None, None, None
    best = None
    for true, pred, weight in parts:
        w = g.where(true, g.scalar(weight if "weighted" in method else 1.0), zero)
        v = g.where(true, g.clean(pred.value), zero)
        bad = g.and_(true, pred.value.missing)
        total = g.mul(v, w) if total is None else g.add(total, g.mul(v, w))
        weights = w if weights is None else g.add(weights, w)
        missing = bad if missing is None else g.or_(missing, bad)
        taken = g.to_double(true)
        count = taken if count is None else g.add(count, taken)
        if method in {"max", "min"}:
            cand = g.where(true, pred.value.value, g.scalar(float("-inf") if method == "max"
                                                               else float("inf")))
            best = cand if best is None else g.op("Max" if method == "max" else "Min", best, cand)
    none = g.op("Equal", count, zero)
    missing = g.or_(missing, none)
    if method in {"max", "min"}:
        value = best
    elif method in {"average", "weightedAverage"}:
        value = g.div(total, g.where(none, g.scalar(1.0), weights))
    else:
        value = total
    return Prediction(Val(g.add(ctx.zeros, value), missing))


def _vote(ctx: Context, parts: list, n: int, weighted: bool) -> Prediction:
    """Votes per class; a tie goes to the class that got its first vote earliest."""
    g = ctx.graph
    zero = g.scalar(0.0)
    votes = [g.add(ctx.zeros, zero) for _ in range(n)]
    # a segment without a result is left out; one with a missing result makes the vote missing
    lost = g.or_(*[g.and_(true, pred.value.missing) if pred.void is None else ctx.falses
                   for true, pred, _ in parts])
    first = [g.add(ctx.zeros, g.scalar(float(len(parts)))) for _ in range(n)]
    for s, (true, pred, weight) in reversed(list(enumerate(parts))):
        ok = g.and_(true, g.not_(pred.value.missing))
        w = g.where(ok, g.scalar(weight if weighted else 1.0), zero)
        for k in range(n):
            hit = g.op("Equal", pred.value.value, g.scalar(float(k)))
            votes[k] = g.add(votes[k], g.mul(g.to_double(hit), w))
            first[k] = g.where(g.and_(hit, ok), g.scalar(float(s)), first[k])
    total = votes[0]
    for v in votes[1:]:
        total = g.add(total, v)
    none = g.op("Equal", total, zero)
    safe = g.where(none, g.scalar(1.0), total)
    probs = [g.div(v, safe) for v in votes]
    tie_break = g.scalar(1e-9 / (len(parts) + 1))
    ranked = [g.sub(v, g.mul(f, g.mul(tie_break, safe))) for v, f in zip(votes, first, strict=True)]
    return Prediction(Val(argmax_label(ctx, ranked), g.or_(none, lost)), probs)


def _average_probs(ctx: Context, parts: list, n: int, weighted: bool) -> Prediction:
    g = ctx.graph
    zero = g.scalar(0.0)
    sums = [g.add(ctx.zeros, zero) for _ in range(n)]
    weights, missing = g.add(ctx.zeros, zero), ctx.falses
    for true, pred, weight in parts:
        w = g.where(true, g.scalar(weight if weighted else 1.0), zero)
        missing = g.or_(missing, g.and_(true, pred.value.missing))
        weights = g.add(weights, w)
        for k in range(n):
            p = g.where(g.and_(true, g.not_(pred.value.missing)), pred.probs[k], zero)
            sums[k] = g.add(sums[k], g.mul(p, w))
    none = g.op("Equal", weights, zero)
    safe = g.where(none, g.scalar(1.0), weights)
    probs = [g.div(s, safe) for s in sums]
    return Prediction(Val(argmax_label(ctx, probs), g.or_(missing, none)), probs)
