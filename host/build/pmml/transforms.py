"""TransformationDictionary, LocalTransformations and their expressions.

Each expression compiles to a :class:`Val`. A function of a missing argument is missing (then
``mapMissingTo`` applies), except ``isMissing``, ``isNotMissing``, ``if``, ``isIn``/``isNotIn``
(a missing value is in no list) and ``and``/``or`` (three-valued logic); a result that is not
a finite number (``ln(-1)``, ``x/0``) takes ``defaultValue`` or becomes missing.
"""

from __future__ import annotations

import numpy as np

from edgepack.agent.errors import ModelError

from .document import Context, attr_float, child, children, unsupported
from .fields import constant
from .graph import Val

__all__ = ["derive_fields", "expression", "read_functions", "table_rows", "column_name"]

_EXPRESSIONS = {"Constant", "FieldRef", "NormContinuous", "NormDiscrete", "Discretize",
                "MapValues", "Apply", "TextIndex", "Aggregate", "Lag"}
_UNARY = {"exp": "Exp", "sqrt": "Sqrt", "abs": "Abs", "floor": "Floor", "ceil": "Ceil",
          "ln": "Log"}
_COMPARE = {"equal": ("Equal", False), "notEqual": ("Equal", True), "lessThan": ("Less", False),
            "lessOrEqual": ("LessOrEqual", False), "greaterThan": ("Greater", False),
            "greaterOrEqual": ("GreaterOrEqual", False)}


def read_functions(ctx: Context) -> None:
    td = child(ctx.root, "TransformationDictionary")
    if td is not None:
        for fn in children(td, "DefineFunction"):
            ctx.functions[fn.get("name")] = fn


def derive_fields(ctx: Context, container, scope: dict, tolerant: bool = False) -> dict:
    """Add the DerivedFields of a TransformationDictionary/LocalTransformations to ``scope``.

    ``tolerant`` skips fields built on fields out of scope (a TransformationDictionary may
    define fields for models the document does not score); using one later still fails.
    """
    if container is None:
        return scope
    ctx.use(container.tag)
    scope = dict(scope)
    for df in children(container, "DerivedField"):
        expr = _the_expression(df)
        try:
            val = expression(ctx, expr, scope)
        except ModelError:
            if tolerant:
                continue
            raise
        dtype = df.get("dataType", val.data_type)
        value = val.value
        if dtype == "float" and not val.is_string:
            value = ctx.graph.f32(value)
        scope[df.get("name")] = Val(value, val.missing, dtype == "string" or val.is_string,
                                    dtype)
    return scope


def _the_expression(el):
    found = [c for c in children(el) if c.tag in _EXPRESSIONS]
    if not found:
        raise unsupported(el, "no expression inside", "add one of " + ", ".join(_EXPRESSIONS))
    return found[0]


def _constant_val(ctx: Context, number: float, is_string=False, dtype="double") -> Val:
    g = ctx.graph
    return Val(g.add(ctx.zeros, g.scalar(number)), ctx.falses, is_string, dtype)


def _missing_val(ctx: Context) -> Val:
    g = ctx.graph
    return Val(g.add(ctx.zeros, g.scalar(np.nan)), g.not_(ctx.falses))


def _map_missing(ctx: Context, el, val: Val, dtype: str) -> Val:
    """Apply ``mapMissingTo`` of ``el`` to ``val``."""
    g = ctx.graph
    if el.get("mapMissingTo") is None:
        return val
    fill = constant(ctx, dtype, el.get("mapMissingTo"), el)
    return Val(g.where(val.missing, g.scalar(fill), val.value), ctx.falses, val.is_string,
               val.data_type)


def expression(ctx: Context, el, scope: dict) -> Val:
    """Compile one expression element in the field ``scope``."""
    g = ctx.graph
    tag = el.tag
    ctx.use(tag)
    if tag == "Constant":
        dtype = el.get("dataType") or _guess_type(el.text or "")
        if el.get("missing") == "true":
            return _missing_val(ctx)
        return _constant_val(ctx, constant(ctx, dtype, (el.text or "").strip(), el),
                             dtype == "string", dtype)
    if tag == "FieldRef":
        val = _field(scope, el, el.get("field"))
        return _map_missing(ctx, el, val, val.data_type)
    if tag == "NormContinuous":
        return _norm_continuous(ctx, el, scope)
    if tag == "NormDiscrete":
        val = _field(scope, el, el.get("field"))
        code = constant(ctx, val.data_type, el.get("value"), el)
        out = Val(g.to_double(g.op("Equal", val.value, g.scalar(code))), val.missing)
        return _map_missing(ctx, el, out, "double")
    if tag == "Discretize":
        return _discretize(ctx, el, scope)
    if tag == "MapValues":
        return _map_values(ctx, el, scope)
    if tag == "Apply":
        return _apply(ctx, el, scope)
    raise unsupported(el, f"<{tag}> expressions are not supported",
                      "compute the field before export or replace it with Apply")


def _guess_type(text: str) -> str:
    try:
        float(text)
        return "double"
    except ValueError:
        return "string"


def _field(scope: dict, el, name: str | None) -> Val:
    if name not in scope:
        raise unsupported(el, f"field {name!r} is not defined here",
                          "define it in the DataDictionary or a DerivedField before use")
    return scope[name]


def _norm_continuous(ctx: Context, el, scope: dict) -> Val:
    g = ctx.graph
    val = _field(scope, el, el.get("field"))
    pts = [(attr_float(p, "orig"), attr_float(p, "norm")) for p in children(el, "LinearNorm")]
    if len(pts) < 2:
        raise unsupported(el, "NormContinuous needs at least two LinearNorm elements")
    x = g.clean(val)
    outliers = el.get("outliers", "asIs")
    if outliers == "asExtremeValues":
        x = g.op("Max", g.op("Min", x, g.scalar(pts[-1][0])), g.scalar(pts[0][0]))
    out = None
    for i in range(len(pts) - 1):
        (a0, b0), (a1, b1) = pts[i], pts[i + 1]
        seg = g.add(g.scalar(b0), g.mul(g.sub(x, g.scalar(a0)), g.scalar((b1 - b0) / (a1 - a0))))
        out = seg if out is None else g.where(g.op("Less", x, g.scalar(a0)), out, seg)
    missing = val.missing
    if outliers == "asMissingValues":
        outside = g.or_(g.op("Less", x, g.scalar(pts[0][0])),
                        g.op("Greater", x, g.scalar(pts[-1][0])))
        missing = g.or_(missing, outside)
    elif outliers not in {"asIs", "asExtremeValues"}:
        raise unsupported(el, f"outliers={outliers!r} is unknown")
    return _map_missing(ctx, el, Val(out, missing), "double")


def _discretize(ctx: Context, el, scope: dict) -> Val:
    g = ctx.graph
    val = _field(scope, el, el.get("field"))
    dtype = el.get("dataType", "string")
    x = g.clean(val)
    result, hit = g.scalar(np.nan), ctx.falses
    for b in reversed(children(el, "DiscretizeBin")):
        iv = child(b, "Interval")
        closure, left, right = (iv.get("closure", "closedClosed"), attr_float(iv, "leftMargin"),
                                attr_float(iv, "rightMargin"))
        inside = g.interval(x, closure, left, right)
        result = g.where(inside, g.scalar(constant(ctx, dtype, b.get("binValue"), b)), result)
        hit = g.or_(hit, inside)
    result = g.add(ctx.zeros, result)
    missing = g.or_(val.missing, g.not_(hit))
    if el.get("defaultValue") is not None:
        default = constant(ctx, dtype, el.get("defaultValue"), el)
        result = g.where(g.not_(hit), g.scalar(default), result)
        missing = val.missing
    return _map_missing(ctx, el, Val(result, missing, dtype == "string", dtype), dtype)


def table_rows(table) -> list[dict]:
    """The rows of an InlineTable as column -> text."""
    return [_cells(r) for r in children(table, "row")]


def _cells(row) -> dict:
    out = {}
    for c in row:
        if isinstance(c.tag, str):
            out[column_name(c.tag)] = (c.text or "").strip()
    out.update({column_name(k): v for k, v in row.attrib.items()})
    return out


def column_name(name: str) -> str:
    """An InlineTable column without its namespace or prefix (``data:y`` -> ``y``)."""
    return name.split("}")[-1].split(":")[-1]


def _map_values(ctx: Context, el, scope: dict) -> Val:
    g = ctx.graph
    dtype = el.get("dataType", "string")
    pairs = [(p.get("field"), column_name(p.get("column", "")))
             for p in children(el, "FieldColumnPair")]
    table = child(el, "InlineTable")
    if table is None:
        raise unsupported(el, "MapValues without an InlineTable (TableLocator) is not supported",
                          "inline the table in the document")
    vals = [_field(scope, el, f) for f, _ in pairs]
    out_col = column_name(el.get("outputColumn", ""))
    result, hit = g.scalar(np.nan), ctx.falses
    for row in reversed(children(table, "row")):
        cells = _cells(row)
        if out_col not in cells or any(c not in cells for _, c in pairs):
            continue
        conds = [g.op("Equal", v.value, g.scalar(constant(ctx, v.data_type, cells[c], row)))
                 for v, (_, c) in zip(vals, pairs, strict=True)]
        match = g.and_(*conds) if conds else g.not_(ctx.falses)
        result = g.where(match, g.scalar(constant(ctx, dtype, cells[out_col], row)), result)
        hit = g.or_(hit, match)
    result = g.add(ctx.zeros, result)
    any_missing = g.or_(*[v.missing for v in vals]) if vals else ctx.falses
    missing = g.or_(any_missing, g.not_(hit))
    if el.get("defaultValue") is not None:
        result = g.where(g.not_(hit), g.scalar(constant(ctx, dtype, el.get("defaultValue"), el)),
                         result)
        missing = any_missing
    return _map_missing(ctx, el, Val(result, missing, dtype == "string", dtype), dtype)


def _apply(ctx: Context, el, scope: dict) -> Val:
    g = ctx.graph
    fn = el.get("function")
    args = [expression(ctx, a, scope) for a in children(el) if a.tag in _EXPRESSIONS]
    ctx.use(f"Apply/{fn}")
    if fn in ctx.functions:
        return _user_function(ctx, el, ctx.functions[fn], args)
    if fn in {"isMissing", "isNotMissing"}:
        flag = args[0].missing if fn == "isMissing" else g.not_(args[0].missing)
        return Val(g.to_double(flag), ctx.falses, False, "boolean")
    if fn == "if":
        cond, then = args[0], args[1]
        other = args[2] if len(args) > 2 else _missing_val(ctx)
        truth = g.to_bool(g.clean(cond))
        value = g.where(truth, then.value, other.value)
        missing = g.or_(cond.missing, g.choose(truth, then.missing, other.missing))
        out = Val(value, missing, then.is_string, then.data_type)
        return _map_missing(ctx, el, out, out.data_type)
    if fn in {"and", "or"} and args:
        return _map_missing(ctx, el, _three_valued(ctx, fn, args), "boolean")
    if fn in {"isIn", "isNotIn"} and len(args) > 1:
        # a missing value is in no list
        hit = g.or_(*[g.op("Equal", args[0].value, a.value) for a in args[1:]])
        hit = g.and_(hit, g.not_(args[0].missing))
        out = g.to_double(hit if fn == "isIn" else g.not_(hit))
        return Val(out, ctx.falses, False, "boolean")
    any_missing = g.or_(*[a.missing for a in args]) if args else ctx.falses
    xs = [g.clean(a) for a in args]
    value, dtype = _function(ctx, el, fn, xs, args)
    finite = g.not_(g.or_(g.op("IsNaN", value), g.op("IsInf", value)))
    missing = g.or_(any_missing, g.not_(finite))
    if el.get("defaultValue") is not None:
        bad = g.and_(g.not_(any_missing), g.not_(finite))
        value = g.where(bad, g.scalar(constant(ctx, dtype, el.get("defaultValue"), el)), value)
        missing = any_missing
    out = Val(value, missing, dtype == "string", dtype)
    return _map_missing(ctx, el, out, dtype)


def _three_valued(ctx: Context, fn: str, args: list[Val]) -> Val:
    """``and``/``or`` where a missing operand is UNKNOWN (FALSE and UNKNOWN is FALSE…)."""
    g = ctx.graph
    trues = [g.and_(g.to_bool(g.clean(a)), g.not_(a.missing)) for a in args]
    falses = [g.and_(g.not_(g.to_bool(g.clean(a))), g.not_(a.missing)) for a in args]
    if fn == "and":
        decided_false, all_true = g.or_(*falses), g.and_(*trues)
        return Val(g.to_double(all_true), g.not_(g.or_(all_true, decided_false)), False,
                   "boolean")
    decided_true, all_false = g.or_(*trues), g.and_(*falses)
    return Val(g.to_double(decided_true), g.not_(g.or_(decided_true, all_false)), False,
               "boolean")


def _function(ctx: Context, el, fn: str, xs: list[str], args: list[Val]) -> tuple[str, str]:
    g = ctx.graph

    def need(n: int) -> None:
        if len(xs) < n:
            raise unsupported(el, f"function {fn!r} needs {n} arguments, got {len(xs)}")

    if fn in {"+", "-", "*", "/"}:
        need(2)
        op = {"+": "Add", "-": "Sub", "*": "Mul", "/": "Div"}[fn]
        return g.op(op, xs[0], xs[1]), "double"
    if fn in {"min", "max", "sum", "avg", "product"}:
        need(1)
        if fn in {"min", "max"}:
            return g.op(fn.capitalize(), *xs), "double"
        out = xs[0]
        for x in xs[1:]:
            out = g.mul(out, x) if fn == "product" else g.add(out, x)
        return (g.div(out, g.scalar(len(xs))) if fn == "avg" else out), "double"
    if fn in _UNARY:
        need(1)
        return g.op(_UNARY[fn], xs[0]), "double"
    if fn == "log10":
        need(1)
        return g.div(g.op("Log", xs[0]), g.scalar(np.log(10.0))), "double"
    if fn == "round":
        need(1)
        return g.op("Floor", g.add(xs[0], g.scalar(0.5))), "double"
    if fn == "pow":
        need(2)
        return g.op("Pow", xs[0], xs[1]), "double"
    if fn == "threshold":
        need(2)
        return g.to_double(g.op("Greater", xs[0], xs[1])), "double"
    if fn in _COMPARE:
        need(2)
        op, negate = _COMPARE[fn]
        out = g.op(op, xs[0], xs[1])
        return g.to_double(g.not_(out) if negate else out), "boolean"
    if fn == "not":
        need(1)
        return g.to_double(g.not_(g.to_bool(xs[0]))), "boolean"
    if fn in {"x-sigmoid", "sigmoid"}:
        return g.op("Sigmoid", xs[0]), "double"
    if fn in {"x-tanh", "tanh"}:
        return g.op("Tanh", xs[0]), "double"
    raise unsupported(el, f"function {fn!r} is not supported",
                      "compute the field before export or use an arithmetic function")


def _user_function(ctx: Context, el, fn, args: list[Val]) -> Val:
    params = [p.get("name") for p in children(fn, "ParameterField")]
    if len(params) != len(args):
        raise unsupported(el, f"function {fn.get('name')!r} takes {len(params)} arguments, "
                              f"got {len(args)}")
    ctx.use("DefineFunction")
    out = expression(ctx, _the_expression(fn), dict(zip(params, args, strict=True)))
    return _map_missing(ctx, el, out, out.data_type)
