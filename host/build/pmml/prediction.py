"""What a compiled model hands back: a value per row, or a class index plus probabilities."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .document import Context
from .graph import Val

__all__ = ["Prediction", "Classes", "argmax_label", "from_probabilities"]


class Classes:
    """The target's class labels as PMML writes them; undeclared ones are added in order met."""

    def __init__(self, declared: tuple, numeric: bool) -> None:
        self.labels = list(declared)
        self.numeric = numeric
        self.fixed = bool(declared)

    def index(self, label: str) -> int:
        key = self._key(label)
        for i, known in enumerate(self.labels):
            if self._key(known) == key:
                return i
        self.labels.append(label)
        return len(self.labels) - 1

    def _key(self, label: str):
        if self.numeric:
            try:
                return float(label)
            except ValueError:
                return label
        return label

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Prediction:
    """``value``: the predicted number (regression) or class index (classification);
    ``probs``: one float64 [N] tensor per class (classification only); ``void``: rows where the
    model gives no result at all (a tree without a matching node), which votes leave out."""

    value: Val
    probs: list | None = None
    void: str | None = None


def argmax_label(ctx: Context, probs: list[str]) -> str:
    """The index (float64 [N]) of the largest probability; ties go to the first class."""
    g = ctx.graph
    best, best_p = g.add(ctx.zeros, g.scalar(0.0)), probs[0]
    for k, p in enumerate(probs[1:], start=1):
        better = g.op("Greater", p, best_p)
        best = g.where(better, g.scalar(float(k)), best)
        best_p = g.op("Max", p, best_p)
    return best


def from_probabilities(ctx: Context, probs: list[str], missing: str) -> Prediction:
    """A classification prediction whose label is the most probable class."""
    return Prediction(Val(argmax_label(ctx, probs), missing), probs)


def pad_probs(ctx: Context, probs: list[str], n: int) -> list[str]:
    """Extend a probability list to ``n`` classes with zeros (classes found later)."""
    return probs + [ctx.graph.add(ctx.zeros, ctx.graph.scalar(0.0))] * (n - len(probs))


def table_lookup(ctx: Context, index: str, table) -> str:
    """Rows of ``table`` (a [R] or [R, K] float64 array) picked by the float64 [N] ``index``."""
    g = ctx.graph
    return g.op("Gather", g.const(np.asarray(table, dtype=np.float64)),
                g.op("Cast", index, to=7), axis=0)
