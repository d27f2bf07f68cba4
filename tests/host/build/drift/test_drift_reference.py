"""The build side of drift: the reference profile made from the build's own data."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from drift_models import IMAGE, LOGITS, DigitsCnn

from edgepack.agent.drift import REFERENCE_SCHEMA
from edgepack.agent.errors import DataError
from edgepack.host.build.drift_reference import (
    REFERENCE_MEMBER,
    make_reference,
    reference_json,
    spec_from_reference,
)
from edgepack.host.fleet.drift import load_reference


def test_digits_reference_reads_the_cnn_as_an_nhwc_image_classifier(cnn: DigitsCnn) -> None:
    ref = cnn.reference
    assert (ref["schema"], ref["rows"], REFERENCE_MEMBER) == (REFERENCE_SCHEMA, 400, "drift.json")
    spec = spec_from_reference(ref)
    (image,) = spec.inputs
    (logits,) = spec.outputs
    assert (image.name, image.kind, image.layout, image.channels) == (IMAGE, "image", "NHWC", 1)
    assert (logits.name, logits.kind, logits.activation, logits.classes) == (
        LOGITS, "probabilities", "softmax", 10)
    assert spec.reference_id == ref["id"] and len(ref["id"]) == 16
    figures = ref["figures"]
    assert set(figures) == {"i0.c0", "i0.px", "o0.cls", "o0.conf"}
    assert figures["i0.c0"]["label"] == "image: channel 0 mean"
    c0 = figures["i0.c0"]
    assert len(c0["expected"]) == len(c0["edges"]) + 1 == 5
    assert sum(c0["expected"]) == pytest.approx(1.0, abs=1e-5)
    assert c0["mean"] == pytest.approx(float(cnn.split.reference.mean()), abs=1e-4)
    assert sum(figures["o0.cls"]["counts"]) == 400
    assert 0.8 < figures["o0.conf"]["mean"] <= 1.0
    # pixels are 17 discrete levels: no PSI bin is left with under 10 % of the mass
    assert min(figures["i0.px"]["expected"]) >= 0.1


def test_the_reference_is_canonical_json_identified_by_its_hash(cnn: DigitsCnn) -> None:
    again = make_reference({IMAGE: cnn.split.reference},
                           {LOGITS: cnn.logits(cnn.split.reference)}, task="classification")

    def without_sketches(ref: dict) -> dict:
        doc = json.loads(json.dumps(ref))
        for f in doc["figures"].values():
            f.pop("sketch", None)
        return {k: v for k, v in doc.items() if k != "id"}

    # KLL compaction is randomised inside the sketch library: the sketches (and so the id, the
    # hash of the document) may differ between builds; every other number is exact
    assert without_sketches(again) == without_sketches(cnn.reference)
    raw = reference_json(cnn.reference)
    assert json.loads(raw) == json.loads(json.dumps(cnn.reference))
    assert load_reference(raw).id == cnn.reference["id"]
    body = {k: v for k, v in cnn.reference.items() if k != "id"}
    assert hashlib.sha256(reference_json(body)).hexdigest()[:16] == cnn.reference["id"]
    assert len(raw) < 8 * 1024


def test_layouts_and_activations_are_read_from_the_data() -> None:
    rng = np.random.default_rng(0)
    nchw = rng.random((20, 3, 16, 16)).astype(np.float32)
    probs = rng.dirichlet(np.ones(4), 20).astype(np.float32)
    ref = make_reference({"img": nchw}, {"p": probs}, task="classification")
    spec = spec_from_reference(ref)
    assert (spec.inputs[0].layout, spec.inputs[0].channels) == ("NCHW", 3)
    assert spec.outputs[0].activation == "none"
    assert {f"i0.c{c}" for c in range(3)} <= set(ref["figures"])

    seq = rng.random((20, 7, 5)).astype(np.float32)
    score = rng.standard_normal((20, 1)).astype(np.float32)
    spec = spec_from_reference(make_reference({"s": seq}, {"score": score},
                                              task="classification"))
    assert (spec.inputs[0].layout, spec.inputs[0].channels) == ("N...", 1)
    assert (spec.outputs[0].activation, spec.outputs[0].classes) == ("sigmoid", 2)

    forced = make_reference({"img": nchw}, {"p": probs}, task="classification",
                            layouts={"img": "NHWC"})
    assert spec_from_reference(forced).inputs[0].channels == 16


def test_data_that_cannot_be_profiled_names_the_argument() -> None:
    x = np.zeros((4, 3), np.float32)
    cases = [
        (dict(inputs={"x": x}, outputs={"y": x[:, :1]}, task="ranking"), "task"),
        (dict(inputs={}, outputs={}, task="regression"), "inputs"),
        (dict(inputs={"x": x}, outputs={"y": x[:3]}, task="regression"), "outputs"),
        (dict(inputs={"x": x}, outputs={"p": np.full((4, 2), 0.5)}, task="classification",
              classes=[0, 1, 2]), "classes"),
        (dict(inputs={"x": x}, outputs={}, task="regression", kinds={"x": "audio"}), "kinds"),
        (dict(inputs={"x": np.array([["a"]] * 4)}, outputs={}, task="regression"), "kinds"),
    ]
    for kwargs, field in cases:
        with pytest.raises(DataError, match=f"`{field}=`") as e:
            make_reference(**kwargs)
        assert e.value.context["field"] == field
