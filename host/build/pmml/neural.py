"""NeuralNetwork: NeuralInputs (expressions), layers as MatMul + bias + activation, per-layer
softmax/simplemax, NeuralOutputs (NormDiscrete per class, FieldRef or NormContinuous for a
number). A row with a missing input has no prediction."""

from __future__ import annotations

import numpy as np

from .document import Context, attr_float, child, children, unsupported
from .graph import Graph, Val
from .links import _atan
from .prediction import Classes, Prediction, from_probabilities
from .transforms import expression

__all__ = ["compile_neural"]


def _activation(g: Graph, name: str, z: str, el, threshold: float) -> str:
    one = g.scalar(1.0)
    table = {
        "logistic": lambda: g.op("Sigmoid", z),
        "tanh": lambda: g.op("Tanh", z),
        "identity": lambda: z,
        "exponential": lambda: g.op("Exp", z),
        "reciprocal": lambda: g.div(one, z),
        "square": lambda: g.mul(z, z),
        "Gauss": lambda: g.op("Exp", g.op("Neg", g.mul(z, z))),
        "sine": lambda: g.op("Sin", z),
        "cosine": lambda: g.op("Cos", z),
        "Elliott": lambda: g.div(z, g.add(one, g.op("Abs", z))),
        "arctan": lambda: g.mul(_atan(g, z), g.scalar(2.0 / np.pi)),
        "rectifier": lambda: g.op("Max", z, g.scalar(0.0)),
        "threshold": lambda: g.to_double(g.op("Greater", z, g.scalar(threshold))),
    }
    if name not in table:
        raise unsupported(el, f"activationFunction={name!r} is not supported",
                          "use one of " + ", ".join(table))
    return table[name]()


def compile_neural(ctx: Context, model, scope: dict, classes: Classes | None) -> Prediction:
    g = ctx.graph
    inputs = child(model, "NeuralInputs")
    if inputs is None:
        raise unsupported(model, "has no NeuralInputs", "re-export the network")
    columns, missing, where = [], ctx.falses, {}
    for i, ni in enumerate(children(inputs, "NeuralInput")):
        df = child(ni, "DerivedField")
        expr = [c for c in children(df)][0]
        val = expression(ctx, expr, scope)
        columns.append(g.clean(val))
        missing = g.or_(missing, val.missing)
        where[ni.get("id")] = (0, i)
    blocks = [g.concat(columns)]
    net_act = model.get("activationFunction", "logistic")
    net_norm = model.get("normalizationMethod", "none")
    ctx.use(f"NeuralNetwork/{net_act}")
    for depth, layer in enumerate(children(model, "NeuralLayer"), start=1):
        neurons = children(layer, "Neuron")
        sources = []
        for n in neurons:
            for con in children(n, "Con"):
                if con.get("from") not in where:
                    raise unsupported(con, f"from={con.get('from')!r} names no earlier neuron")
                if con.get("from") not in sources:
                    sources.append(con.get("from"))
        src = _source_matrix(g, blocks, where, sources)
        weights = np.zeros((len(sources), len(neurons)))
        bias = np.zeros(len(neurons))
        for j, n in enumerate(neurons):
            bias[j] = attr_float(n, "bias", 0.0)
            for con in children(n, "Con"):
                weights[sources.index(con.get("from")), j] += attr_float(con, "weight")
        z = g.add(g.op("MatMul", src, g.const(weights)), g.const(bias))
        act = layer.get("activationFunction", net_act)
        if act == "radialBasis":
            raise unsupported(layer, "radialBasis activation is not supported",
                              "use a feed-forward activation")
        out = _activation(g, act, z, layer, attr_float(layer, "threshold",
                                                        attr_float(model, "threshold", 0.0)))
        norm = layer.get("normalizationMethod", net_norm)
        if norm == "softmax":
            out = g.op("Softmax", out, axis=1)
        elif norm == "simplemax":
            out = g.div(out, g.op("ReduceSum", out, g.const([1], np.int64), keepdims=1))
        elif norm != "none":
            raise unsupported(layer, f"normalizationMethod={norm!r} is not supported")
        blocks.append(out)
        for j, n in enumerate(neurons):
            where[n.get("id")] = (depth, j)
    return _outputs(ctx, model, blocks, where, missing, classes)


def _source_matrix(g: Graph, blocks: list, where: dict, sources: list) -> str:
    last = len(blocks) - 1
    if all(where[s] == (last, i) for i, s in enumerate(sources)):
        return blocks[last]
    return g.concat([g.take(blocks[where[s][0]], where[s][1]) for s in sources])


def _outputs(ctx: Context, model, blocks, where, missing, classes) -> Prediction:
    g = ctx.graph
    outputs = child(model, "NeuralOutputs")
    if outputs is None:
        raise unsupported(model, "has no NeuralOutputs", "re-export the network")
    found = []
    for no in children(outputs, "NeuralOutput"):
        block, col = where[no.get("outputNeuron")]
        value = g.take(blocks[block], col)
        expr = [c for c in children(child(no, "DerivedField"))][0]
        found.append((expr, value))
    if classes is None:
        expr, value = found[0]
        if expr.tag == "NormContinuous":
            value = _denormalize(g, expr, value)
        elif expr.tag != "FieldRef":
            raise unsupported(expr, "a regression output must be FieldRef or NormContinuous")
        return Prediction(Val(value, missing))
    probs = [g.add(ctx.zeros, g.scalar(0.0))] * len(classes)
    for expr, value in found:
        if expr.tag != "NormDiscrete":
            raise unsupported(expr, "a classification output must be NormDiscrete")
        probs[classes.index(expr.get("value"))] = value
    return from_probabilities(ctx, probs, missing)


def _denormalize(g: Graph, el, y: str) -> str:
    pts = [(attr_float(p, "orig"), attr_float(p, "norm")) for p in children(el, "LinearNorm")]
    out = None
    for (a0, b0), (a1, b1) in zip(pts, pts[1:], strict=False):
        seg = g.add(g.scalar(a0), g.mul(g.sub(y, g.scalar(b0)), g.scalar((a1 - a0) / (b1 - b0))))
        out = seg if out is None else g.where(g.op("Less", y, g.scalar(b0)), out, seg)
    return out
