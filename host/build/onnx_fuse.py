"""Standard-op fusions for exported transformer graphs: LayerNorm and exact GELU.

tf2onnx spells Keras ``LayerNormalization`` as TensorFlow's ``moments`` (two ``GlobalAveragePool``
or ``ReduceMean``, ``Sub``, ``Mul``, ``Sqrt``, ``Reciprocal``, ``Neg``, three ``Mul`` and two
``Add``) and exact GELU as ``0.5·x·erfc(−x/√2)``. onnxruntime fuses neither spelling, and the
int8 quantizer wraps every one of those element-wise ops in its own Quantize/Dequantize pair,
which costs more than the int8 matrix products save on an encoder.

:func:`fuse_standard` rewrites them, on graphs at opset 17 or newer, into what every runtime
reads and onnxruntime runs fused:

* the moments block → one ``LayerNormalization`` (standard since opset 17; ``axis=-1``, the
  epsilon and the scale/bias initializers of the block);
* ``0.5·x·(1 − erf(−x/√2))`` → ``0.5·x·(1 + erf(x÷√2))``, the form onnxruntime's Gelu fusion
  reads (it does not match a multiplication by 1/√2).

Only exact matches are rewritten (every intermediate used once, constants of the right shape);
anything else is left as it is. Outputs agree with the unfused graph to float rounding
(tests/host/build/onnx/test_onnx_fuse.py).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["fuse_standard"]


class _Graph:
    """Producers, consumers and constants of a graph's top level."""

    def __init__(self, graph: Any) -> None:
        from onnx import numpy_helper

        self.g = graph
        self.producer = {o: n for n in graph.node for o in n.output}
        self.uses: dict[str, int] = {}
        for n in graph.node:
            for i in n.input:
                self.uses[i] = self.uses.get(i, 0) + 1
        for o in graph.output:
            self.uses[o.name] = self.uses.get(o.name, 0) + 1
        self.const = {t.name: numpy_helper.to_array(t) for t in graph.initializer}

    def node(self, name: str, op: str, single: bool = True) -> Any | None:
        n = self.producer.get(name)
        if n is None or n.op_type != op or n.domain not in ("", "ai.onnx"):
            return None
        if single and self.uses.get(name, 0) != 1:
            return None
        return n

    def scalar(self, name: str) -> float | None:
        v = self.const.get(name)
        return float(v.reshape(-1)[0]) if v is not None and v.size == 1 else None

    def other(self, node: Any, name: str) -> str | None:
        """The input of a two-input ``node`` that is not ``name``."""
        if len(node.input) != 2 or name not in node.input:
            return None
        return node.input[1] if node.input[0] == name else node.input[0]


def _is_mean_last_axis(g: _Graph, node: Any, rank: dict[str, int]) -> bool:
    if node.op_type == "GlobalAveragePool":
        return rank.get(node.input[0]) == 3  # averages dims 2.. : the last axis of a rank-3 x
    if node.op_type == "ReduceMean":
        axes = [a.ints for a in node.attribute if a.name == "axes"]
        keep = [a.i for a in node.attribute if a.name == "keepdims"]
        if len(node.input) > 1:
            v = g.const.get(node.input[1])
            axes = [list(v.reshape(-1))] if v is not None else []
        r = rank.get(node.input[0])
        return (bool(axes) and list(axes[0]) in ([-1], [r - 1] if r else [-1])
                and (not keep or keep[0] == 1))
    return False


def _ranks(model: Any) -> dict[str, int]:
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - no shapes, no LayerNorm fusion
        return {}
    out = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = len(t.shape.dim)
    return out


def _layernorms(model: Any) -> int:
    """Rewrite moments-style LayerNorm blocks; returns how many."""
    from onnx import helper

    g = _Graph(model.graph)
    rank = _ranks(model)
    drop: set[int] = set()
    add: dict[int, Any] = {}
    index = {id(n): i for i, n in enumerate(g.g.node)}
    for out_add in g.g.node:
        # y = x·s + (β − mean·s), s = γ / sqrt(var + ε)
        if out_add.op_type != "Add" or len(out_add.input) != 2:
            continue
        pair = [g.node(i, "Mul") for i in out_add.input], [g.node(i, "Add") for i in out_add.input]
        for k in (0, 1):
            mul_x, shift = pair[0][k], pair[1][1 - k]
            if mul_x is not None and shift is not None:
                break
        else:
            continue
        try:
            found = _match_ln(g, mul_x, shift, rank)
        except (IndexError, KeyError, AttributeError, TypeError, ValueError):
            found = None  # a node shaped unlike the pattern (a Constant's missing input, …)
        if found is None:
            continue
        x, gamma, beta, eps, nodes = found
        ids = {index[id(n)] for n in (*nodes, out_add)}
        if ids & drop:
            continue
        drop |= ids
        gamma, beta = _vector(g, gamma), _vector(g, beta)
        add[index[id(out_add)]] = helper.make_node(
            "LayerNormalization", [x, gamma, beta], [out_add.output[0]], axis=-1, epsilon=eps,
            name=(out_add.name or out_add.output[0]) + "/layernorm")
    if not add:
        return 0
    kept = []
    for i, n in enumerate(g.g.node):
        if i in add:
            kept.append(add[i])
        elif i not in drop:
            kept.append(n)
    del g.g.node[:]
    g.g.node.extend(kept)
    return len(add)


def _match_ln(g: _Graph, mul_x: Any, shift: Any, rank: dict[str, int]):
    # mul_x = x · s ; shift = β + (−mean)·s  (or mean·s subtracted)
    for x in mul_x.input:
        s = g.other(mul_x, x)
        mul_s = g.producer.get(s) if s else None
        if mul_s is None or mul_s.op_type != "Mul":
            continue
        found = _scale(g, mul_s)
        if found is None:
            continue
        gamma, var_add, mean = found
        if g.producer.get(mean) is None or not _is_mean_last_axis(g, g.producer[mean], rank) \
                or g.producer[mean].input[0] != x:
            continue
        beta, neg_mul, neg = None, None, None
        for b in shift.input:
            other = g.other(shift, b)
            neg_mul = g.node(other, "Mul") if other else None
            if neg_mul is not None and b in g.const:
                beta = b
                break
        if beta is None or s not in neg_mul.input:
            continue
        neg = g.node(g.other(neg_mul, s), "Neg")
        if neg is None or neg.input[0] != mean:
            continue
        eps = g.scalar(g.other(var_add, var_add.input[0]) or "")
        var = g.producer.get(var_add.input[0])
        if eps is None:
            eps = g.scalar(var_add.input[0])
            var = g.producer.get(var_add.input[1])
        if eps is None or var is None or not _is_mean_last_axis(g, var, rank) or \
                g.uses.get(var.output[0]) != 1:
            continue  # the variance must feed this block only: its nodes are removed
        sq = g.node(var.input[0], "Mul")
        if sq is None or sq.input[0] != sq.input[1]:
            continue
        sub = g.node(sq.input[0], "Sub", single=False)
        if sub is None or list(sub.input) != [x, mean] or g.uses.get(sub.output[0]) != 2:
            continue
        w = g.const[gamma].shape, g.const[beta].shape
        if w[0] != w[1] or not w[0] or any(d != 1 for d in w[0][:-1]):
            continue  # a per-feature scale and bias over the last axis only
        if g.uses.get(mean) != 2 or g.uses.get(s) != 2:
            continue
        nodes = (mul_x, shift, mul_s, neg_mul, neg, g.producer[mean], var, sq, sub, var_add,
                 *_scale_nodes(g, mul_s))
        return x, gamma, beta, float(eps), nodes
    return None


def _constant(g: _Graph, name: str, value: float) -> str:
    import numpy as np
    from onnx import numpy_helper

    if name not in g.const:
        g.const[name] = np.array(value, dtype=np.float32)
        g.g.initializer.append(numpy_helper.from_array(g.const[name], name))
    return name


def _drop_unused(graph: Any) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    if len(kept) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)


def _vector(g: _Graph, name: str) -> str:
    """``name`` as a 1-D initializer (tf2onnx keeps Keras' (1, 1, W) broadcast shape)."""
    from onnx import numpy_helper

    value = g.const[name]
    if value.ndim == 1:
        return name
    flat = f"{name}__vector"
    if flat not in g.const:
        g.const[flat] = value.reshape(-1)
        g.g.initializer.append(numpy_helper.from_array(g.const[flat], flat))
    return flat


def _scale(g: _Graph, mul_s: Any):
    """``mul_s = γ · 1/sqrt(var + ε)``: (γ, the var+ε Add, the mean's name)."""
    for gamma in mul_s.input:
        if gamma not in g.const:
            continue
        rec = g.node(g.other(mul_s, gamma), "Reciprocal")
        if rec is None:
            continue
        sqrt = g.node(rec.input[0], "Sqrt")
        var_add = g.node(sqrt.input[0], "Add") if sqrt is not None else None
        if var_add is None:
            continue
        var = next((g.producer.get(i) for i in var_add.input if i not in g.const), None)
        if var is None:
            continue
        sq = g.producer.get(var.input[0])
        sub = g.producer.get(sq.input[0]) if sq is not None else None
        if sub is None or sub.op_type != "Sub":
            continue
        return gamma, var_add, sub.input[1]
    return None


def _scale_nodes(g: _Graph, mul_s: Any) -> tuple[Any, ...]:
    rec = g.producer[next(i for i in mul_s.input if i not in g.const)]
    return rec, g.producer[rec.input[0]]


def _gelus(model: Any) -> int:
    """``Sub(1, Erf(Mul(Neg(x), c)))`` → ``Add(Erf(Mul(x, c)), 1)`` (erfc(−z) = 1 + erf(z))."""
    g = _Graph(model.graph)
    done = 0
    for sub in g.g.node:
        if sub.op_type != "Sub" or len(sub.input) != 2:
            continue
        one = g.scalar(sub.input[0])
        erf = g.node(sub.input[1], "Erf")
        mul = g.node(erf.input[0], "Mul") if erf is not None else None
        if one != 1.0 or mul is None:
            continue
        neg = next((g.node(i, "Neg") for i in mul.input if g.node(i, "Neg") is not None), None)
        c = g.other(mul, neg.output[0]) if neg is not None else None
        if c is None or g.scalar(c) is None:
            continue
        x, z = neg.input[0], g.scalar(c)
        if abs(z - 1 / math.sqrt(2)) > 1e-6:
            continue
        mul.op_type = "Div"  # x / √2: the spelling onnxruntime's Gelu fusion matches
        mul.input[:] = [x, _constant(g, "edgepack_sqrt2", math.sqrt(2))]
        sub.op_type = "Add"
        sub.input[:] = [erf.output[0], sub.input[0]]
        neg.op_type = "__drop__"
        done += 1
    if done:
        kept = [n for n in g.g.node if n.op_type != "__drop__"]
        del g.g.node[:]
        g.g.node.extend(kept)
    return done


def fuse_standard(model: Any) -> str | None:
    """Rewrite LayerNorm and exact-GELU blocks in place (opset ≥ 17); a step line or None."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 17:
        return None
    gelu = _gelus(model)
    ln = _layernorms(model)
    if not (gelu or ln):
        return None
    _drop_unused(model.graph)
    parts = [f"{ln} LayerNorm block(s) → LayerNormalization" if ln else "",
             f"{gelu} exact GELU(s) in onnxruntime's fused form" if gelu else ""]
    return "fused " + " and ".join(p for p in parts if p)
