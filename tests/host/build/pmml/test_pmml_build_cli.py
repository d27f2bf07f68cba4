"""The README's command on PMML as producers write it: `edgepack build model.pmml --target rpi4
--sample-input sample.npz` (and without data, and with CSV) builds a float bundle whose golden
outputs JPMML-Evaluator reproduces on the same rows; unsupported documents fail cleanly."""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgepack.host.cli.main import main

from .oracle import CORPUS, golden_agreement, needs_java
from .producers import scoring_frame, write_sklearn

DOCUMENTS = sorted(p.name for p in CORPUS.glob("*.pmml"))
BUNDLE = Path("dist/model-1.0.0-rpi4.edgepack")
# A tree ensemble with string class labels, a regression (the neural network once gated as a
# classifier), categorical inputs behind a TransformationDictionary.
FOREST, REGRESSION, TRANSFORMED = ("r_randomforest_vote.pmml", "r_nnet_regression.pmml",
                                   "knime_svm_one_against_all.pmml")


def _rows(n: int = 40):
    """Scoring rows with the missing values and unseen categories first (golden keeps 8)."""
    frame = scoring_frame(n, seed=3, extra=True)
    odd = frame.isna().any(axis=1) | frame.isin(["purple"]).any(axis=1)
    return frame.loc[odd.sort_values(ascending=False, kind="stable").index].reset_index(drop=True)


def _sample_npz(path: Path, frame) -> Path:
    arrays = {}
    import pandas as pd

    for col in frame.columns:
        if pd.api.types.is_numeric_dtype(frame[col]):
            arrays[col] = frame[col].to_numpy(np.float64)
        else:
            arrays[col] = np.array(["" if pd.isna(v) else str(v) for v in frame[col]], dtype=str)
    np.savez(path, **arrays)
    return path


def _readme_build(tmp_path: Path, monkeypatch, document: str, *extra: str):
    shutil.copy(CORPUS / document, tmp_path / "model.pmml")
    monkeypatch.chdir(tmp_path)
    return CliRunner().invoke(main, ["build", "model.pmml", "--target", "rpi4", *extra])


def _member(bundle: Path, name: str):
    with zipfile.ZipFile(bundle) as z:
        data = z.read(name)
    return json.loads(data) if name.endswith(".json") else np.load(io.BytesIO(data))


@needs_java
@pytest.mark.parametrize("document", DOCUMENTS)
def test_readme_command_builds_and_matches_jpmml(document, tmp_path, monkeypatch):
    _sample_npz(tmp_path / "sample.npz", _rows())

    result = _readme_build(tmp_path, monkeypatch, document, "--sample-input", "sample.npz")

    assert result.exit_code == 0, result.output
    manifest = _member(BUNDLE, "manifest.json")
    assert manifest["optimization"]["mode"] == "none"
    golden = _member(BUNDLE, "golden.npz")
    assert all(golden[k].dtype.kind != "O" for k in golden.files)
    agreement = golden_agreement(CORPUS / document, BUNDLE)
    assert agreement.rows == 8 and agreement.agreed == 8, agreement.mismatches
    report = _member(BUNDLE, "report.json")
    assert report["metrics"]["accuracy"]["source"] == "sample input sample.npz (no eval data given)"
    assert report["model"]["pmml"]["features"] and report["model"]["pmml"]["producer"]


@needs_java
def test_string_labels_and_string_inputs_in_the_bundle(tmp_path, monkeypatch):
    _sample_npz(tmp_path / "sample.npz", _rows())

    assert _readme_build(tmp_path, monkeypatch, FOREST, "--sample-input",
                         "sample.npz").exit_code == 0

    m = _member(BUNDLE, "manifest.json")["model"]
    assert {s["name"]: s["dtype"] for s in m["inputs"]}["color"] == "string"
    assert [(s["name"], s["dtype"]) for s in m["outputs"]] == [("label", "string"),
                                                               ("probabilities", "float64")]
    golden = _member(BUNDLE, "golden.npz")
    assert golden["output_0"].dtype.kind == "U"
    assert set(golden["output_0"].ravel()) <= {"high", "mid", "low", ""}
    report = _member(BUNDLE, "report.json")
    pmml = report["model"]["pmml"]
    assert pmml["producer"] == "SoftwareAG PMML Generator 2.5.2" and pmml["classes"] == [
        "high", "low", "mid"]
    assert "MiningModel/majorityVote" in pmml["features"]
    assert any("PMML models stay float" in n for n in report["model"]["import_notes"])
    assert report["optimization"]["calibration_samples"] == 0


@needs_java
def test_regression_is_gated_by_relative_error_not_top1(tmp_path, monkeypatch):
    _sample_npz(tmp_path / "sample.npz", _rows())

    assert _readme_build(tmp_path, monkeypatch, REGRESSION, "--sample-input",
                         "sample.npz").exit_code == 0

    acc = _member(BUNDLE, "report.json")["metrics"]["accuracy"]
    assert acc["top1_agreement"] is None and acc["max_rel_error"] == 0.0
    assert acc["basis"] == "relative error and cosine similarity with fp32"
    assert acc["drop_points"] == 0.0


@needs_java
def test_plain_command_without_data_synthesizes_rows(tmp_path, monkeypatch):
    result = _readme_build(tmp_path, monkeypatch, TRANSFORMED)

    assert result.exit_code == 0, result.output
    assert "synthesized from the PMML DataDictionary" in " ".join(result.output.split())
    report = _member(BUNDLE, "report.json")
    assert "rows synthesized from the PMML DataDictionary" in \
        report["metrics"]["accuracy"]["source"]
    assert any("synthesized" in w for w in report["warnings"])
    colors = _member(BUNDLE, "golden.npz")["input_2"].ravel()
    assert set(colors) == {"red", "green", "blue"}  # the declared values, in turn
    assert golden_agreement(CORPUS / TRANSFORMED, BUNDLE).ratio == 1.0


@needs_java
def test_csv_sample_input_and_eval(tmp_path, monkeypatch):
    frame = _rows()
    frame["cls"] = "mid"  # the target column: expected labels for the gate
    csv = tmp_path / "data.csv"
    frame.to_csv(csv, index=False, na_rep="")
    cells = [c for line in csv.read_text().splitlines()[1:] for c in line.split(",")]
    assert "" in cells  # empty cells are the missing values

    result = _readme_build(tmp_path, monkeypatch, FOREST, "--sample-input", "data.csv",
                           "--eval", "data.csv")

    assert result.exit_code == 0, result.output
    report = _member(BUNDLE, "report.json")
    assert report["metrics"]["accuracy"]["source"] == "eval data data.csv"
    acc = report["metrics"]["accuracy"]
    assert acc["basis"] == "accuracy vs labels" and 0 < acc["accuracy_fp32"] < 1
    assert acc["drop_points"] == 0.0
    assert golden_agreement(CORPUS / FOREST, BUNDLE).ratio == 1.0


@needs_java
@pytest.mark.slow
def test_readme_command_on_an_sklearn2pmml_document(tmp_path, monkeypatch):
    from sklearn.ensemble import GradientBoostingClassifier

    write_sklearn(GradientBoostingClassifier(n_estimators=10, max_depth=2, random_state=0),
                  "cls", tmp_path / "model.pmml")
    _rows().to_csv(tmp_path / "sample.csv", index=False, na_rep="")
    monkeypatch.chdir(tmp_path)

    result = CliRunner().invoke(main, ["build", "model.pmml", "--target", "rpi4",
                                       "--sample-input", "sample.csv"])

    assert result.exit_code == 0, result.output
    assert golden_agreement(tmp_path / "model.pmml", BUNDLE).ratio == 1.0
    assert "SkLearn2PMML" in _member(BUNDLE, "report.json")["model"]["pmml"]["producer"]


def test_csv_with_a_bad_cell_names_line_and_column(tmp_path, monkeypatch):
    (tmp_path / "data.csv").write_text("x1,x2,x3,color\n1,2,3,red\n1,two,3,blue\n")

    result = _readme_build(tmp_path, monkeypatch, FOREST, "--eval", "data.csv", "-q")

    assert result.exit_code == 1 and "line 3, column 'x2'" in result.output, result.output
    assert "Traceback" not in result.output and not Path("dist").exists()


def test_fp16_is_refused_for_pmml(tmp_path, monkeypatch):
    result = _readme_build(tmp_path, monkeypatch, FOREST, "--quantize", "fp16")

    assert result.exit_code == 1 and "PMML models stay float64" in result.output
    assert "--quantize" in result.output


def test_unsupported_document_names_element_and_line(tmp_path, monkeypatch):
    text = (CORPUS / FOREST).read_text()
    head, tail = text.split("<MiningModel", 1)
    doc = tmp_path / "src.pmml"
    doc.write_text(head + '<ClusteringModel functionName="clustering" modelClass="centerBased" '
                   'numberOfClusters="1"><MiningSchema/></ClusteringModel>\n</PMML>\n')
    line = head.count("\n") + 1
    shutil.copy(doc, tmp_path / "model.pmml")
    monkeypatch.chdir(tmp_path)

    result = CliRunner().invoke(main, ["build", "model.pmml", "--target", "rpi4", "-q"])

    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert f"PMML <ClusteringModel> at line {line}" in result.output, result.output
    assert "Traceback" not in result.output
    assert not Path("dist").exists() or not list(Path("dist").iterdir())
    assert tail  # the model element was replaced, not appended
