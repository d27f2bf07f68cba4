"""Documents written by a real producer at test time: scikit-learn pipelines through sklearn2pmml.

The rows each test scores hold missing numbers, missing strings and categories the model never
saw, next to ordinary rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

COLORS = ["red", "green", "blue"]


def training_frame(n: int = 400, seed: int = 0):
    import pandas as pd

    rng = np.random.default_rng(seed)
    df = pd.DataFrame({
        "x1": rng.normal(0, 1, n).round(3),
        "x2": rng.uniform(-2, 2, n).round(3),
        "x3": rng.normal(5, 2, n).round(3),
        "color": rng.choice(COLORS, n),
    })
    score = df.x1 * 1.5 - df.x2 + (df.color == "red") * 1.2 + 0.3 * df.x3
    df["y"] = (score + rng.normal(0, 0.5, n)).round(4)
    df["cls"] = np.where(score > 1.5, "high", np.where(score > 0, "mid", "low"))
    df["flag"] = (score > 1.0).astype(int)
    return df


def scoring_frame(n: int = 300, seed: int = 1, extra: bool = False):
    """Rows to score: fresh values plus missing numbers, missing strings, unseen categories.

    ``extra`` adds ``n`` (whole numbers 0-9), ``grade`` (A/B/C) and ``region`` (strings with
    spaces and quotes), with the same share of missing and unseen values.
    """
    frame = training_frame(n, seed)[["x1", "x2", "x3", "color"]].astype(object)
    rng = np.random.default_rng(seed)
    if extra:
        frame["n"] = rng.integers(0, 10, n).astype(float)
        frame["grade"] = rng.choice(["A", "B", "C"], n)
        frame["region"] = rng.choice(["North East", "South", 'Isle "of" Man'], n)
    numbers = ["x1", "x2", "x3"] + (["n"] if extra else [])
    strings = ["color"] + (["grade", "region"] if extra else [])
    for col in numbers:
        frame.loc[rng.random(n) < 0.05, col] = None
    for col in strings:
        frame.loc[rng.random(n) < 0.05, col] = None
        frame.loc[rng.random(n) < 0.04, col] = "purple"
    for col in numbers:
        frame[col] = frame[col].astype(float)
    return frame


def write_sklearn(estimator, target: str, path: Path, *, categorical: bool = True,
                  impute: bool = True) -> Path:
    """Fit ``estimator`` behind encoders (and imputers) and write it with sklearn2pmml."""
    import sklearn.base
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder
    from sklearn2pmml import sklearn2pmml
    from sklearn2pmml.pipeline import PMMLPipeline

    df = training_frame()
    numeric = ["x1", "x2", "x3"]
    parts = [("num", SimpleImputer(strategy="mean") if impute else "passthrough", numeric)]
    if categorical:
        encoder = OneHotEncoder(handle_unknown="ignore")
        steps = make_pipeline(SimpleImputer(strategy="most_frequent"), encoder) if impute \
            else encoder
        parts.append(("cat", steps, ["color"]))
    columns = numeric + (["color"] if categorical else [])
    pipeline = PMMLPipeline([("prep", ColumnTransformer(parts)), ("model", estimator)])
    pipeline.fit(df[columns], df[target])
    # The bundled converter names the scikit-learn releases it knows; ours may be newer.
    known, sklearn.base.__version__ = sklearn.base.__version__, "1.9.0"
    try:
        sklearn2pmml(pipeline, str(path))
    finally:
        sklearn.base.__version__ = known
    return path
