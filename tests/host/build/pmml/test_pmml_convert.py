"""convert_pmml without the reference evaluator: the typed description, inputs and outputs, and
errors that name the element and line of what is not supported."""

from __future__ import annotations

import numpy as np
import pytest

from edgepack.agent.errors import ModelError
from edgepack.host.build.pmml import PmmlModel, convert_pmml

from .oracle import CORPUS

HEAD = """<?xml version="1.0"?>
<PMML xmlns="http://www.dmg.org/PMML-4_{minor}" version="4.{minor}">
  <Header><Extension name="x" value="y"/></Header>
  <DataDictionary>
    <DataField name="x" optype="continuous" dataType="double"/>
    <DataField name="c" optype="categorical" dataType="string"><Value value="a"/><Value value="b"/></DataField>
    <DataField name="y" optype="continuous" dataType="double"/>
  </DataDictionary>
"""
SCHEMA = """<MiningSchema><MiningField name="y" usageType="target"/><MiningField name="x"/>
      <MiningField name="c" invalidValueTreatment="asIs"/></MiningSchema>"""


def _write(tmp_path, body: str, minor: int = 4):
    path = tmp_path / "model.pmml"
    path.write_text(HEAD.format(minor=minor) + body + "\n</PMML>\n")
    return path


def _run(res: PmmlModel, feed: dict) -> dict:
    import onnxruntime as ort

    session = ort.InferenceSession(res.onnx.SerializeToString())
    names = [o.name for o in res.outputs]
    return dict(zip(names, session.run(names, feed), strict=True))


def test_classification_description_and_string_labels():
    res = convert_pmml(CORPUS / "r_rpart_surrogate.pmml")
    assert res.task == "classification"
    assert res.classes == ("high", "low", "mid")
    assert [(i.name, i.optype, i.dtype) for i in res.inputs] == [
        ("x1", "continuous", "float64"), ("x2", "continuous", "float64"),
        ("x3", "continuous", "float64"), ("color", "categorical", "string")]
    assert res.inputs[3].values == ("blue", "green", "red")
    assert [(o.name, o.dtype) for o in res.outputs] == [("label", "string"),
                                                       ("probabilities", "float64")]
    assert list(res.features) == sorted(res.features)
    assert {"TreeModel", "CompoundPredicate/surrogate", "SimpleSetPredicate/isIn"} <= set(
        res.features)
    feed = {"x1": np.array([[-1.0], [np.nan]]), "x2": np.array([[0.0], [0.0]]),
            "x3": np.array([[3.0], [np.nan]]), "color": np.array([["blue"], [""]], object)}
    out = _run(res, feed)
    assert out["label"].dtype == object and out["label"][0] == "low"
    assert out["probabilities"].shape == (2, 3)
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0)


def test_integer_target_labels_are_int64():
    res = convert_pmml(CORPUS / "sas_logit_transformations.pmml")
    assert res.classes == ("1", "0")
    assert res.outputs[0].dtype == "int64"


def test_regression_output_is_float64(tmp_path):
    path = _write(tmp_path, f"""<RegressionModel functionName="regression">{SCHEMA}
      <RegressionTable intercept="1"><NumericPredictor name="x" coefficient="2"/>
      <CategoricalPredictor name="c" value="b" coefficient="10"/></RegressionTable>
      </RegressionModel>""", minor=1)
    res = convert_pmml(path)
    assert res.task == "regression" and res.classes == ()
    out = _run(res, {"x": np.array([[1.0], [np.nan], [2.0]]),
                     "c": np.array([["b"], ["a"], ["zzz"]], object)})
    assert out["predicted"].dtype == np.float64
    np.testing.assert_allclose(out["predicted"], [13.0, np.nan, 5.0])


UNSUPPORTED = {
    "RuleSetModel": ("""<RuleSetModel functionName="classification">{schema}
        <RuleSet/></RuleSetModel>""", "RuleSetModel"),
    "weightedConfidence": ("""<TreeModel functionName="regression"
        missingValueStrategy="weightedConfidence">{schema}
        <Node score="1"><True/></Node></TreeModel>""", "TreeModel"),
    "Aggregate": ("""<RegressionModel functionName="regression">{schema}
        <LocalTransformations><DerivedField name="s" optype="continuous" dataType="double">
        <Aggregate field="x" function="sum"/></DerivedField></LocalTransformations>
        <RegressionTable intercept="0"/></RegressionModel>""", "Aggregate"),
    "function": ("""<RegressionModel functionName="regression">{schema}
        <LocalTransformations><DerivedField name="s" optype="continuous" dataType="double">
        <Apply function="x-custom"><FieldRef field="x"/></Apply></DerivedField>
        </LocalTransformations><RegressionTable intercept="0"/></RegressionModel>""", "Apply"),
    "clustering": ("""<ClusteringModel functionName="clustering" modelClass="centerBased"
        numberOfClusters="1">{schema}</ClusteringModel>""", "ClusteringModel"),
    "radialBasis": ("""<NeuralNetwork functionName="regression" activationFunction="radialBasis">
        {schema}<NeuralInputs><NeuralInput id="0"><DerivedField optype="continuous"
        dataType="double"><FieldRef field="x"/></DerivedField></NeuralInput></NeuralInputs>
        <NeuralLayer><Neuron id="1"><Con from="0" weight="1"/></Neuron></NeuralLayer>
        </NeuralNetwork>""", "NeuralLayer"),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_unsupported_construct_names_element_and_line(tmp_path, case):
    body, element = UNSUPPORTED[case]
    path = _write(tmp_path, body.format(schema=SCHEMA))
    with pytest.raises(ModelError) as err:
        convert_pmml(path)
    assert f"<{element}>" in err.value.message
    assert err.value.context["element"] == element
    line = err.value.context["line"]
    assert f"line {line}" in err.value.message
    # the line where the start tag ends (a start tag may span lines)
    lines = path.read_text().splitlines()
    assert any(element in text for text in lines[max(0, line - 3):line])


def test_not_pmml_and_broken_xml(tmp_path):
    bad = tmp_path / "bad.pmml"
    bad.write_text("<PMML><DataDictionary>")
    with pytest.raises(ModelError, match="not a readable PMML document"):
        convert_pmml(bad)
    other = tmp_path / "other.xml"
    other.write_text("<svg/>")
    with pytest.raises(ModelError, match="not <PMML>"):
        convert_pmml(other)
    empty = tmp_path / "empty.pmml"
    empty.write_text(HEAD.format(minor=3) + "</PMML>")
    with pytest.raises(ModelError, match="holds no model"):
        convert_pmml(empty)
