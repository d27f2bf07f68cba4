"""Documents written the way R, KNIME, SAS, SPSS, Spark and sklearn2pmml write them (stored in
``corpus/``), scored by JPMML and by the converted ONNX model on the same rows."""

from __future__ import annotations

import pytest

from .oracle import CORPUS, assert_agrees, needs_java
from .producers import scoring_frame

DOCUMENTS = sorted(p.name for p in CORPUS.glob("*.pmml"))


@needs_java
@pytest.mark.parametrize("name", DOCUMENTS)
def test_corpus_document_agrees_with_jpmml(name):
    frame = scoring_frame(extra=True)
    assert_agrees(CORPUS / name, frame)
