"""PMML documents: edgepack's own PMML 4.x converter (:mod:`edgepack.host.build.pmml`) → ONNX.

The model keeps the document's inputs (one per field, named as the document names them; strings
for string fields) and its arithmetic (float64), so it stays float: int8 would change what the
PMML specifies, and nothing asks for calibration data. Without any data, the gate and the golden
samples use rows synthesized from the DataDictionary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgepack.host.build.data import Dataset, InputDomain
from edgepack.host.build.importers.base import Imported

__all__ = ["FLOAT_REASON", "load", "synthesized_rows"]

FLOAT_REASON = ("PMML models stay float: the document specifies float64 arithmetic (and string "
                "inputs) that int8 would change, so no int8 and no calibration data")
SYNTHESIZED = "rows synthesized from the PMML DataDictionary"
_MIN_ROWS = 8
_MAX_ROWS = 64


def load(src: Path, *, workdir: Path, opset: int, sample_input: str | None) -> Imported:
    """Convert the document; ModelError (element and line) for what is not supported."""
    from edgepack.host.build.pmml import convert_pmml

    res = convert_pmml(src)
    onnx_path = workdir / f"{src.stem}.onnx"
    onnx_path.write_bytes(res.onnx.SerializeToString())
    what = f"PMML {res.version} <{res.element}>"
    inputs = ", ".join(f"{f.name} ({f.dtype})" for f in res.inputs)
    outputs = ", ".join(f"{o.name} ({o.dtype})" for o in res.outputs)
    notes = [f"{what} ({res.task}) from {res.producer or 'an unnamed producer'}, converted by "
             "edgepack's PMML converter",
             f"inputs, one per PMML field: {inputs}; missing values are NaN (numbers) or "
             "'' (strings)",
             f"outputs: {outputs}" + (f"; classes {list(res.classes)[:20]}" if res.classes
                                      else ""),
             f"PMML features used: {', '.join(res.features)}",
             FLOAT_REASON]
    domain = InputDomain(missing_ok=True, synthesized=synthesized_rows(res),
                         label_field=res.target if res.task == "classification" else None)
    details = {"pmml": {"producer": res.producer, "version": res.version, "task": res.task,
                        "target": res.target, "classes": list(res.classes),
                        "features": list(res.features),
                        "inputs": [{"name": f.name, "optype": f.optype, "dtype": f.dtype}
                                   for f in res.inputs]}}
    return Imported("pmml", src, onnx_path, None, None, True, tuple(notes), domain, details)


def synthesized_rows(res: Any) -> Dataset:
    """Golden inputs from the DataDictionary: each field's declared values in turn (categorical
    fields), the midpoints of its intervals (continuous fields), else 0 (or "" for strings)."""
    choices = {f.name: _choices(f) for f in res.inputs}
    n = min(_MAX_ROWS, max(_MIN_ROWS, *(len(c) for c in choices.values())))
    arrays = {}
    for f in res.inputs:
        c = choices[f.name]
        column = [c[i % len(c)] for i in range(n)]
        dtype = str if f.dtype == "string" else np.float64
        arrays[f.name] = np.array(column, dtype=dtype).reshape(n, 1)
    return Dataset(arrays, None, f"{n} {SYNTHESIZED} (declared values of categorical fields, "
                   "interval midpoints or 0 for continuous ones): no eval data given")


def _choices(field: Any) -> list:
    if field.dtype == "string":
        return list(field.values) or [""]
    if field.values:
        try:
            return [float(v) for v in field.values]
        except ValueError:
            pass  # booleans written as true/false
        return [1.0 if str(v).lower() in ("true", "1") else 0.0 for v in field.values]
    mids = []
    for _, left, right in field.intervals:
        if left is not None and right is not None:
            mids.append((left + right) / 2.0)
        elif left is not None or right is not None:
            mids.append(float(left if left is not None else right))
    return mids or [0.0]
