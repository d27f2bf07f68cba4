"""TreeModels that fit ONNX-ML's TreeEnsembleRegressor: one operator instead of masks per node.

A tree fits when its root predicate is ``True`` and the children of every node are a chain of
SimplePredicates (comparisons; equal/notEqual on strings, which travel as codes) closed by
``True`` or by the complement of the one before (if / elif / else), and a missing value cannot
leave the operator's two ways (the field cannot be missing, or ``defaultChild`` names one of two
children, or ``none`` with a ``True`` last child). Thresholds are
float64; each leaf value leaves the operator as a float32 pair (high + low part) so the sum is
exact to float64 precision. Trees that do not fit take the general path (tree.py).
"""

from __future__ import annotations

import numpy as np

from .document import Context, children
from .fields import constant
from .graph import Val
from .predicates import find_predicate
from .prediction import Classes, Prediction

__all__ = ["tree_ensemble"]

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
    root = children(model, "Node")[0]
    if find_predicate(root).tag != "True":
        return None
    builder = _Builder(ctx, scope, model.get("missingValueStrategy", "none"),
                       model.get("noTrueChildStrategy") == "returnLastPrediction")
    try:
        builder.build(root)
    except _Misfit:
        return None
    rows = [np.asarray(leaf_values(n), dtype=np.float64) for n in builder.leaves]
    table = np.vstack(rows)
    if np.isnan(table).any():
        return None
    return _emit(ctx, builder, table, classes)


class _Builder:
    def __init__(self, ctx: Context, scope: dict, strategy: str, stay: bool) -> None:
        self.ctx, self.scope, self.strategy, self.stay = ctx, scope, strategy, stay
        self.fields: list[str] = []
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
        if first.tag != "SimplePredicate" or first.get("operator") not in _MODES:
            raise _Misfit
        name, op = first.get("field"), first.get("operator")
        val = self.scope.get(name)
        if val is None or (val.is_string and op not in {"equal", "notEqual"}):
            raise _Misfit
        rest = kids[i + 1:]
        last = find_predicate(rest[0]) if len(rest) == 1 else None
        complement = last is not None and last.tag == "SimplePredicate" and (
            last.get("field") == name and last.get("operator") == _COMPLEMENT[op]
            and last.get("value") == first.get("value"))
        closing = complement or (last is not None and last.tag == "True")
        # with no closing child, rows no child takes stay at this node (returnLastPrediction)
        stays = not rest or (len(rest) == 1 and not closing)
        if stays and not self.stay:
            raise _Misfit
        tracks = 0
        if val.missing != self.ctx.falses:
            open_end = find_predicate(kids[-1]).tag == "True" or (self.stay and not complement)
            if self.strategy == "defaultChild" and len(kids) == 2:
                ids = [k.get("id") for k in kids]
                if node.get("defaultChild") not in ids or None in ids:
                    raise _Misfit
                tracks = int(node.get("defaultChild") == ids[0])
            elif not (self.strategy == "none" and open_end):
                raise _Misfit
        if name not in self.fields:
            self.fields.append(name)
        me = len(self.nodes)
        self.nodes.append({})
        threshold = constant(self.ctx, val.data_type, first.get("value"), first)
        true_id = self.build(kids[i])
        if stays:
            false_id = self._leaf(node) if not rest else self._chain(node, kids, i + 1)
        else:
            false_id = self.build(rest[0]) if len(rest) == 1 else self._chain(node, kids, i + 1)
        self.nodes[me] = {"mode": _MODES[op], "feature": self.fields.index(name),
                          "value": threshold, "true": true_id, "false": false_id,
                          "tracks": tracks}
        return me


def _emit(ctx: Context, b: _Builder, table: np.ndarray, classes: Classes | None) -> Prediction:
    from onnx import numpy_helper

    g = ctx.graph
    ctx.use("TreeModel/TreeEnsembleRegressor")
    columns = []
    for name in b.fields:
        val = b.scope[name]
        x = val.value if val.missing == ctx.falses else g.where(val.missing, g.scalar(np.nan),
                                                                 val.value)
        columns.append(x)
    features = g.concat(columns)
    high, low = _split(table)
    n_out = table.shape[1]
    target_nodes, target_ids, weights = [], [], []
    for i, node in enumerate(b.nodes):
        if node["mode"] != "LEAF":
            continue
        for j in range(n_out):
            target_nodes += [i, i]
            target_ids += [j, n_out + j]
            weights += [high[node["leaf"], j], low[node["leaf"], j]]
    n = len(b.nodes)
    out = g.op(
        "TreeEnsembleRegressor", features, domain="ai.onnx.ml", n_targets=2 * n_out,
        nodes_treeids=[0] * n, nodes_nodeids=list(range(n)),
        nodes_featureids=[nd.get("feature", 0) for nd in b.nodes],
        nodes_modes=[nd["mode"] for nd in b.nodes],
        nodes_values_as_tensor=numpy_helper.from_array(
            np.array([nd.get("value", 0.0) for nd in b.nodes], np.float64)),
        nodes_truenodeids=[nd.get("true", 0) for nd in b.nodes],
        nodes_falsenodeids=[nd.get("false", 0) for nd in b.nodes],
        nodes_missing_value_tracks_true=[nd.get("tracks", 0) for nd in b.nodes],
        target_treeids=[0] * len(target_nodes), target_nodeids=target_nodes,
        target_ids=target_ids,
        target_weights_as_tensor=numpy_helper.from_array(np.array(weights, np.float64)))
    out = g.to_double(out)
    cols = [g.add(g.take(out, j), g.take(out, n_out + j)) for j in range(n_out)]
    missing = ctx.falses
    if classes is None:
        return Prediction(Val(cols[0], missing), void=missing)
    return Prediction(Val(cols[0], missing), cols[1:], void=missing)
