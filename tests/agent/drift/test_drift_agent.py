"""The agent side of drift: the ``[drift]`` config section, loading a slot's ``drift.json`` and
the inference path feeding the sketcher (``Model.predict``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from drift_models import IMAGE, LOGITS, DigitsCnn

from edgepack.agent.config import ConfigError, DriftSection, parse_config, render_config
from edgepack.agent.drift import REFERENCE_MEMBER, load_sketcher
from edgepack.agent.errors import BundleError
from edgepack.agent.inference import Model
from edgepack.agent.runtimes import open_model

BASE = {"device_id": "d1", "data_dir": "/tmp/d1", "target": "rpi4", "allow_unsigned": True}


def test_drift_section_defaults_and_overrides() -> None:
    assert parse_config(dict(BASE)).drift == DriftSection(enabled=True, sample_rate=0.01)
    cfg = parse_config({**BASE, "drift": {"sample_rate": 1, "enabled": False}})
    assert cfg.drift == DriftSection(enabled=False, sample_rate=1.0)
    assert "[drift]" in render_config(cfg) and "[drift]" not in render_config(
        parse_config(dict(BASE)))


@pytest.mark.parametrize("section, key", [({"sample_rate": 1.5}, "drift.sample_rate"),
                                          ({"sample_rate": -0.1}, "drift.sample_rate"),
                                          ({"enabled": "yes"}, "drift.enabled"),
                                          ({"rate": 0.1}, "drift.rate")])
def test_drift_section_mistakes_name_the_key(section: dict, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({**BASE, "drift": section})
    assert key in str(e.value)


def test_slot_without_drift_json_has_no_sketcher(tmp_path) -> None:
    assert load_sketcher(tmp_path, sample_rate=0.5) is None


def test_unreadable_drift_json_is_a_bundle_error(tmp_path) -> None:
    (tmp_path / REFERENCE_MEMBER).write_text("{not json")
    with pytest.raises(BundleError, match=REFERENCE_MEMBER):
        load_sketcher(tmp_path, sample_rate=0.5)
    (tmp_path / REFERENCE_MEMBER).write_text(json.dumps({"schema": "other"}))
    with pytest.raises(BundleError, match="not a drift reference"):
        load_sketcher(tmp_path, sample_rate=0.5)


def test_predict_feeds_the_sketcher_with_outputs_by_name(cnn: DigitsCnn, tmp_path) -> None:
    (tmp_path / REFERENCE_MEMBER).write_text(json.dumps(cnn.reference))
    sketcher = load_sketcher(tmp_path, sample_rate=1.0)
    assert sketcher is not None and sketcher.sample_rate == 1.0
    model = Model(open_model(cnn.path, "onnxruntime", threads=1), {"model": {}})
    model.drift = sketcher
    for x in cnn.split.stream[:5]:
        out = model.predict({IMAGE: x[None]})
        assert set(out) == {LOGITS}
    with pytest.raises(Exception):  # noqa: B017, PT011 - a failed call is not sketched
        model.predict({IMAGE: np.zeros((1, 3), np.float32)})
    w = sketcher.take_window()
    assert (w["calls"], w["sampled"], w["rows"]) == (5, 5, 5)
    assert w["ref"] == cnn.reference["id"] and "i0.c0" in w["s"] and "o0.cls" in w["c"]
