"""PMML 4.4 documents written by hand from fitted scikit-learn models (no Java, no sklearn2pmml).

Only what the importer tests need: a multinomial logistic regression (``RegressionModel`` with
softmax) and a binary-split decision tree (``TreeModel``), both over numeric fields ``x0…xN``.
"""

from __future__ import annotations

from pathlib import Path
from xml.sax.saxutils import quoteattr

import numpy as np

_HEADER = ('<?xml version="1.0" encoding="UTF-8"?>\n'
           '<PMML xmlns="http://www.dmg.org/PMML-4_4" version="4.4">\n'
           '  <Header description="edgepack test model"/>\n')


def _dictionary(n_features: int, classes: np.ndarray) -> list[str]:
    lines = [f'  <DataDictionary numberOfFields="{n_features + 1}">']
    lines += [f'    <DataField name="x{i}" optype="continuous" dataType="double"/>'
              for i in range(n_features)]
    lines.append('    <DataField name="y" optype="categorical" dataType="integer">')
    lines += [f'      <Value value="{int(c)}"/>' for c in classes]
    lines += ['    </DataField>', '  </DataDictionary>']
    return lines


def _schema(n_features: int) -> list[str]:
    lines = ['    <MiningSchema>', '      <MiningField name="y" usageType="target"/>']
    lines += [f'      <MiningField name="x{i}"/>' for i in range(n_features)]
    lines.append('    </MiningSchema>')
    return lines


def write_logreg_pmml(path: Path, coef: np.ndarray, intercept: np.ndarray,
                      classes: np.ndarray) -> Path:
    """A multinomial ``LogisticRegression`` as ``RegressionModel normalizationMethod=softmax``."""
    n_features = coef.shape[1]
    lines = [_HEADER.rstrip("\n"), *_dictionary(n_features, classes),
             '  <RegressionModel functionName="classification" normalizationMethod="softmax">',
             *_schema(n_features)]
    for k, c in enumerate(classes):
        lines.append(f'    <RegressionTable intercept="{float(intercept[k])!r}" targetCategory="{int(c)}">')
        lines += [f'      <NumericPredictor name="x{i}" coefficient="{float(coef[k, i])!r}"/>'
                  for i in range(n_features)]
        lines.append('    </RegressionTable>')
    lines += ['  </RegressionModel>', '</PMML>']
    path.write_text("\n".join(lines) + "\n")
    return path


def write_tree_pmml(path: Path, tree: object, classes: np.ndarray) -> Path:
    """A fitted ``DecisionTreeClassifier`` as a binary-split ``TreeModel``."""
    t = tree.tree_
    n_features = tree.n_features_in_
    lines = [_HEADER.rstrip("\n"), *_dictionary(n_features, classes),
             '  <TreeModel functionName="classification" splitCharacteristic="binarySplit">',
             *_schema(n_features)]

    def node(i: int, predicate: str, depth: int) -> None:
        pad = "    " + "  " * depth
        counts = t.value[i][0] * t.n_node_samples[i]
        score = int(classes[int(np.argmax(counts))])
        lines.append(f'{pad}<Node id="{i}" score="{score}" recordCount="{t.n_node_samples[i]}">')
        lines.append(f"{pad}  {predicate}")
        for c, n in zip(classes, counts, strict=True):
            lines.append(f'{pad}  <ScoreDistribution value="{int(c)}" recordCount="{float(n)!r}"/>')
        left, right = t.children_left[i], t.children_right[i]
        if left != -1:
            f, thr = f"x{t.feature[i]}", quoteattr(repr(float(t.threshold[i])))
            node(left, f'<SimplePredicate field="{f}" operator="lessOrEqual" value={thr}/>',
                 depth + 1)
            node(right, f'<SimplePredicate field="{f}" operator="greaterThan" value={thr}/>',
                 depth + 1)
        lines.append(f"{pad}</Node>")

    node(0, "<True/>", 0)
    lines += ['  </TreeModel>', '</PMML>']
    path.write_text("\n".join(lines) + "\n")
    return path


def write_clustering_pmml(path: Path) -> Path:
    """A ``ClusteringModel``: valid PMML that the importer does not support."""
    lines = [_HEADER.rstrip("\n"),
             '  <DataDictionary numberOfFields="1">',
             '    <DataField name="x0" optype="continuous" dataType="double"/>',
             '  </DataDictionary>',
             '  <ClusteringModel functionName="clustering" modelClass="centerBased"'
             ' numberOfClusters="1">',
             '    <MiningSchema><MiningField name="x0"/></MiningSchema>',
             '    <ComparisonMeasure kind="distance"><squaredEuclidean/></ComparisonMeasure>',
             '    <ClusteringField field="x0"/>',
             '    <Cluster name="c0"><Array n="1" type="real">0.0</Array></Cluster>',
             '  </ClusteringModel>', '</PMML>']
    path.write_text("\n".join(lines) + "\n")
    return path


def write_forest_pmml(path: Path, forest: object) -> Path:
    """A fitted ``RandomForestClassifier`` as a ``MiningModel`` averaging ``TreeModel`` segments."""
    classes = forest.classes_
    n_features = forest.n_features_in_
    segments = []
    for i, est in enumerate(forest.estimators_):
        text = write_tree_pmml(path.with_suffix(f".tree{i}.xml"), est, classes).read_text()
        path.with_suffix(f".tree{i}.xml").unlink()
        body = text[text.index("  <TreeModel"):text.index("</PMML>")]
        segments += [f'      <Segment id="{i}">', "        <True/>", body.rstrip("\n"),
                     "      </Segment>"]
    lines = [_HEADER.rstrip("\n"), *_dictionary(n_features, classes),
             '  <MiningModel functionName="classification">', *_schema(n_features),
             '    <Segmentation multipleModelMethod="average">', *segments,
             '    </Segmentation>', '  </MiningModel>', '</PMML>']
    path.write_text("\n".join(lines) + "\n")
    return path
