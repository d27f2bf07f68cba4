"""TreeModel: every predicate, missingValueStrategy and noTrueChildStrategy, as masks per node.

Each row walks the tree in the order the document lists children (the first child whose
predicate is TRUE is taken). Where a predicate is UNKNOWN the model's ``missingValueStrategy``
decides: ``none`` treats it as FALSE, ``nullPrediction`` stops with no prediction,
``lastPrediction`` stops at the current node, ``defaultChild`` follows the node's default child.
The node where a row stops indexes a table of scores and class probabilities.
"""

from __future__ import annotations

import numpy as np

from .document import Context, attr_float, child, children, unsupported
from .graph import Val
from .predicates import find_predicate, predicate
from .prediction import Classes, Prediction, table_lookup
from .tree_ensemble import tree_ensemble

__all__ = ["compile_tree"]

_STRATEGIES = {"none", "nullPrediction", "lastPrediction", "defaultChild"}


def compile_tree(ctx: Context, model, scope: dict, classes: Classes | None) -> Prediction:
    g = ctx.graph
    strategy = model.get("missingValueStrategy", "none")
    no_true = model.get("noTrueChildStrategy", "returnNullPrediction")
    if strategy not in _STRATEGIES:
        raise unsupported(model, f"missingValueStrategy={strategy!r} is not supported",
                          "re-export with none, nullPrediction, lastPrediction or defaultChild")
    ctx.use(f"TreeModel/missingValueStrategy={strategy}")
    if no_true != "returnNullPrediction":
        ctx.use(f"TreeModel/noTrueChildStrategy={no_true}")
    root = child(model, "Node")
    if root is None:
        raise unsupported(model, "the tree has no Node", "re-export the model")
    for embedded in root.iter("Regression", "DecisionTree"):
        raise unsupported(embedded, "models embedded in tree nodes are not supported",
                          "re-export the tree as a MiningModel of segments")
    fast = tree_ensemble(ctx, model, scope, classes, lambda n: leaf_row(n, classes))
    if fast is not None:
        return fast
    walk = _Walk(ctx, scope, strategy, no_true == "returnLastPrediction")
    true, _ = predicate(ctx, find_predicate(root), scope)
    walk.visit(root, true)
    index = g.add(ctx.zeros, g.scalar(-1.0))
    for mask, node_id in walk.stops:
        index = g.where(mask, g.scalar(float(node_id)), index)
    stopped = g.op("GreaterOrEqual", index, g.scalar(0.0))
    safe = g.where(stopped, index, g.scalar(float(len(walk.nodes))))
    if classes is None:
        table = [_score(n) for n in walk.nodes] + [np.nan]
        value = table_lookup(ctx, safe, table)
        missing = g.op("IsNaN", value)
        return Prediction(Val(value, missing), void=missing)
    labels, dists = zip(*[_distribution(n, classes) for n in walk.nodes], strict=True)
    dists = [np.pad(d, (0, len(classes) - len(d)), constant_values=np.nan if np.isnan(d).all()
                    else 0.0) for d in dists]
    value = table_lookup(ctx, safe, list(labels) + [np.nan])
    probs = table_lookup(ctx, safe, np.vstack(list(dists) + [np.full(len(classes), np.nan)]))
    missing = g.op("IsNaN", value)
    return Prediction(Val(value, missing), [g.take(probs, k) for k in range(len(classes))],
                      void=missing)


class _Walk:
    def __init__(self, ctx: Context, scope: dict, strategy: str, last_on_no_true: bool):
        self.ctx, self.scope, self.strategy = ctx, scope, strategy
        self.last_on_no_true = last_on_no_true
        self.nodes: list = []
        self.stops: list = []

    def visit(self, node, reach: str) -> None:
        g = self.ctx.graph
        node_id = len(self.nodes)
        self.nodes.append(node)
        kids = children(node, "Node")
        if not kids:
            self.stops.append((reach, node_id))
            return
        remaining, goes, to_default = reach, [], None
        for kid in kids:
            true, unknown = predicate(self.ctx, find_predicate(kid), self.scope)
            if self.strategy != "none":
                stuck = g.and_(remaining, unknown)
                remaining = g.and_(remaining, g.not_(unknown))
                if self.strategy == "lastPrediction":
                    self.stops.append((stuck, node_id))
                elif self.strategy == "defaultChild":
                    to_default = stuck if to_default is None else g.or_(to_default, stuck)
            go = g.and_(remaining, true)
            goes.append(go)
            remaining = g.and_(remaining, g.not_(true))
        if self.last_on_no_true:
            self.stops.append((remaining, node_id))
        if to_default is not None:
            target = node.get("defaultChild")
            ids = [k.get("id") for k in kids]
            if target not in ids:
                raise unsupported(node, f"defaultChild={target!r} names no child Node",
                                  "set defaultChild to the id of a child Node")
            i = ids.index(target)
            goes[i] = g.or_(goes[i], to_default)
        for kid, go in zip(kids, goes, strict=True):
            self.visit(kid, go)


def leaf_row(node, classes: Classes | None) -> list[float]:
    """A leaf's outputs for the TreeEnsemble path: score, or class index + probabilities."""
    if classes is None:
        return [_score(node)]
    label, probs = _distribution(node, classes)
    return [label] + list(np.pad(probs, (0, len(classes) - len(probs))))


def _score(node) -> float:
    raw = node.get("score")
    if raw is None:
        return np.nan
    try:
        return float(raw)
    except ValueError:
        raise unsupported(node, f"score {raw!r} of a regression tree is not a number",
                          "fix the score") from None


def _distribution(node, classes: Classes) -> tuple[float, np.ndarray]:
    dists = children(node, "ScoreDistribution")
    probs = np.zeros(max(len(classes), 1))
    score = node.get("score")
    if dists:
        have_p = all(d.get("probability") is not None for d in dists)
        weights = [attr_float(d, "probability" if have_p else "recordCount", 0.0) for d in dists]
        total = sum(weights)
        for d, w in zip(dists, weights, strict=True):
            k = classes.index(d.get("value"))
            if k >= len(probs):
                probs = np.resize(probs, k + 1)
                probs[k] = 0.0
            probs[k] = w if have_p else (w / total if total > 0 else 0.0)
        if score is None and total > 0:
            return float(np.argmax(probs)), probs
    if score is None:
        return np.nan, np.full(len(probs), np.nan)
    k = classes.index(score)
    if not dists:
        probs = np.zeros(max(len(classes), k + 1))
        probs[k] = 1.0
    return float(k), probs
