"""PMML 4.1-4.4 documents to ONNX models, following the specification.

::

    convert.py      convert_pmml(): document -> PmmlModel (ONNX + inputs, outputs, features)
    document.py     XML reading, namespaces, line numbers, the shared Context
    graph.py        the ONNX graph being written; Val = value + missing mask per row
    fields.py       DataDictionary, MiningSchema (missing/invalid/outlier treatment), inputs
    transforms.py   TransformationDictionary, LocalTransformations, expressions
    predicates.py   predicates in three-valued logic
    models.py       one model element: schema, transformations, body, Targets, Output
    tree.py, mining.py, regression.py, general_regression.py, neural.py, svm.py, knn.py,
    naive_bayes.py, scorecard.py    the model bodies
    tree_ensemble.py                trees (and sums, averages, votes of trees) as ONNX-ML's
                                    TreeEnsembleRegressor
    links.py        inverse link functions in float64
"""

from .convert import InputField, OutputField, PmmlModel, convert_pmml

__all__ = ["convert_pmml", "PmmlModel", "InputField", "OutputField"]
