"""Documents sklearn2pmml writes from scikit-learn pipelines, scored by JPMML and by ONNX."""

from __future__ import annotations

import pytest

from edgepack.host.build.pmml import convert_pmml

from .oracle import assert_agrees, needs_java
from .producers import scoring_frame, write_sklearn

pytestmark = [needs_java, pytest.mark.slow]


def _estimators():
    from sklearn.ensemble import (
        GradientBoostingClassifier,
        GradientBoostingRegressor,
        RandomForestClassifier,
        RandomForestRegressor,
    )
    from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge
    from sklearn.naive_bayes import GaussianNB
    from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.svm import SVC, SVR
    from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor

    return {
        "tree_classifier": (DecisionTreeClassifier(max_depth=5, random_state=0), "cls", {}),
        "tree_regressor": (DecisionTreeRegressor(max_depth=5, random_state=0), "y", {}),
        "tree_with_nan": (DecisionTreeClassifier(max_depth=4, random_state=0), "cls",
                          {"impute": False, "categorical": False}),
        "forest_classifier": (RandomForestClassifier(n_estimators=8, max_depth=5,
                                                     random_state=0), "cls", {}),
        "forest_regressor": (RandomForestRegressor(n_estimators=8, max_depth=5,
                                                   random_state=0), "y", {}),
        "gbm_binary": (GradientBoostingClassifier(n_estimators=15, max_depth=3,
                                                  random_state=0), "flag", {}),
        "gbm_multiclass": (GradientBoostingClassifier(n_estimators=10, max_depth=2,
                                                      random_state=0), "cls", {}),
        "gbm_regressor": (GradientBoostingRegressor(n_estimators=15, max_depth=3,
                                                    random_state=0), "y", {}),
        "logistic_multiclass": (LogisticRegression(max_iter=1000), "cls", {}),
        "logistic_binary": (LogisticRegression(max_iter=1000), "flag", {}),
        "linear": (LinearRegression(), "y", {}),
        "ridge": (Ridge(alpha=2.0), "y", {}),
        "mlp_classifier": (MLPClassifier(hidden_layer_sizes=(6,), max_iter=400,
                                         random_state=0), "cls", {}),
        "mlp_regressor": (MLPRegressor(hidden_layer_sizes=(5,), max_iter=400,
                                       random_state=0), "y", {}),
        "svc": (SVC(), "cls", {}),
        "svr": (SVR(), "y", {}),
        "knn_classifier": (KNeighborsClassifier(n_neighbors=5), "flag", {}),
        "knn_regressor": (KNeighborsRegressor(n_neighbors=4), "y", {}),
        "naive_bayes": (GaussianNB(), "cls", {}),
    }


NAMES = ["tree_classifier", "tree_regressor", "tree_with_nan", "forest_classifier",
         "forest_regressor", "gbm_binary", "gbm_multiclass", "gbm_regressor",
         "logistic_multiclass", "logistic_binary", "linear", "ridge", "mlp_classifier",
         "mlp_regressor", "svc", "svr", "knn_classifier", "knn_regressor", "naive_bayes"]


@pytest.mark.parametrize("name", NAMES)
def test_sklearn2pmml_document_agrees_with_jpmml(name, tmp_path):
    estimator, target, options = _estimators()[name]
    path = write_sklearn(estimator, target, tmp_path / f"{name}.pmml", **options)
    frame = scoring_frame()
    if not options.get("categorical", True):
        frame = frame.drop(columns=["color"])
    res = convert_pmml(path)
    assert_agrees(path, frame, res)
    if name.startswith(("tree", "forest", "gbm")) and name != "tree_with_nan":
        # scikit-learn's trees fit ONNX-ML's tree operator (the NaN tree needs nullPrediction)
        assert "TreeModel/TreeEnsembleRegressor" in res.features
