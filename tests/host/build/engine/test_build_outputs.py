"""Portable outputs: a bundle's outputs are tensors every runtime reads, unless asked otherwise.

scikit-learn classifiers ship labels and probabilities as plain tensors (no ZipMap), the agent's
health gate compares both and its inference API serves them; an ONNX model whose outputs are
sequences of maps is refused with what to do, and ships as it is with
``allow_non_tensor_outputs=True``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import joblib
import numpy as np
import pytest
from build_models import digits_flat

from edgepack.agent.bundle import read_bundle
from edgepack.agent.errors import ModelError
from edgepack.agent.health import HealthOptions, run_health_check
from edgepack.agent.inference import Model
from edgepack.host.build import build


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression

    d = tmp_path_factory.mktemp("classifiers")
    x_tr, x_te, y_tr, _ = digits_flat()
    np.savez(d / "sample.npz", x=x_te[:40])
    out = {"sample": d / "sample.npz"}
    for name, est in {"logreg": LogisticRegression(max_iter=300),
                      "forest": RandomForestClassifier(8, max_depth=6, random_state=0)}.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est.fit(x_tr, y_tr)
        out[name] = d / f"{name}.joblib"
        joblib.dump(est, out[name])
    return out


@pytest.mark.parametrize("name", ["logreg", "forest"])
def test_sklearn_classifier_ships_labels_and_probabilities_as_tensors(classifiers, tmp_path,
                                                                      name):
    res = build(model=str(classifiers[name]), target="rpi4", quantize="none",
                sample_input=str(classifiers["sample"]), out=str(tmp_path), variants=False)

    outputs = res.manifest["model"]["outputs"]
    assert [o["dtype"] for o in outputs] == ["int64", "float32"], outputs
    assert outputs[1]["shape"][-1] == 10
    assert res.report.metrics["accuracy"].get("not_compared", {}) == {}
    slot = tmp_path / "slot"
    read_bundle(res.path).extract(slot)
    health = run_health_check(slot, HealthOptions(runs=5))  # in a child, as the agent does
    assert health.passed, health.failures
    assert len(health.outputs) == 2  # both outputs compared with the golden values
    got = Model.open(res.path).predict(np.load(classifiers["sample"])["x"][:1])  # batch 1
    label, proba = (got[o["name"]] for o in outputs)
    assert label.shape == (1,) and proba.shape == (1, 10)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-4)


def test_zipmap_outputs_are_refused_with_what_to_do(logreg, tmp_path):
    with pytest.raises(ModelError) as err:
        build(model=str(logreg.model), target="rpi4", quantize="none", eval=str(logreg.eval),
              out=str(tmp_path / "dist"), variants=False)

    assert "'output_probability' (sequence)" in str(err.value)
    assert "options={'zipmap': False}" in str(err.value)
    assert "`allow_non_tensor_outputs=`" in str(err.value)
    assert err.value.context["field"] == "allow_non_tensor_outputs"
    assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").iterdir())


def test_zipmap_outputs_ship_when_asked(logreg, tmp_path):
    res = build(model=str(logreg.model), target="rpi4", quantize="none", eval=str(logreg.eval),
                out=str(tmp_path), variants=False, allow_non_tensor_outputs=True)

    assert [o["dtype"] for o in res.manifest["model"]["outputs"]] == ["int64", "sequence"]
