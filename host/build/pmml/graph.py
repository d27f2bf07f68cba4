"""The ONNX graph the converter writes: a node list plus typed values with missing masks.

Every PMML value inside the graph is a :class:`Val`: a float64 tensor of shape ``[N]`` and a
bool tensor of the same shape that says which rows are missing. String values travel as codes
into the document's string table (:class:`Vocabulary`), so comparisons, MapValues and votes are
numeric; only the graph's inputs and the label output see strings.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Graph", "Val", "Vocabulary", "OPSET", "ML_OPSET"]

OPSET = 17
ML_OPSET = 3


@dataclass(frozen=True)
class Val:
    """A value per row: ``value`` (float64 [N]) and ``missing`` (bool [N]); strings as codes."""

    value: str
    missing: str
    is_string: bool = False
    data_type: str = "double"


class Vocabulary:
    """Every string the document mentions, coded in sorted order (unseen strings code as -1)."""

    def __init__(self, strings: set[str]) -> None:
        self.strings = sorted(s for s in strings if s != "")
        self._codes = {s: float(i) for i, s in enumerate(self.strings)}

    def code(self, text: str) -> float:
        return self._codes.get(text, -1.0)


@dataclass
class Graph:
    """Accumulates ONNX nodes and initializers; each helper returns the name of its output."""

    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    _names: itertools.count = field(default_factory=itertools.count)
    _consts: dict = field(default_factory=dict)

    def fresh(self, hint: str = "t") -> str:
        return f"_{hint}{next(self._names)}"

    def op(self, op_type: str, *inputs: str, domain: str = "", outputs: int = 1, **attrs) -> str:
        from onnx import helper

        names = [self.fresh(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, domain=domain, **attrs))
        return names[0] if outputs == 1 else names

    def const(self, array, dtype=np.float64) -> str:
        from onnx import numpy_helper

        arr = np.asarray(array, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes() if arr.dtype != object else tuple(arr.flat))
        if key not in self._consts:
            name = self.fresh("c")
            self.initializers.append(numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def scalar(self, number: float) -> str:
        return self.const(float(number))

    # -- float64 arithmetic ------------------------------------------------------------------
    def add(self, a: str, b: str) -> str:
        return self.op("Add", a, b)

    def sub(self, a: str, b: str) -> str:
        return self.op("Sub", a, b)

    def mul(self, a: str, b: str) -> str:
        return self.op("Mul", a, b)

    def div(self, a: str, b: str) -> str:
        return self.op("Div", a, b)

    def where(self, cond: str, a: str, b: str) -> str:
        return self.op("Where", cond, a, b)

    # -- booleans ----------------------------------------------------------------------------
    def and_(self, *xs: str) -> str:
        out = xs[0]
        for x in xs[1:]:
            out = self.op("And", out, x)
        return out

    def or_(self, *xs: str) -> str:
        out = xs[0]
        for x in xs[1:]:
            out = self.op("Or", out, x)
        return out

    def choose(self, cond: str, a: str, b: str) -> str:
        """``Where`` for bool tensors (ONNX Runtime has no bool kernel for it)."""
        return self.or_(self.and_(cond, a), self.and_(self.not_(cond), b))

    def not_(self, x: str) -> str:
        return self.op("Not", x)

    def total(self, xs: list[str]) -> str:
        out = xs[0]
        for x in xs[1:]:
            out = self.add(out, x)
        return out

    def softmax(self, xs: list[str]) -> list[str]:
        """exp(x_k - max) / sum over the list of [N] tensors (no overflow)."""
        top = xs[0]
        for x in xs[1:]:
            top = self.op("Max", top, x)
        exps = [self.op("Exp", self.sub(x, top)) for x in xs]
        total = self.total(exps)
        return [self.div(e, total) for e in exps]

    def interval(self, x: str, closure: str, left: float | None, right: float | None) -> str:
        """Rows of ``x`` inside a PMML Interval (``closure`` like ``closedOpen``)."""
        parts = []
        if left is not None:
            parts.append(self.op("GreaterOrEqual" if closure.startswith("closed") else "Greater",
                                 x, self.scalar(left)))
        if right is not None:
            parts.append(self.op("LessOrEqual" if closure.endswith("Closed") else "Less",
                                 x, self.scalar(right)))
        return self.and_(*parts) if parts else self.not_(self.false_like(x))

    def false_like(self, x: str) -> str:
        """A bool [N] of False shaped like the float64 [N] tensor ``x``."""
        return self.op("Less", self.op("Abs", x), self.scalar(-1))

    def to_bool(self, x: str) -> str:
        return self.op("Cast", x, to=9)

    def to_double(self, x: str) -> str:
        return self.op("Cast", x, to=11)

    def f32(self, x: str) -> str:
        """Round a float64 tensor to the nearest float32 (PMML ``float`` fields)."""
        return self.to_double(self.op("Cast", x, to=1))

    def column(self, x: str) -> str:
        return self.op("Unsqueeze", x, self.const([1], np.int64))

    def concat(self, columns: list[str]) -> str:
        """Stack [N] tensors into [N, len(columns)]."""
        cols = [self.column(c) for c in columns]
        return cols[0] if len(cols) == 1 else self.op("Concat", *cols, axis=1)

    def take(self, matrix: str, index: int) -> str:
        """Column ``index`` of an [N, K] tensor as [N]."""
        return self.op("Gather", matrix, self.const(index, np.int64), axis=1)

    def clean(self, val: Val) -> str:
        """The value with missing rows set to 0 (so NaN never leaks into arithmetic)."""
        return self.where(val.missing, self.scalar(0.0), val.value)

    def model(self, inputs: list, outputs: list):
        from onnx import helper

        graph = helper.make_graph(self.nodes, "pmml", inputs, outputs, self.initializers)
        return helper.make_model(
            graph, producer_name="edgepack",
            opset_imports=[helper.make_opsetid("", OPSET),
                           helper.make_opsetid("ai.onnx.ml", ML_OPSET)])
