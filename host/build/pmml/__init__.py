"""PMML 4.1-4.4 documents to ONNX models, following the specification.

Inputs: one tensor ``[N, 1]`` per active field, named as the document names it; ``string`` for
string fields (missing = ``""``), ``float64`` otherwise (missing = ``NaN``; booleans as 0/1).
Outputs: ``label`` [N] (strings as written, int64 for integer targets) and ``probabilities``
[N, classes] for classification, ``predicted`` [N] float64 for regression; a row without a
prediction has NaN numbers and an empty label (int64 minimum for integer labels).

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
    prediction.py   what a model body returns (value or class index + probabilities)
    arrays.py       Array tokens (quoted strings)
    links.py        inverse link functions in float64
"""

from .convert import InputField, OutputField, PmmlModel, convert_pmml

__all__ = ["convert_pmml", "PmmlModel", "InputField", "OutputField"]
