"""Inverse link functions in float64 (logit, probit, cloglog, loglog, cauchit, exp, power…).

The normal CDF uses West's double-precision form of Hart's algorithm (no float32 ``Erf``).
"""

from __future__ import annotations

import numpy as np

from .graph import Graph

__all__ = ["inverse_link", "normal_cdf", "LINKS"]

LINKS = {"identity", "logit", "probit", "cloglog", "loglog", "cauchit", "exp", "log",
         "softmax", "none", "power", "logc", "oddspower", "negbin"}

_NUM = [3.52624965998911e-02, 0.700383064443688, 6.37396220353165, 33.912866078383,
        112.079291497871, 221.213596169931, 220.206867912376]
_DEN = [8.83883476483184e-02, 1.75566716318264, 16.064177579207, 86.7807322029461,
        296.564248779674, 637.333633378831, 793.826512519948, 440.413735824752]


def _poly(g: Graph, x: str, coefs: list[float]) -> str:
    out = g.scalar(coefs[0])
    for c in coefs[1:]:
        out = g.add(g.mul(out, x), g.scalar(c))
    return out


def normal_cdf(g: Graph, x: str) -> str:
    ax = g.op("Abs", x)
    e = g.op("Exp", g.mul(g.mul(ax, ax), g.scalar(-0.5)))
    near = g.div(g.mul(e, _poly(g, ax, _NUM)), _poly(g, ax, _DEN))
    b = g.add(ax, g.scalar(0.65))
    for k in (4.0, 3.0, 2.0, 1.0):
        b = g.add(ax, g.div(g.scalar(k), b))
    far = g.div(e, g.mul(b, g.scalar(2.506628274631)))
    tail = g.where(g.op("Less", ax, g.scalar(7.07106781186547)), near, far)
    tail = g.where(g.op("Greater", ax, g.scalar(37.0)), g.scalar(0.0), tail)
    return g.where(g.op("Greater", x, g.scalar(0.0)), g.sub(g.scalar(1.0), tail), tail)


def inverse_link(g: Graph, name: str, x: str, parameter: float | None = None) -> str:
    """``link^-1(x)`` for a PMML normalizationMethod or GLM linkFunction ``name``."""
    one = g.scalar(1.0)
    if name in {"identity", "none"}:
        return x
    if name in {"logit", "softmax"}:
        return g.op("Sigmoid", x)
    if name == "probit":
        return normal_cdf(g, x)
    if name == "cloglog":
        return g.sub(one, g.op("Exp", g.op("Neg", g.op("Exp", x))))
    if name == "loglog":
        return g.op("Exp", g.op("Neg", g.op("Exp", g.op("Neg", x))))
    if name == "cauchit":
        # atan in float64 (ONNX Runtime has no float64 Atan)
        return g.add(g.scalar(0.5), g.div(_atan(g, x), g.scalar(np.pi)))
    if name in {"exp", "log"}:
        return g.op("Exp", x)
    if name == "logc":
        return g.sub(one, g.op("Exp", x))
    if name == "power":
        if not parameter:
            return g.op("Exp", x)
        return g.op("Pow", x, g.scalar(1.0 / parameter))
    if name == "oddspower":
        if not parameter:
            return g.op("Sigmoid", x)
        p = g.op("Pow", g.add(one, g.mul(g.scalar(parameter), x)), g.scalar(1.0 / parameter))
        return g.div(p, g.add(one, p))
    if name == "negbin":
        k = g.scalar(parameter or 1.0)
        return g.div(one, g.mul(k, g.sub(g.op("Exp", g.op("Neg", x)), one)))
    raise KeyError(name)


def _atan(g: Graph, x: str) -> str:
    """arctan in float64: the angle halved three times, then a 12-term odd series (< 1e-15)."""
    one = g.scalar(1.0)
    y = x
    for _ in range(3):
        y = g.div(y, g.add(one, g.op("Sqrt", g.add(one, g.mul(y, y)))))
    y2 = g.mul(y, y)
    terms = [((-1) ** k) / (2 * k + 1) for k in range(12)]
    s = g.scalar(terms[-1])
    for c in reversed(terms[:-1]):
        s = g.add(g.mul(s, y2), g.scalar(c))
    return g.mul(g.mul(s, y), g.scalar(8.0))
