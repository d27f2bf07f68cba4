"""PMML documents (written by the tests) through edgepack's PMML converter: one ONNX input per
PMML field, float64 arithmetic, kept float."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from importer_models import Digits, PmmlModels
from pmml_files import write_clustering_pmml, write_forest_pmml

from edgepack.agent.errors import ModelError
from edgepack.host.build.importers import detect_kind, import_model


def run_onnx(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    """All outputs of a converted PMML model fed column ``i`` of ``x`` as field ``x{i}``."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {f"x{i}": x[:, i:i + 1].astype(np.float64) for i in range(x.shape[1])}
    outs = sess.run(None, feed)
    return {o.name: v for o, v in zip(sess.get_outputs(), outs, strict=True)}


def test_logistic_regression_pmml(pmml_models: PmmlModels, digits: Digits,
                                  tmp_path: Path) -> None:
    imp = import_model(pmml_models.logreg, workdir=tmp_path)

    assert imp.kind == "pmml" and imp.source == pmml_models.logreg
    x = digits.flat_test
    outs = run_onnx(imp.onnx_path, x)
    assert outs["label"].dtype == np.int64
    assert outs["probabilities"].dtype == np.float64  # the PMML arithmetic, not float32
    np.testing.assert_allclose(outs["probabilities"], pmml_models.logreg_ref.predict_proba(x),
                               atol=1e-4)
    assert np.mean(outs["label"] == pmml_models.logreg_ref.predict(x)) > 0.99
    assert any(n.startswith("PMML 4.4 <RegressionModel> (classification)") for n in imp.notes)


def test_decision_tree_pmml_is_float_only(pmml_models: PmmlModels, digits: Digits,
                                          tmp_path: Path) -> None:
    imp = import_model(pmml_models.tree, workdir=tmp_path)

    x = digits.flat_test
    outs = run_onnx(imp.onnx_path, x)
    np.testing.assert_array_equal(outs["label"], pmml_models.tree_ref.predict(x))
    np.testing.assert_allclose(outs["probabilities"], pmml_models.tree_ref.predict_proba(x),
                               atol=1e-5)
    assert imp.float_only
    assert any("PMML models stay float" in n and "no int8" in n for n in imp.notes)


def test_random_forest_pmml(digits: Digits, tmp_path: Path) -> None:
    from sklearn.ensemble import RandomForestClassifier

    forest = RandomForestClassifier(4, max_depth=5, random_state=0)
    forest.fit(digits.flat_train, digits.y_train)

    imp = import_model(write_forest_pmml(tmp_path / "rf.pmml", forest), workdir=tmp_path / "w")

    x = digits.flat_test
    outs = run_onnx(imp.onnx_path, x)
    np.testing.assert_allclose(outs["probabilities"], forest.predict_proba(x), atol=1e-5)
    assert imp.float_only
    assert any(n.startswith("PMML 4.4 <MiningModel> (classification)") for n in imp.notes)


def test_pmml_inputs_are_the_fields_whatever_the_sample(pmml_models: PmmlModels,
                                                        digits: Digits, tmp_path: Path) -> None:
    np.savez(tmp_path / "s.npz", pixels=digits.flat_test[:8])

    imp = import_model(pmml_models.logreg, workdir=tmp_path / "w",
                       sample_input=str(tmp_path / "s.npz"))

    inputs = onnx.load(str(imp.onnx_path)).graph.input
    assert [i.name for i in inputs] == [f"x{i}" for i in range(64)]
    assert imp.domain.missing_ok and len(imp.domain.synthesized) == 8


def test_pmml_in_an_xml_file(pmml_models: PmmlModels, tmp_path: Path) -> None:
    xml = tmp_path / "model.xml"
    xml.write_bytes(pmml_models.logreg.read_bytes())

    assert detect_kind(xml) == "pmml"
    assert import_model(xml, workdir=tmp_path / "w").kind == "pmml"


def test_xml_that_is_not_pmml(tmp_path: Path) -> None:
    (tmp_path / "model.xml").write_text("<config><a/></config>")
    with pytest.raises(ModelError, match="is XML but not a PMML document"):
        import_model(tmp_path / "model.xml", workdir=tmp_path / "w")


def test_unsupported_pmml_model_element(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"PMML <ClusteringModel> at line \d+: <ClusteringModel> "
                       "is not supported") as err:
        import_model(write_clustering_pmml(tmp_path / "c.pmml"), workdir=tmp_path / "w")
    for supported in ("regression", "tree", "neural network", "ensemble"):
        assert supported in str(err.value)


def test_categorical_pmml_inputs(pmml_models: PmmlModels, tmp_path: Path) -> None:
    text = pmml_models.logreg.read_text().replace(
        '<DataField name="x3" optype="continuous" dataType="double"/>',
        '<DataField name="x3" optype="categorical" dataType="string">'
        '<Value value="a"/><Value value="b"/></DataField>')
    (tmp_path / "cat.pmml").write_text(text)

    imp = import_model(tmp_path / "cat.pmml", workdir=tmp_path / "w")

    x3 = next(i for i in onnx.load(str(imp.onnx_path)).graph.input if i.name == "x3")
    assert x3.type.tensor_type.elem_type == onnx.TensorProto.STRING
    assert imp.details["pmml"]["inputs"][3] == {"name": "x3", "optype": "categorical",
                                                "dtype": "string"}
    assert list(imp.domain.synthesized.inputs["x3"].ravel()[:2]) == ["a", "b"]


def test_random_bytes_pmml(tmp_path: Path) -> None:
    (tmp_path / "m.pmml").write_bytes(np.random.default_rng(4).bytes(2048))
    with pytest.raises(ModelError, match="not a readable PMML document .* complete XML"):
        import_model(tmp_path / "m.pmml", workdir=tmp_path / "w")


def test_truncated_pmml(pmml_models: PmmlModels, tmp_path: Path) -> None:
    data = pmml_models.tree.read_bytes()
    (tmp_path / "t.pmml").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="not a readable PMML document"):
        import_model(tmp_path / "t.pmml", workdir=tmp_path / "w")
