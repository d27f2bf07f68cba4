"""Session fixtures for the importer tests: every model is trained and written once per session.

Everything is made from scikit-learn's bundled digits data (nothing is downloaded):

* ``tf_models``: a tiny Keras CNN saved as ``.keras`` and ``.h5``, its SavedModel, and a
  ``.tflite`` converted from it with ``tf.lite.TFLiteConverter``.
* ``skl_models``: MLPClassifier, LogisticRegression and RandomForestClassifier, each written
  with joblib and with pickle, plus ``sample.npz`` for ``--sample-input``.
* ``pmml_models``: a logistic regression and a decision tree written as PMML by hand.
"""

from __future__ import annotations

import os
import pickle
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).parent
ROOT = HERE.parents[3]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "examples"))

from importer_models import Digits, PmmlModels, SklModels, TfModels  # noqa: E402
from pmml_files import write_logreg_pmml, write_tree_pmml  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def digits() -> Digits:
    from digits import digits_data

    return Digits(*digits_data())


@pytest.fixture(scope="session")
def tf_models(digits: Digits, tmp_path_factory: pytest.TempPathFactory) -> TfModels:
    import tensorflow as tf
    from digits import train_keras_cnn

    out = tmp_path_factory.mktemp("tf")
    model = train_keras_cnn(digits.x_train, digits.y_train, epochs=1, width=4)
    model.save(out / "cnn.keras")
    model.save(out / "cnn.h5")
    model.export(str(out / "cnn_saved_model"), format="tf_saved_model", verbose=False)
    converter = tf.lite.TFLiteConverter.from_saved_model(str(out / "cnn_saved_model"))
    (out / "cnn.tflite").write_bytes(converter.convert())
    return TfModels(model, out / "cnn.keras", out / "cnn.h5", out / "cnn_saved_model",
                    out / "cnn.tflite")


@pytest.fixture(scope="session")
def skl_models(digits: Digits, tmp_path_factory: pytest.TempPathFactory) -> SklModels:
    import joblib
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    out = tmp_path_factory.mktemp("sklearn")
    x, y = digits.flat_train, digits.y_train
    estimators = {
        "mlp": MLPClassifier((32,), max_iter=200, random_state=0),
        "logreg": LogisticRegression(max_iter=300),
        "forest": RandomForestClassifier(12, max_depth=8, random_state=0),
    }
    files = {}
    for name, est in estimators.items():
        with warnings.catch_warnings():  # a tiny MLP need not converge to be a test model
            warnings.simplefilter("ignore", ConvergenceWarning)
            est.fit(x, y)
        files[name, "joblib"] = out / f"{name}.joblib"
        joblib.dump(est, files[name, "joblib"])
        files[name, "pickle"] = out / f"{name}.pkl"
        files[name, "pickle"].write_bytes(pickle.dumps(est))
    sample = out / "sample.npz"
    np.savez(sample, pixels=digits.flat_test[:20].astype(np.float64))
    return SklModels(estimators, files, sample)


@pytest.fixture(scope="session")
def pmml_models(digits: Digits, tmp_path_factory: pytest.TempPathFactory) -> PmmlModels:
    from sklearn.linear_model import LogisticRegression
    from sklearn.tree import DecisionTreeClassifier

    out = tmp_path_factory.mktemp("pmml")
    x, y = digits.flat_train, digits.y_train
    lr = LogisticRegression(max_iter=300).fit(x, y)
    tree = DecisionTreeClassifier(max_depth=6, random_state=0).fit(x, y)
    return PmmlModels(write_logreg_pmml(out / "logreg.pmml", lr.coef_, lr.intercept_, lr.classes_),
                      write_tree_pmml(out / "tree.pmml", tree, tree.classes_), lr, tree)
