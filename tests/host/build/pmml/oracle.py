"""The test oracle: the same rows through JPMML-Evaluator and through the converted ONNX model."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

CORPUS = Path(__file__).parent / "corpus"
RTOL = 1e-6


def java_ready() -> bool:
    import shutil

    try:
        import jpmml_evaluator  # noqa: F401
        import pandas  # noqa: F401
    except ImportError:
        return False
    return shutil.which("java") is not None


needs_java = pytest.mark.skipif(not java_ready(), reason="needs Java and jpmml_evaluator "
                                "(.ci/install-system-deps.sh, pip install -e .[dev])")


@functools.cache
def evaluator(path: str):
    from jpmml_evaluator import make_evaluator

    return make_evaluator(path).verify()


def jpmml_rows(path: Path, df) -> list:
    """JPMML's result per row (a dict), or None where JPMML refuses the row (invalid value)."""
    import pandas as pd

    ev = evaluator(str(path))
    try:
        out = ev.evaluateAll(df)
        rows = [dict(r) for _, r in out.iterrows()]
        # rows JPMML refused carry an `errors` entry
        return [None if not _is_missing(r.get("errors")) else r for r in rows]
    except Exception:  # noqa: BLE001 - JPMML raises for a batch holding an invalid row
        rows = []
        for _, r in df.iterrows():
            args = {k: (None if _is_missing(v) else v) for k, v in r.items()}
            try:
                rows.append(dict(ev.evaluate(args)))
            except Exception:  # noqa: BLE001
                rows.append(None)
        return [None if r is None else dict(pd.Series(r)) for r in rows]


def _is_missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def onnx_feed(res, df) -> dict:
    feed = {}
    for field in res.inputs:
        col = df[field.name] if field.name in df.columns else [None] * len(df)
        if field.dtype == "string":
            arr = np.array(["" if _is_missing(v) else str(v) for v in col], dtype=object)
        else:
            arr = np.array([np.nan if _is_missing(v) else float(v) for v in col], np.float64)
        feed[field.name] = arr.reshape(-1, 1)
    return feed


def probability_columns(path: Path) -> dict:
    """OutputField name by class for the top model's probability outputs."""
    from edgepack.host.build.pmml.document import child, children, read_document
    from edgepack.host.build.pmml.models import MODEL_TAGS

    root = read_document(path)
    model = [c for c in children(root) if c.tag in MODEL_TAGS][0]
    output = child(model, "Output")
    found = {}
    for of in children(output, "OutputField") if output is not None else []:
        if of.get("feature") == "probability" and of.get("value") is not None:
            found[of.get("value")] = of.get("name")
    return found


@dataclass
class Agreement:
    document: str
    rows: int
    agreed: int
    mismatches: list

    @property
    def ratio(self) -> float:
        return self.agreed / self.rows if self.rows else 1.0


def _close(a, b) -> bool:
    a_missing, b_missing = _is_missing(a), _is_missing(b)
    if a_missing or b_missing:
        return a_missing and b_missing
    return abs(a - b) <= RTOL * max(abs(a), abs(b), 1e-12) or abs(a - b) < 1e-12


def _same_label(expected, got, integer: bool) -> bool:
    if _is_missing(expected):
        return got == "" or (integer and got == np.iinfo(np.int64).min)
    if integer:
        return int(expected) == int(got)
    if isinstance(expected, float) and expected.is_integer():
        return str(got) in {str(expected), str(int(expected))}
    return str(expected) == str(got)


def agree(path: Path, df, res=None) -> Agreement:
    """Run ``df`` through JPMML and the converted model; count rows that agree."""
    import onnxruntime as ort

    from edgepack.host.build.pmml import convert_pmml

    res = res or convert_pmml(path)
    session = ort.InferenceSession(res.onnx.SerializeToString())
    names = [o.name for o in res.outputs]
    got = dict(zip(names, session.run(names, onnx_feed(res, df)), strict=True))
    return _count(path, df, res, got)


def _count(path: Path, df, res, got: dict) -> Agreement:
    """Rows where JPMML's result on ``df`` equals ``got`` (output name -> array over rows)."""
    expected = jpmml_rows(path, df)
    probs = probability_columns(path) if res.task == "classification" else {}
    integer = any(o.dtype == "int64" for o in res.outputs)
    agreed, bad = 0, []
    for i, row in enumerate(expected):
        ok = True
        if res.task == "regression":
            want = None if row is None else row.get(res.target)
            ok = _close(want, got["predicted"][i])
        else:
            want = None if row is None else row.get(res.target)
            ok = _same_label(want, got["label"][i], integer)
            for k, cls in enumerate(res.classes):
                if cls in probs and ok:
                    want_p = None if row is None else row.get(probs[cls])
                    ok = _close(want_p, got["probabilities"][i, k])
        if ok:
            agreed += 1
        elif len(bad) < 5:
            bad.append((i, dict(df.iloc[i]), row, {k: v[i] for k, v in got.items()}))
    return Agreement(path.name, len(expected), agreed, bad)


def golden_agreement(path: Path, bundle: Path) -> Agreement:
    """The bundle's golden rows through JPMML, against the golden outputs the bundle carries."""
    import io
    import json
    import zipfile

    import pandas as pd

    from edgepack.host.build.pmml import convert_pmml

    with zipfile.ZipFile(bundle) as z:
        manifest = json.loads(z.read("manifest.json"))
        golden = np.load(io.BytesIO(z.read("golden.npz")), allow_pickle=False)
        golden = {k: golden[k] for k in golden.files}
    columns = {}
    for i, spec in enumerate(manifest["model"]["inputs"]):
        values = golden[f"input_{i}"].reshape(-1)
        assert values.dtype.kind in ("U" if spec["dtype"] == "string" else "f"), values.dtype
        columns[spec["name"]] = [None if (v == "" if values.dtype.kind == "U" else np.isnan(v))
                                 else (str(v) if values.dtype.kind == "U" else float(v))
                                 for v in values]
    got = {spec["name"]: golden[f"output_{j}"].reshape(len(golden["output_0"]),
                                                       *golden[f"output_{j}"].shape[2:])
           for j, spec in enumerate(manifest["model"]["outputs"])}
    return _count(path, pd.DataFrame(columns), convert_pmml(path), got)


def assert_agrees(path: Path, df, res=None) -> Agreement:
    result = agree(path, df, res)
    assert result.ratio >= 0.999, (
        f"{result.document}: {result.agreed}/{result.rows} rows agree; "
        f"first mismatches: {result.mismatches}")
    return result
