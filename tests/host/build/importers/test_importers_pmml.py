"""PMML documents (written by the tests) through sklearn-pmml-model and skl2onnx."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from importer_models import Digits, PmmlModels, run_onnx
from pmml_files import write_clustering_pmml, write_forest_pmml

from edgepack.agent.errors import ModelError
from edgepack.host.build.importers import detect_kind, import_model


def test_logistic_regression_pmml(pmml_models: PmmlModels, digits: Digits,
                                  tmp_path: Path) -> None:
    imp = import_model(pmml_models.logreg, workdir=tmp_path)

    assert imp.kind == "pmml" and imp.source == pmml_models.logreg
    x = digits.flat_test
    outs = run_onnx(imp.onnx_path, x)
    assert outs["label"].dtype == np.int64
    assert outs["probabilities"].dtype == np.float32
    np.testing.assert_allclose(outs["probabilities"], pmml_models.logreg_ref.predict_proba(x),
                               atol=1e-4)
    assert np.mean(outs["label"] == pmml_models.logreg_ref.predict(x)) > 0.99
    assert any(n.startswith("PMML <RegressionModel> as LogisticRegression") for n in imp.notes)


def test_decision_tree_pmml_is_float_only(pmml_models: PmmlModels, digits: Digits,
                                          tmp_path: Path) -> None:
    imp = import_model(pmml_models.tree, workdir=tmp_path)

    x = digits.flat_test
    outs = run_onnx(imp.onnx_path, x)
    np.testing.assert_array_equal(outs["label"], pmml_models.tree_ref.predict(x))
    np.testing.assert_allclose(outs["probabilities"], pmml_models.tree_ref.predict_proba(x),
                               atol=1e-5)
    assert imp.float_only
    assert any("tree ensemble" in n and "kept float32" in n for n in imp.notes)


def test_random_forest_pmml(digits: Digits, tmp_path: Path) -> None:
    from sklearn.ensemble import RandomForestClassifier

    forest = RandomForestClassifier(4, max_depth=5, random_state=0)
    forest.fit(digits.flat_train, digits.y_train)

    imp = import_model(write_forest_pmml(tmp_path / "rf.pmml", forest), workdir=tmp_path / "w")

    x = digits.flat_test
    outs = run_onnx(imp.onnx_path, x)
    np.testing.assert_allclose(outs["probabilities"], forest.predict_proba(x), atol=1e-5)
    assert imp.float_only
    assert any(n.startswith("PMML <MiningModel> as RandomForestClassifier") for n in imp.notes)


def test_pmml_with_sample_input(pmml_models: PmmlModels, digits: Digits,
                                tmp_path: Path) -> None:
    np.savez(tmp_path / "s.npz", pixels=digits.flat_test[:8])

    imp = import_model(pmml_models.logreg, workdir=tmp_path / "w",
                       sample_input=str(tmp_path / "s.npz"))

    assert onnx.load(str(imp.onnx_path)).graph.input[0].name == "pixels"


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
    with pytest.raises(ModelError, match=r"PMML <ClusteringModel> in c.pmml is not supported") \
            as err:
        import_model(write_clustering_pmml(tmp_path / "c.pmml"), workdir=tmp_path / "w")
    for supported in ("RegressionModel", "TreeModel", "NeuralNetwork", "MiningModel"):
        assert supported in str(err.value)


def test_categorical_pmml_inputs(pmml_models: PmmlModels, tmp_path: Path) -> None:
    text = pmml_models.logreg.read_text().replace(
        '<DataField name="x3" optype="continuous" dataType="double"/>',
        '<DataField name="x3" optype="categorical" dataType="string">'
        '<Value value="a"/><Value value="b"/></DataField>')
    (tmp_path / "cat.pmml").write_text(text)
    with pytest.raises(ModelError, match="PMML input field.s. x3 in cat.pmml are categorical"):
        import_model(tmp_path / "cat.pmml", workdir=tmp_path / "w")


def test_random_bytes_pmml(tmp_path: Path) -> None:
    (tmp_path / "m.pmml").write_bytes(np.random.default_rng(4).bytes(2048))
    with pytest.raises(ModelError, match="is not well-formed XML .* so not a PMML document"):
        import_model(tmp_path / "m.pmml", workdir=tmp_path / "w")


def test_truncated_pmml(pmml_models: PmmlModels, tmp_path: Path) -> None:
    data = pmml_models.tree.read_bytes()
    (tmp_path / "t.pmml").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="is not well-formed XML"):
        import_model(tmp_path / "t.pmml", workdir=tmp_path / "w")
