"""scikit-learn estimators from joblib and pickle files, through skl2onnx."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import onnx
import pytest
from importer_models import Digits, SklModels, run_onnx

from edgepack.agent.errors import DataError, ModelError
from edgepack.host.build.importers import import_model

FLOAT_ONLY = {"mlp": False, "logreg": True, "forest": True}


@pytest.mark.parametrize("with_sample", [False, True], ids=["n_features_in_", "sample-input"])
@pytest.mark.parametrize("serialization", ["joblib", "pickle"])
@pytest.mark.parametrize("name", ["mlp", "logreg", "forest"])
def test_classifier_gives_int64_label_and_float_probabilities(
        name: str, serialization: str, with_sample: bool, skl_models: SklModels,
        digits: Digits, tmp_path: Path) -> None:
    src = skl_models.files[name, serialization]
    sample = str(skl_models.sample) if with_sample else None

    imp = import_model(src, workdir=tmp_path, sample_input=sample)

    assert imp.kind == "sklearn" and imp.source == src
    assert imp.saved_model_dir is None and imp.tflite_bytes is None
    model = onnx.load(str(imp.onnx_path))
    assert model.graph.input[0].name == ("pixels" if with_sample else "input")
    assert {o.domain or "": o.version for o in model.opset_import}[""] <= 17
    x = digits.flat_test
    outs = run_onnx(imp.onnx_path, x)
    est = skl_models.estimators[name]
    assert list(outs) == ["label", "probabilities"]
    assert outs["label"].dtype == np.int64
    assert outs["probabilities"].dtype == np.float32 and outs["probabilities"].shape == (len(x), 10)
    np.testing.assert_allclose(outs["probabilities"], est.predict_proba(x), atol=1e-4)
    assert np.mean(outs["label"] == est.predict(x)) > 0.99
    assert any("zipmap off, so probabilities are a float tensor" in n for n in imp.notes)
    assert any("only import pickle/joblib files you trust" in n for n in imp.notes)
    assert imp.float_only is FLOAT_ONLY[name]


def test_forest_is_kept_float_and_says_why(skl_models: SklModels, tmp_path: Path) -> None:
    imp = import_model(skl_models.files["forest", "joblib"], workdir=tmp_path)

    assert imp.float_only
    assert ("RandomForestClassifier: tree ensemble (ONNX TreeEnsembleClassifier), kept float32 "
            "(no int8 kernels for tree ensembles)") in imp.notes


def test_mlp_has_int8_kernels(skl_models: SklModels, tmp_path: Path) -> None:
    imp = import_model(skl_models.files["mlp", "joblib"], workdir=tmp_path)

    assert not imp.float_only
    assert not any("kept float32" in n for n in imp.notes)


def test_float64_sample_gives_float32_input(skl_models: SklModels, tmp_path: Path) -> None:
    imp = import_model(skl_models.files["mlp", "joblib"], workdir=tmp_path,
                       sample_input=str(skl_models.sample))

    elem = onnx.load(str(imp.onnx_path)).graph.input[0].type.tensor_type.elem_type
    assert elem == onnx.TensorProto.FLOAT
    assert any("the sample is float64" in n for n in imp.notes)


def test_integer_sample_gives_int64_input(skl_models: SklModels, digits: Digits,
                                          tmp_path: Path) -> None:
    import joblib
    from sklearn.linear_model import LogisticRegression

    counts = (digits.flat_train * 16).astype(np.int32)  # the raw 0..16 pixel counts
    joblib.dump(LogisticRegression(max_iter=300).fit(counts, digits.y_train),
                tmp_path / "ints.joblib")
    np.savez(tmp_path / "ints.npz", counts[:10])

    imp = import_model(tmp_path / "ints.joblib", workdir=tmp_path / "w",
                       sample_input=str(tmp_path / "ints.npz"))

    model = onnx.load(str(imp.onnx_path))
    assert model.graph.input[0].name == "input"  # np.savez's arr_0 is no name to keep
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    outs = run_onnx(imp.onnx_path, (digits.flat_test * 16).astype(np.int64))
    assert outs["label"].dtype == np.int64


def test_sample_with_wrong_feature_count(skl_models: SklModels, tmp_path: Path) -> None:
    np.savez(tmp_path / "s.npz", x=np.zeros((4, 10), np.float32))
    with pytest.raises(DataError, match="has 10 features per sample, but MLPClassifier was "
                                        "fitted on 64"):
        import_model(skl_models.files["mlp", "joblib"], workdir=tmp_path / "w",
                     sample_input=str(tmp_path / "s.npz"))


def test_sample_with_two_arrays(skl_models: SklModels, tmp_path: Path) -> None:
    np.savez(tmp_path / "s.npz", a=np.zeros((4, 64)), b=np.zeros((4, 64)))
    with pytest.raises(DataError, match=r"holds 2 arrays \(a, b\); give exactly one"):
        import_model(skl_models.files["mlp", "joblib"], workdir=tmp_path / "w",
                     sample_input=str(tmp_path / "s.npz"))


def test_sample_that_is_not_npz(skl_models: SklModels, tmp_path: Path) -> None:
    (tmp_path / "s.npz").write_text("nope")
    with pytest.raises(DataError, match="not a readable .npz file"):
        import_model(skl_models.files["mlp", "joblib"], workdir=tmp_path / "w",
                     sample_input=str(tmp_path / "s.npz"))


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_pipeline_is_named_by_its_steps(digits: Digits, tmp_path: Path) -> None:
    import joblib
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pipe = make_pipeline(StandardScaler(), MLPClassifier((16,), max_iter=300, random_state=0))
    joblib.dump(pipe.fit(digits.flat_train[:400], digits.y_train[:400]), tmp_path / "p.joblib")

    imp = import_model(tmp_path / "p.joblib", workdir=tmp_path / "w")

    assert any(n.startswith("Pipeline(StandardScaler → MLPClassifier) → skl2onnx") for n in imp.notes)
    outs = run_onnx(imp.onnx_path, digits.flat_test[:50])
    np.testing.assert_allclose(outs["probabilities"], pipe.predict_proba(digits.flat_test[:50]),
                               atol=1e-4)


def test_regressor(digits: Digits, tmp_path: Path) -> None:
    import joblib
    from sklearn.ensemble import GradientBoostingRegressor

    reg = GradientBoostingRegressor(n_estimators=10, max_depth=3, random_state=0)
    joblib.dump(reg.fit(digits.flat_train, digits.y_train.astype(float)), tmp_path / "r.joblib")

    imp = import_model(tmp_path / "r.joblib", workdir=tmp_path / "w")

    (pred,) = run_onnx(imp.onnx_path, digits.flat_test).values()
    np.testing.assert_allclose(pred.ravel(), reg.predict(digits.flat_test), atol=1e-4)
    assert imp.float_only
    assert any(n.startswith("GradientBoostingRegressor: tree ensemble") for n in imp.notes)


# --- errors -----------------------------------------------------------------------------------

def test_unsupported_estimator_names_it(digits: Digits, tmp_path: Path) -> None:
    import joblib
    from sklearn.semi_supervised import LabelSpreading

    joblib.dump(LabelSpreading().fit(digits.flat_train[:200], digits.y_train[:200]),
                tmp_path / "ls.joblib")
    with pytest.raises(ModelError, match=r"skl2onnx has no converter for LabelSpreading") as err:
        import_model(tmp_path / "ls.joblib", workdir=tmp_path / "w")
    assert "supported_converters()" in str(err.value)
    assert "onnx.ai/sklearn-onnx/supported.html" in str(err.value)


def test_unfitted_estimator(tmp_path: Path) -> None:
    import joblib
    from sklearn.linear_model import LogisticRegression

    joblib.dump(LogisticRegression(), tmp_path / "u.joblib")
    with pytest.raises(ModelError, match="LogisticRegression in u.joblib is not fitted"):
        import_model(tmp_path / "u.joblib", workdir=tmp_path / "w")


def test_pickle_of_something_else(tmp_path: Path) -> None:
    (tmp_path / "d.pkl").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(ModelError, match="holds a builtins.dict, not a scikit-learn estimator"):
        import_model(tmp_path / "d.pkl", workdir=tmp_path / "w")


@pytest.mark.parametrize("suffix", [".joblib", ".pkl", ".pickle"])
def test_random_bytes_pickle(suffix: str, tmp_path: Path) -> None:
    (tmp_path / f"m{suffix}").write_bytes(np.random.default_rng(3).bytes(2048))
    with pytest.raises(ModelError, match="is not a readable pickle or joblib file"):
        import_model(tmp_path / f"m{suffix}", workdir=tmp_path / "w")


def test_pickle_needing_a_missing_module(tmp_path: Path) -> None:
    # A pickle that refers to a class in a module that is not installed.
    data = b"\x80\x04\x95\x1c\x00\x00\x00\x00\x00\x00\x00\x8c\x0cnot_a_module\x94\x8c\x03Cls\x94\x93\x94."
    (tmp_path / "m.pkl").write_bytes(data)
    with pytest.raises(ModelError, match="pickled with code that is not installed here"):
        import_model(tmp_path / "m.pkl", workdir=tmp_path / "w")
