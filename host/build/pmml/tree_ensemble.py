"""TreeModels that fit ONNX-ML's TreeEnsembleRegressor: one operator instead of masks per node.

A tree fits when its root predicate is ``True`` and the children of every node are a chain of
SimplePredicates (comparisons; equal/notEqual on strings, which travel as codes) closed by
``True`` or by the complement of the one before (if / elif / else), and a missing value cannot
leave the operator's two ways (the field cannot be missing, or ``defaultChild`` names one of two
children, or ``none`` with a ``True`` last child). Thresholds are
float64; each leaf value leaves the operator as a float32 pair (high + low part) in its own
column per tree, so the sum over trees is taken in float64. Trees that do not fit take the general path (tree.py).
"""

from __future__ import annotations

import numpy as np

from .arrays import parse_array
from .document import Context, child, children
from .fields import constant
from .graph import Val
from .predicates import find_predicate
from .prediction import Classes, Prediction

__all__ = ["tree_ensemble", "forest_ensemble"]

_MODES = {"lessOrEqual": "BRANCH_LEQ", "lessThan": "BRANCH_LT", "greaterOrEqual": "BRANCH_GTE",
          "greaterThan": "BRANCH_GT", "equal": "BRANCH_EQ", "notEqual": "BRANCH_NEQ"}
_COMPLEMENT = {"lessOrEqual": "greaterThan", "lessThan": "greaterOrEqual",
               "greaterOrEqual": "lessThan", "greaterThan": "lessOrEqual",
               "equal": "notEqual", "notEqual": "equal"}


class _Misfit(Exception):
    """The tree needs the general path."""


def _split(hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    high = hi.astype(np.float32).astype(np.float64)
    return high, hi - high


def tree_ensemble(ctx: Context, model, scope: dict, classes: Classes | None,
                  leaf_values) -> Prediction | None:
    """The tree as one TreeEnsembleRegressor, or None when it does not fit.

    ``leaf_values(node)`` gives a leaf's row of outputs (score, or label + probabilities).
    """
    fields: list[str] = []
    part = _tree_part(ctx, model, scope, fields, leaf_values)
    if part is None:
        return None
    cols = _emit(ctx, [(part[0], part[1], 1.0)], fields, scope)
    if classes is None:
        return Prediction(Val(cols[0], ctx.falses), void=ctx.falses)
    return Prediction(Val(cols[0], ctx.falses), cols[1:], void=ctx.falses)


_PLAIN_FIELD = {"name", "usageType", "invalidValueTreatment", "importance", "optype"}


def forest_ensemble(ctx: Context, segments: list, scope: dict, classes: Classes | None,
                    method: str, leaf_values) -> Prediction | None:
    """A sum or average of plain trees as one TreeEnsembleRegressor, or None.

    ``segments`` holds (Segment, TreeModel, weight); every Segment must be ``True`` and every
    tree read its fields as they come (no transformations, replacements or Targets).
    """
    from .prediction import from_probabilities

    votes = method in {"majorityVote", "weightedMajorityVote"}
    if method not in {"sum", "average", "weightedAverage"} and not votes or not segments:
        return None
    fields: list[str] = []
    parts = []
    for seg, model, weight in segments:
        schema = child(model, "MiningSchema")
        if (model.tag != "TreeModel" or find_predicate(seg).tag != "True"
                or child(model, "LocalTransformations") is not None
                or child(model, "Targets") is not None or schema is None
                or any(set(mf.attrib) - _PLAIN_FIELD for mf in children(schema, "MiningField"))
                or (model.get("functionName") == "classification") != (classes is not None)):
            return None
        part = _tree_part(ctx, model, scope, fields, leaf_values)
        if part is None:
            return None
        table = part[1][:, :1] if votes else part[1][:, 1:] if classes is not None else part[1]
        parts.append((part[0], table, weight))
    if votes:
        ctx.use(f"MiningModel/{method}/TreeEnsembleRegressor")
        labels = _emit(ctx, [(b, t, 1.0) for b, t, _ in parts], fields, scope, per_tree=True)
        weights = [w if method == "weightedMajorityVote" else 1.0 for _, _, w in parts]
        return _vote_matrix(ctx, labels, weights, len(classes))
    total = sum(w for _, _, w in parts) if method == "weightedAverage" else len(parts)
    scaled = [(b, t, (w / total if method == "weightedAverage" else
                      1.0 / total if method == "average" else 1.0)) for b, t, w in parts]
    ctx.use(f"MiningModel/{method}/TreeEnsembleRegressor")
    cols = _emit(ctx, scaled, fields, scope)
    if classes is None:
        return Prediction(Val(cols[0], ctx.falses))
    return from_probabilities(ctx, cols, ctx.falses)


def _vote_matrix(ctx: Context, labels: str, weights: list, n: int) -> Prediction:
    """Votes from an [N, trees] matrix of class indices; a tie goes to the class voted first."""
    from .prediction import argmax_label

    g = ctx.graph
    axis = g.const([1], np.int64)
    w = g.const(np.array(weights)[None, :])
    order = g.const(np.arange(len(weights), dtype=np.float64)[None, :])
    votes, ranked = [], []
    for k in range(n):
        hit = g.op("Equal", labels, g.scalar(float(k)))
        votes.append(g.op("ReduceSum", g.mul(g.to_double(hit), w), axis, keepdims=0))
        first = g.op("ReduceMin", g.where(hit, order, g.scalar(float(len(weights)))),
                     axes=[1], keepdims=0)
        ranked.append(g.sub(votes[-1], g.mul(first, g.scalar(1e-9 / (len(weights) + 1)))))
    total = g.total(votes)
    probs = [g.div(v, total) for v in votes]
    return Prediction(Val(argmax_label(ctx, ranked), ctx.falses), probs)


def _tree_part(ctx: Context, model, scope: dict, fields: list, leaf_values):
    """(builder, leaf table) of one TreeModel, or None when it does not fit."""
    root = children(model, "Node")[0]
    if find_predicate(root).tag != "True":
        return None
    builder = _Builder(ctx, scope, model.get("missingValueStrategy", "none"),
                       model.get("noTrueChildStrategy") == "returnLastPrediction", fields)
    try:
        builder.build(root)
    except _Misfit:
        return None
    table = np.vstack([np.asarray(leaf_values(n), dtype=np.float64) for n in builder.leaves])
    if np.isnan(table).any():
        return None
    return builder, table


class _Builder:
    def __init__(self, ctx: Context, scope: dict, strategy: str, stay: bool,
                 fields: list) -> None:
        self.ctx, self.scope, self.strategy, self.stay = ctx, scope, strategy, stay
        self.fields = fields
        self.nodes: list[dict] = []
        self.leaves: list = []

    def build(self, node) -> int:
        kids = children(node, "Node")
        return self._chain(node, kids, 0) if kids else self._leaf(node)

    def _leaf(self, node) -> int:
        self.nodes.append({"mode": "LEAF", "leaf": len(self.leaves)})
        self.leaves.append(node)
        return len(self.nodes) - 1

    def _chain(self, node, kids: list, i: int) -> int:
        """A branch for ``kids[i]`` against the children after it (if / elif / else)."""
        first = find_predicate(kids[i])
        if first.tag == "SimpleSetPredicate":
            return self._set_chain(node, kids, i, first)
        if first.tag != "SimplePredicate" or first.get("operator") not in _MODES:
            raise _Misfit
        name, op = first.get("field"), first.get("operator")
        val = self.scope.get(name)
        if val is None or (val.is_string and op not in {"equal", "notEqual"}):
            raise _Misfit
        last = self._last(kids, i)
        complement = last is not None and last.tag == "SimplePredicate" and (
            last.get("field") == name and last.get("operator") == _COMPLEMENT[op]
            and last.get("value") == first.get("value"))
        # a missing value makes notEqual TRUE inside the operator: keep it out
        tracks = self._tracks(node, kids, val, complement, op == "notEqual")
        feature = self._feature(name)
        me = len(self.nodes)
        self.nodes.append({})
        threshold = constant(self.ctx, val.data_type, first.get("value"), first)
        true_id = self.build(kids[i])
        false_id = self._else(node, kids, i, complement or (last is not None
                                                              and last.tag == "True"))
        self.nodes[me] = {"mode": _MODES[op], "feature": feature, "value": threshold,
                          "true": true_id, "false": false_id, "tracks": tracks}
        return me

    def _set_chain(self, node, kids: list, i: int, first) -> int:
        """isIn / isNotIn as a row of BRANCH_EQ nodes that share their targets."""
        name, op, array = first.get("field"), first.get("booleanOperator"), child(first, "Array")
        val = self.scope.get(name)
        if val is None or array is None or op not in {"isIn", "isNotIn"}:
            raise _Misfit
        tokens = parse_array(array)
        if not tokens:
            raise _Misfit
        last = self._last(kids, i)
        complement = last is not None and last.tag == "SimpleSetPredicate" and (
            last.get("field") == name and last.get("booleanOperator") != op
            and child(last, "Array") is not None
            and sorted(parse_array(child(last, "Array"))) == sorted(tokens))
        self._tracks(node, kids, val, complement, op == "isNotIn", allow_default=False)
        feature = self._feature(name)
        chain = list(range(len(self.nodes), len(self.nodes) + len(tokens)))
        self.nodes.extend({} for _ in tokens)
        true_id = self.build(kids[i])
        false_id = self._else(node, kids, i, complement or (last is not None
                                                              and last.tag == "True"))
        inside, outside = (true_id, false_id) if op == "isIn" else (false_id, true_id)
        for k, token in enumerate(tokens):
            self.nodes[chain[k]] = {
                "mode": "BRANCH_EQ", "feature": feature, "tracks": 0, "true": inside,
                "value": constant(self.ctx, val.data_type, token, array),
                "false": chain[k + 1] if k + 1 < len(tokens) else outside}
        return chain[0]

    def _last(self, kids: list, i: int):
        rest = kids[i + 1:]
        return find_predicate(rest[0]) if len(rest) == 1 else None

    def _feature(self, name: str) -> int:
        if name not in self.fields:
            self.fields.append(name)
        return self.fields.index(name)

    def _tracks(self, node, kids: list, val: Val, complement: bool, true_on_missing: bool,
                allow_default: bool = True) -> int:
        """Where a missing value goes (1: the first child), or _Misfit when it cannot."""
        if val.missing == self.ctx.falses:
            return 0
        if true_on_missing:
            raise _Misfit
        if self.strategy == "defaultChild" and len(kids) == 2 and allow_default:
            ids = [k.get("id") for k in kids]
            if node.get("defaultChild") not in ids or None in ids:
                raise _Misfit
            return int(node.get("defaultChild") == ids[0])
        open_end = find_predicate(kids[-1]).tag == "True" or (self.stay and not complement)
        if not (self.strategy == "none" and open_end):
            raise _Misfit
        return 0

    def _else(self, node, kids: list, i: int, closing: bool) -> int:
        """The branch for rows ``kids[i]`` does not take."""
        rest = kids[i + 1:]
        # with no closing child, rows no child takes stay at this node (returnLastPrediction)
        if not rest or (len(rest) == 1 and not closing):
            if not self.stay:
                raise _Misfit
            return self._leaf(node) if not rest else self._chain(node, kids, i + 1)
        return self.build(rest[0]) if len(rest) == 1 else self._chain(node, kids, i + 1)


def _emit(ctx: Context, parts: list, fields: list, scope: dict, per_tree: bool = False):
    """One TreeEnsembleRegressor over ``parts`` (builder, leaf table, multiplier): the summed
    columns as float64 [N] tensors."""
    from onnx import numpy_helper

    g = ctx.graph
    ctx.use("TreeModel/TreeEnsembleRegressor")
    columns = []
    for name in fields:
        val = scope[name]
        x = val.value if val.missing == ctx.falses else g.where(val.missing, g.scalar(np.nan),
                                                                 val.value)
        columns.append(x)
    features = g.concat(columns)
    n_out = parts[0][1].shape[1]
    attrs: dict = {k: [] for k in ("tree", "node", "feature", "mode", "value", "true", "false",
                                   "tracks", "t_tree", "t_node", "t_id", "weight")}
    for tree, (b, table, multiplier) in enumerate(parts):
        high, low = _split(table * multiplier)
        for i, nd in enumerate(b.nodes):
            attrs["tree"].append(tree)
            attrs["node"].append(i)
            attrs["feature"].append(nd.get("feature", 0))
            attrs["mode"].append(nd["mode"])
            attrs["value"].append(nd.get("value", 0.0))
            attrs["true"].append(nd.get("true", 0))
            attrs["false"].append(nd.get("false", 0))
            attrs["tracks"].append(nd.get("tracks", 0))
            if nd["mode"] != "LEAF":
                continue
            for j in range(n_out):
                attrs["t_tree"] += [tree, tree]
                attrs["t_node"] += [i, i]
                attrs["t_id"] += [2 * n_out * tree + j, 2 * n_out * tree + n_out + j]
                attrs["weight"] += [high[nd["leaf"], j], low[nd["leaf"], j]]
    out = g.op(
        "TreeEnsembleRegressor", features, domain="ai.onnx.ml",
        n_targets=2 * n_out * len(parts),
        nodes_treeids=attrs["tree"], nodes_nodeids=attrs["node"],
        nodes_featureids=attrs["feature"], nodes_modes=attrs["mode"],
        nodes_values_as_tensor=numpy_helper.from_array(np.array(attrs["value"], np.float64)),
        nodes_truenodeids=attrs["true"], nodes_falsenodeids=attrs["false"],
        nodes_missing_value_tracks_true=attrs["tracks"],
        target_treeids=attrs["t_tree"], target_nodeids=attrs["t_node"],
        target_ids=attrs["t_id"],
        target_weights_as_tensor=numpy_helper.from_array(np.array(attrs["weight"], np.float64)))
    out = g.to_double(out)
    if per_tree:
        # [N, trees] of output 0 (a class index per tree for votes)
        return g.add(g.op("Gather", out, g.const([2 * n_out * t for t in range(len(parts))],
                                                  np.int64), axis=1),
                     g.op("Gather", out, g.const([2 * n_out * t + n_out
                                                  for t in range(len(parts))], np.int64),
                          axis=1))
    # each tree's float32 pair per output has its own column: the sum is taken in float64
    picks = [[2 * n_out * t + j for t in range(len(parts))] +
             [2 * n_out * t + n_out + j for t in range(len(parts))] for j in range(n_out)]
    axis = g.const([1], np.int64)
    return [g.op("ReduceSum", g.op("Gather", out, g.const(p, np.int64), axis=1), axis,
                 keepdims=0) for p in picks]
