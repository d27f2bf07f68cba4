"""PMML predicates in three-valued logic: each compiles to (true mask, unknown mask) over rows.

A comparison with a missing value is UNKNOWN (``isMissing``/``isNotMissing`` never are);
``and``/``or``/``xor`` follow the specification's truth tables and ``surrogate`` takes the first
operand that is not UNKNOWN.
"""

from __future__ import annotations

from .arrays import parse_array
from .document import Context, child, children, unsupported
from .fields import constant
from .graph import Val

__all__ = ["predicate", "PREDICATES"]

PREDICATES = {"SimplePredicate", "SimpleSetPredicate", "CompoundPredicate", "True", "False"}
_OPS = {"equal": ("Equal", False), "notEqual": ("Equal", True), "lessThan": ("Less", False),
        "lessOrEqual": ("LessOrEqual", False), "greaterThan": ("Greater", False),
        "greaterOrEqual": ("GreaterOrEqual", False)}


def find_predicate(el):
    for c in children(el):
        if c.tag in PREDICATES:
            return c
    raise unsupported(el, "no predicate", "add <True/> or another predicate")


def predicate(ctx: Context, el, scope: dict) -> tuple[str, str]:
    """(true, unknown) bool masks of predicate element ``el``."""
    g = ctx.graph
    tag = el.tag
    if tag == "True":
        return g.not_(ctx.falses), ctx.falses
    if tag == "False":
        return ctx.falses, ctx.falses
    if tag == "SimplePredicate":
        val = _field(scope, el)
        op = el.get("operator")
        ctx.use(f"SimplePredicate/{op}")
        if op in {"isMissing", "isNotMissing"}:
            return (val.missing if op == "isMissing" else g.not_(val.missing)), ctx.falses
        if op not in _OPS:
            raise unsupported(el, f"operator {op!r} is unknown", "use one of " + ", ".join(_OPS))
        onnx_op, negate = _OPS[op]
        if val.is_string and onnx_op != "Equal":
            raise unsupported(el, f"operator {op!r} on the string field {el.get('field')!r} "
                              "is not supported", "compare numbers or use equal/notEqual")
        out = g.op(onnx_op, val.value, g.scalar(constant(ctx, val.data_type, el.get("value"),
                                                          el)))
        if negate:
            out = g.not_(out)
        return g.and_(out, g.not_(val.missing)), val.missing
    if tag == "SimpleSetPredicate":
        val = _field(scope, el)
        op = el.get("booleanOperator")
        ctx.use(f"SimpleSetPredicate/{op}")
        array = child(el, "Array")
        if array is None or op not in {"isIn", "isNotIn"}:
            raise unsupported(el, "needs an Array and booleanOperator isIn or isNotIn")
        codes = [constant(ctx, val.data_type, t, array) for t in parse_array(array)]
        hit = g.or_(*[g.op("Equal", val.value, g.scalar(c)) for c in codes]) if codes \
            else ctx.falses
        if op == "isNotIn":
            hit = g.not_(hit)
        return g.and_(hit, g.not_(val.missing)), val.missing
    if tag == "CompoundPredicate":
        return _compound(ctx, el, scope)
    raise unsupported(el, "is not a predicate")


def _field(scope: dict, el) -> Val:
    name = el.get("field")
    if name not in scope:
        raise unsupported(el, f"field {name!r} is not defined here",
                          "define it in the DataDictionary or a DerivedField")
    return scope[name]


def _compound(ctx: Context, el, scope: dict) -> tuple[str, str]:
    g = ctx.graph
    op = el.get("booleanOperator")
    ctx.use(f"CompoundPredicate/{op}")
    parts = [predicate(ctx, c, scope) for c in children(el) if c.tag in PREDICATES]
    if not parts:
        raise unsupported(el, "has no predicates inside")
    if op == "and":
        false = g.or_(*[g.not_(g.or_(t, u)) for t, u in parts])
        true = g.and_(*[t for t, _ in parts])
        return true, g.not_(g.or_(true, false))
    if op == "or":
        true = g.or_(*[t for t, _ in parts])
        false = g.and_(*[g.not_(g.or_(t, u)) for t, u in parts])
        return true, g.not_(g.or_(true, false))
    if op == "xor":
        unknown = g.or_(*[u for _, u in parts])
        parity = parts[0][0]
        for t, _ in parts[1:]:
            parity = g.op("Xor", parity, t)
        return g.and_(parity, g.not_(unknown)), unknown
    if op == "surrogate":
        true, unknown = parts[-1]
        for t, u in reversed(parts[:-1]):
            true = g.or_(g.and_(u, true), t)
            unknown = g.and_(u, unknown)
        return true, unknown
    raise unsupported(el, f"booleanOperator {op!r} is unknown",
                      "use and, or, xor or surrogate")
