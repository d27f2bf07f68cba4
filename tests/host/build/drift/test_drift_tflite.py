"""TFLite bundles carry drift.json like ONNX ones: the build's calibration and eval inputs and
the shipped model's outputs on them (a float Keras CNN built with ``format="tflite"`` for a Linux
target). The int8 bundle with uint8 I/O is checked in tests/agent/drift/, where an agent runs it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from drift_models import IMAGE, digits_split
from tflite_models import keras_digits, tflite_bundle

from edgepack.agent.bundle import read_bundle
from edgepack.agent.drift import DriftSpec
from edgepack.agent.runtimes import open_model
from edgepack.host.build.drift_reference import REFERENCE_MEMBER
from edgepack.host.fleet.drift import load_reference


@pytest.fixture(scope="module")
def float_bundle(tmp_path_factory: pytest.TempPathFactory) -> object:
    d = tmp_path_factory.mktemp("tflite-drift")
    return tflite_bundle(keras_digits(tmp_path_factory), d / "out", target="rpi4", int8=False)


def test_float_tflite_bundle_has_a_drift_reference_of_its_own_outputs(float_bundle, tmp_path):
    r = float_bundle
    assert r.manifest["model"]["format"] == "tflite"
    assert REFERENCE_MEMBER in r.manifest["files"]
    bundle = read_bundle(r.path)
    raw = bundle.read_member(REFERENCE_MEMBER)
    ref, doc = load_reference(raw), json.loads(raw)
    spec = DriftSpec.from_reference(doc)
    # the spec names the tensors as the agent's LiteRT session does (the manifest's names)
    [tensor_in] = r.manifest["model"]["inputs"]
    [tensor_out] = r.manifest["model"]["outputs"]
    assert [(s.name, s.kind, s.layout, s.channels, s.scale) for s in spec.inputs] == [
        (tensor_in["name"], "image", "NHWC", 1, 0.0)]
    assert [(o.name, o.kind, o.classes, o.scale) for o in spec.outputs] == [
        (tensor_out["name"], "probabilities", 10, 0.0)]
    assert set(ref.figures) == {"i0.c0", "i0.px", "o0.cls", "o0.conf"}
    assert ref.task == "classification" and ref.rows > 300  # eval (100) and calibration
    classes = np.asarray(ref.figures["o0.cls"].counts, dtype=float) / ref.rows
    assert classes.sum() == pytest.approx(1.0) and classes[-1] == 0  # no unknown class
    assert classes[:10].min() > 0.03  # every digit is predicted, none dominates
    assert sum(ref.figures["o0.conf"].counts) == ref.rows

    # the predicted classes are the shipped model's, on the build's eval inputs
    bundle.extract(tmp_path / "slot")
    sess = open_model(tmp_path / "slot" / "model.tflite", "litert", threads=1)
    split = digits_split()
    preds = np.concatenate([sess.run({tensor_in["name"]: x[None]})[0].argmax(axis=1)
                            for x in split.reference[300:]])
    assert np.bincount(preds, minlength=10).sum() == 100
    assert (np.bincount(preds, minlength=10) <= np.asarray(ref.figures["o0.cls"].counts[:10])
            ).all()

    entry = r.report.model["drift"]
    assert entry["member"] == REFERENCE_MEMBER and entry["id"] == ref.id
    assert (entry["task"], entry["rows"], entry["figures"]) == ("classification", ref.rows, 4)
    assert "dequantized" not in entry  # float I/O: nothing to dequantize
    assert IMAGE in (r.report.model["signature_inputs"].values())
