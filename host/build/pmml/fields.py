"""DataDictionary and MiningSchema: the graph's inputs and the treatment of missing, invalid and
outlying values before a model sees them.

Inputs are one ONNX tensor of shape ``[N, 1]`` per active field, named as the document names
it: ``string`` for fields of dataType string, ``double`` for every other type (boolean as 0/1).
A missing value is ``NaN`` in a number input and ``""`` in a string input; values the document
declares as missing (``<Value property="missing">``) count as missing too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .document import Context, attr_float, child, children, unsupported
from .graph import Val

__all__ = ["FieldSpec", "InputField", "read_data_dictionary", "input_values", "apply_schema"]

_MISSING_CODE = -2.0
_TYPES = {"string", "integer", "double", "float", "boolean", "date", "time", "dateTime"}


@dataclass(frozen=True)
class FieldSpec:
    """One DataField: name, optype, dataType, declared valid/missing/invalid values, intervals."""

    name: str
    optype: str
    data_type: str
    valid: tuple = ()
    missing: tuple = ()
    intervals: tuple = ()
    invalid: tuple = ()

    @property
    def is_string(self) -> bool:
        return self.data_type == "string"


@dataclass(frozen=True)
class InputField:
    """An input of the converted model: the PMML field name, its optype, tensor dtype, values."""

    name: str
    optype: str
    dtype: str
    values: tuple = ()
    intervals: tuple = ()  # (closure, left, right) of a continuous field's valid ranges


def read_data_dictionary(ctx: Context) -> dict[str, FieldSpec]:
    dd = child(ctx.root, "DataDictionary")
    if dd is None:
        raise unsupported(ctx.root, "the document has no DataDictionary", "add one")
    specs = {}
    for df in children(dd, "DataField"):
        name, dtype = df.get("name"), df.get("dataType", "string")
        if dtype not in _TYPES or dtype in {"date", "time", "dateTime"}:
            raise unsupported(df, f"dataType {dtype!r} of field {name!r} is not supported",
                              "convert it to a number or string field before export")
        valid, missing, invalid, intervals = [], [], [], []
        for v in children(df, "Value"):
            prop = v.get("property", "valid")
            {"missing": missing, "invalid": invalid}.get(prop, valid).append(v.get("value"))
        for iv in children(df, "Interval"):
            intervals.append((iv.get("closure", "closedClosed"), attr_float(iv, "leftMargin"),
                              attr_float(iv, "rightMargin")))
        optype = df.get("optype") or ("categorical" if dtype == "string" else "continuous")
        specs[name] = FieldSpec(name, optype, dtype, tuple(valid), tuple(missing),
                                tuple(intervals), tuple(invalid))
        ctx.use(f"DataField/{optype}")
    ctx.data_fields = specs
    return specs


def _number(spec: FieldSpec, text: str, el=None) -> float:
    if spec.data_type == "boolean":
        return 1.0 if text.strip().lower() in {"true", "1"} else 0.0
    try:
        value = float(text)
    except ValueError:
        raise unsupported(el, f"value {text!r} of field {spec.name!r} is not a number",
                          "fix the value") from None
    return float(np.float32(value)) if spec.data_type == "float" else value


def constant(ctx: Context, spec_or_type, text: str, el=None) -> float:
    """A constant from the document as the graph codes it (strings as vocabulary codes)."""
    dtype = spec_or_type.data_type if isinstance(spec_or_type, FieldSpec) else spec_or_type
    if dtype == "string":
        return ctx.vocab.code(text)
    return _number(FieldSpec("", "", dtype), text, el)


def _in_list(ctx: Context, x: str, codes: list[float]) -> str:
    g = ctx.graph
    if not codes:
        return g.false_like(x)
    return g.or_(*[g.op("Equal", x, g.scalar(c)) for c in codes])


def input_values(ctx: Context, names: list[str]) -> tuple[list, dict]:
    """ONNX inputs for the active fields and their raw values: name -> (Val, invalid mask)."""
    from onnx import TensorProto, helper

    g = ctx.graph
    flat = g.const([-1], np.int64)
    inputs, raw = [], {}
    for name in names:
        spec = ctx.data_fields[name]
        if spec.is_string:
            inputs.append(helper.make_tensor_value_info(name, TensorProto.STRING, [None, 1]))
            keys = ctx.vocab.strings + [""]
            codes = [float(i) for i in range(len(ctx.vocab.strings))] + [_MISSING_CODE]
            x = g.op("LabelEncoder", g.op("Reshape", name, flat), domain="ai.onnx.ml",
                     keys_strings=keys, values_floats=codes, default_float=-1.0)
            x = g.to_double(x)
            missing = g.op("Equal", x, g.scalar(_MISSING_CODE))
        else:
            inputs.append(helper.make_tensor_value_info(name, TensorProto.DOUBLE, [None, 1]))
            x = g.op("Reshape", name, flat)
            if spec.data_type == "float":
                x = g.f32(x)
            missing = g.op("IsNaN", x)
        declared = [constant(ctx, spec, m) for m in spec.missing]
        if declared:
            missing = g.or_(missing, _in_list(ctx, x, declared))
        invalid = _invalid(ctx, spec, x)
        if invalid is not None:
            invalid = g.and_(invalid, g.not_(missing))
        raw[name] = (Val(x, missing, spec.is_string, spec.data_type), invalid)
        values = tuple(spec.valid)
        inputs_dtype = "string" if spec.is_string else "float64"
        ctx.inputs.append(InputField(name, spec.optype, inputs_dtype, values, spec.intervals))
    return inputs, raw


def _invalid(ctx: Context, spec: FieldSpec, x: str) -> str | None:
    g = ctx.graph
    masks = []
    if spec.valid and (spec.optype != "continuous" or not spec.intervals):
        masks.append(g.not_(_in_list(ctx, x, [constant(ctx, spec, v) for v in spec.valid])))
    if spec.intervals and not spec.is_string:
        inside = [g.interval(x, closure, left, right)
                  for closure, left, right in spec.intervals]
        if inside:
            masks.append(g.not_(g.or_(*inside)))
    if spec.invalid:
        masks.append(_in_list(ctx, x, [constant(ctx, spec, v) for v in spec.invalid]))
    if spec.data_type == "integer" and not spec.is_string:
        masks.append(g.op("Not", g.op("Equal", g.op("Floor", x), x)))
    return g.or_(*masks) if masks else None


def apply_schema(ctx: Context, model, raw: dict | None = None) -> dict[str, Val]:
    """A model's view of its fields after its MiningSchema's treatments.

    ``raw`` (top-level model only) carries invalid masks; nested models take the parent's
    prepared values from ``ctx.fields`` and apply their own replacements and outlier rules.
    """
    g = ctx.graph
    schema = child(model, "MiningSchema")
    if schema is None:
        raise unsupported(model, "the model has no MiningSchema", "add one")
    view = dict(ctx.fields)
    for mf in children(schema, "MiningField"):
        name = mf.get("name")
        usage = mf.get("usageType", "active")
        if usage in {"target", "predicted", "supplementary", "group", "order", "frequencyWeight",
                     "analysisWeight"}:
            continue
        if raw is not None and name in raw:
            val, invalid = raw[name]
        elif name in view:
            val, invalid = view[name], None
        else:
            raise unsupported(mf, f"field {name!r} is not in the DataDictionary or in scope",
                              "declare it in the DataDictionary")
        value, missing = val.value, val.missing
        spec = ctx.data_fields.get(name)
        dtype = spec.data_type if spec else val.data_type
        if invalid is not None:
            treatment = mf.get("invalidValueTreatment", "returnInvalid")
            ctx.use(f"invalidValueTreatment/{treatment}")
            if mf.get("invalidValueReplacement") is not None:
                value = g.where(invalid, g.scalar(constant(ctx, dtype,
                                mf.get("invalidValueReplacement"), mf)), value)
            elif treatment == "returnInvalid":
                ctx.invalid.append(invalid)
            elif treatment in {"asMissing", "asValue"}:
                missing = g.or_(missing, invalid)
            elif treatment != "asIs":
                raise unsupported(mf, f"invalidValueTreatment={treatment!r} is unknown")
        outliers = mf.get("outliers", "asIs")
        if outliers != "asIs" and not val.is_string:
            ctx.use(f"outliers/{outliers}")
            low, high = attr_float(mf, "lowValue"), attr_float(mf, "highValue")
            clean = g.clean(Val(value, missing))
            below = g.op("Less", clean, g.scalar(low)) if low is not None else None
            above = g.op("Greater", clean, g.scalar(high)) if high is not None else None
            if outliers == "asMissingValues":
                for m in (below, above):
                    if m is not None:
                        missing = g.or_(missing, g.and_(m, g.not_(missing)))
            elif outliers == "asExtremeValues":
                if below is not None:
                    value = g.where(below, g.scalar(low), value)
                if above is not None:
                    value = g.where(above, g.scalar(high), value)
            else:
                raise unsupported(mf, f"outliers={outliers!r} is unknown")
        replacement = mf.get("missingValueReplacement")
        if replacement is not None:
            ctx.use("missingValueReplacement")
            value = g.where(missing, g.scalar(constant(ctx, dtype, replacement, mf)), value)
            missing = ctx.falses
        view[name] = Val(value, missing, val.is_string, dtype)
    return view
