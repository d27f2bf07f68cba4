"""The build writes the drift reference as the optional bundle member ``drift.json``."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from drift_models import IMAGE, build_digits_cnn, digits_split

from edgepack.agent.bundle import read_bundle
from edgepack.agent.drift import DriftSpec
from edgepack.host.build import build
from edgepack.host.build.drift_reference import REFERENCE_MEMBER
from edgepack.host.fleet.drift import load_reference


@pytest.fixture(scope="module")
def digits_files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("drift-build")
    split = digits_split()
    model = build_digits_cnn(d / "digits_cnn.onnx", split)
    np.savez(d / "calib.npz", **{IMAGE: split.reference[:300]})
    np.savez(d / "eval.npz", **{IMAGE: split.reference[300:]})
    return {"model": model, "calib": d / "calib.npz", "eval": d / "eval.npz", "dir": d}


def test_build_writes_drift_json_from_calibration_and_eval(digits_files, tmp_path):
    r = build(model=str(digits_files["model"]), target="rpi4", quantize="none",
              calibration=str(digits_files["calib"]), eval=str(digits_files["eval"]),
              out=str(tmp_path), variants=False)
    bundle = read_bundle(r.path)
    raw = bundle.read_member(REFERENCE_MEMBER)
    assert REFERENCE_MEMBER in r.manifest["files"]
    ref = load_reference(raw)
    assert ref.rows > 300  # eval (100) and calibration (capped by the profile) together
    assert ref.task == "classification"
    spec = DriftSpec.from_reference(json.loads(raw))
    assert [s.name for s in spec.inputs] == [IMAGE]
    assert r.report.model["drift"]["id"] == ref.id
    assert r.report.model["drift"]["member"] == REFERENCE_MEMBER
    with zipfile.ZipFile(r.path) as zf:
        assert json.loads(zf.read("report.json"))["model"]["drift"]["rows"] == ref.rows


def test_build_without_data_has_no_drift_json_and_says_why(digits_files, tmp_path):
    r = build(model=str(digits_files["model"]), target="rpi4", quantize="none",
              out=str(tmp_path), variants=False)
    assert REFERENCE_MEMBER not in r.manifest["files"]
    assert "no calibration or eval data" in r.report.model["drift"]["skipped"]
