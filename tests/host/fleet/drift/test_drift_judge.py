"""The fleet side of drift: merge device windows and judge them against the reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
from drift_models import IMAGE, LOGITS, DigitsCnn, build_digits_linear, run_windows, session

from edgepack.agent.drift import DEFAULT_K, DriftSketcher
from edgepack.agent.errors import DataError
from edgepack.host.build.drift_reference import make_reference, spec_from_reference
from edgepack.host.fleet.drift import (
    DriftThresholds,
    WindowRecord,
    decode_window,
    judge,
    load_reference,
    merge_by,
    merge_windows,
    select_windows,
)


def _verdicts(cnn: DigitsCnn, *, seed: int, transform: object = None, calls: int = 200) -> list:
    """Judge the windows of one device cumulatively, as the server does over a time range."""
    reference = load_reference(json.loads(json.dumps(cnn.reference)))
    sketcher = DriftSketcher(spec_from_reference(cnn.reference), sample_rate=1.0, seed=seed)
    windows = [decode_window(json.dumps(p)) for p in
               run_windows(cnn, sketcher, windows=3, calls=calls, seed=seed, transform=transform)]
    return [judge(reference, merge_windows(windows[:n])) for n in (1, 2, 3)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_in_distribution_traffic_stays_under_the_threshold(cnn: DigitsCnn, seed: int) -> None:
    verdicts = _verdicts(cnn, seed=seed)
    assert [v.judged for v in verdicts] == [False, True, True]  # 200, 400, 600 rows
    for verdict in verdicts:
        assert not verdict.alert, [f for f in verdict.figures if f.alert]
        assert verdict.score < 1.0
        for fig in verdict.figures:
            assert fig.psi < 0.2


def test_inverted_images_are_flagged_within_three_windows(cnn: DigitsCnn) -> None:
    verdicts = _verdicts(cnn, seed=0, transform=lambda x: 1.0 - x)
    assert any(v.alert for v in verdicts)
    first = next(v for v in verdicts if v.alert)
    alerting = {f.key for f in first.alerts}
    assert {"i0.c0", "i0.px", "o0.cls"} <= alerting
    conf = next(f for f in first.figures if f.key == "o0.conf")
    assert conf.confidence_drop > 0.1 and conf.alert
    assert first.score >= 1.0


def test_a_dimmer_camera_is_flagged_by_the_inputs(cnn: DigitsCnn) -> None:
    verdicts = _verdicts(cnn, seed=1, transform=lambda x: x * 0.7)
    assert verdicts[-1].alert
    assert "i0.c0" in {f.key for f in verdicts[-1].alerts}


def test_small_windows_are_reported_but_never_alert(cnn: DigitsCnn) -> None:
    verdict = _verdicts(cnn, seed=0, transform=lambda x: 1.0 - x, calls=40)[0]
    assert not verdict.judged and not verdict.alert and verdict.score == 0.0
    c0 = next(f for f in verdict.figures if f.key == "i0.c0")
    assert c0.psi > 1.0 and "40 of 300 rows" in c0.note
    assert not judge(load_reference(cnn.reference),
                     decode_window(DriftSketcher(spec_from_reference(cnn.reference))
                                   .take_window())).judged


def test_scaled_tabular_features_are_flagged(cnn: DigitsCnn, tmp_path) -> None:
    sess = session(build_digits_linear(tmp_path / "linear.onnx", cnn.split))
    flat = cnn.split.reference.reshape(-1, 64)
    ref = make_reference({"x": flat}, {LOGITS: sess.run(None, {"x": flat})[0]},
                         task="classification", max_features=8)
    reference = load_reference(ref)
    stream = cnn.split.stream.reshape(-1, 64)

    def verdict(scale: float) -> object:
        sketcher = DriftSketcher(spec_from_reference(ref), sample_rate=1.0, seed=0)
        x = stream * scale
        sketcher.observe({"x": x}, {LOGITS: sess.run(None, {"x": x})[0]})
        return judge(reference, decode_window(sketcher.take_window()))

    assert not verdict(1.0).alert
    scaled = verdict(1.5)
    assert scaled.alert
    assert sum(f.key.startswith("i0.f") for f in scaled.alerts) >= 4


def test_regression_output_shift_is_flagged() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 3)).astype(np.float32)
    ref = make_reference({"x": x[:1000]}, {"y": x[:1000, :1] * 2}, task="regression")
    reference = load_reference(ref)
    spec = spec_from_reference(ref)

    def verdict(y: np.ndarray) -> object:
        sketcher = DriftSketcher(spec, sample_rate=1.0, seed=0)
        sketcher.observe({"x": x[1000:]}, {"y": y})
        return judge(reference, decode_window(sketcher.take_window()))

    assert not verdict(x[1000:, :1] * 2).alert
    shifted = verdict(x[1000:, :1] * 2 + 1.0)
    assert [f.key for f in shifted.alerts] == ["o0.v0"]
    # a shift of 1.0 over a reference std of 2 is 0.5; the window's k=32 sketch adds noise
    # (0.40..0.67 over 200 trials of fresh data, wider for this one fixed sample)
    assert 0.3 < shifted.alerts[0].wasserstein < 0.9


def test_merged_windows_equal_one_sketch_of_everything(cnn: DigitsCnn) -> None:
    spec = spec_from_reference(cnn.reference)
    images = cnn.split.stream
    logits = cnn.logits(images)
    parts = np.array_split(np.arange(len(images)), 6)
    windows = []
    for n, idx in enumerate(parts):
        sketcher = DriftSketcher(spec, sample_rate=1.0, seed=n)
        sketcher.observe({IMAGE: images[idx]}, {LOGITS: logits[idx]})
        windows.append(decode_window(sketcher.take_window()))
    whole = DriftSketcher(spec, sample_rate=1.0, seed=9)
    whole.observe({IMAGE: images}, {LOGITS: logits})
    at_once = decode_window(whole.take_window())
    merged = merge_windows(windows)

    assert (merged.calls, merged.sampled, merged.rows) == (6, 6, len(images))
    assert merged.counts == at_once.counts
    assert merged.sums["o0.conf"] == pytest.approx(at_once.sums["o0.conf"], abs=1e-2)
    from datasketches import kll_floats_sketch

    eps = kll_floats_sketch.get_normalized_rank_error(DEFAULT_K, False)
    truth = np.sort(images.reshape(len(images), -1).mean(axis=1))
    a = kll_floats_sketch.deserialize(merged.sketches["i0.c0"])
    b = kll_floats_sketch.deserialize(at_once.sketches["i0.c0"])
    assert a.n == b.n == len(images)
    points = list(np.quantile(truth, np.linspace(0.05, 0.95, 19)))
    exact = np.searchsorted(truth, points, side="right") / len(truth)
    for sketch in (a, b):
        estimate = np.asarray(sketch.get_cdf(points, inclusive=True)[:-1])
        assert np.max(np.abs(estimate - exact)) <= eps
    assert np.max(np.abs(np.subtract(a.get_cdf(points, True), b.get_cdf(points, True)))) <= 2 * eps


def test_windows_merge_per_device_bundle_and_group_over_a_time_range(cnn: DigitsCnn) -> None:
    spec = spec_from_reference(cnn.reference)
    sketcher = DriftSketcher(spec, sample_rate=1.0, seed=0)
    payloads = run_windows(cnn, sketcher, windows=4, calls=10, seed=0)
    records = [WindowRecord("d1", "b1", 100.0, decode_window(payloads[0]), ("cams",)),
               WindowRecord("d1", "b1", 160.0, decode_window(payloads[1]), ("cams",)),
               WindowRecord("d2", "b1", 160.0, decode_window(payloads[2]), ("cams", "north")),
               WindowRecord("d2", "b1", 220.0, decode_window(payloads[3]), ())]
    by_device = merge_by(records, "device")
    assert {k: v.rows for k, v in by_device.items()} == {"d1": 20, "d2": 20}
    assert merge_by(records, "bundle")["b1"].rows == 40
    assert {k: v.calls for k, v in merge_by(records, "group").items()} == {"cams": 30, "north": 10}
    recent = select_windows(records, since=150.0, until=220.0)
    assert [(r.device, r.ts) for r in recent] == [("d1", 160.0), ("d2", 160.0)]
    assert len(select_windows(records, device="d2", group="north")) == 1
    with pytest.raises(DataError, match="by="):
        merge_by(records, "site")


def test_windows_of_another_reference_are_refused(cnn: DigitsCnn) -> None:
    other = dict(cnn.reference, id="0000000000000000")
    sketcher = DriftSketcher(spec_from_reference(other), sample_rate=1.0)
    (payload,) = run_windows(cnn, sketcher, windows=1, calls=5, seed=0)
    window = decode_window(payload)
    with pytest.raises(DataError, match="reference"):
        judge(load_reference(cnn.reference), window)
    mine = DriftSketcher(spec_from_reference(cnn.reference), sample_rate=1.0)
    with pytest.raises(DataError, match="different references"):
        merge_windows([window, decode_window(mine.take_window())])


def test_verdict_is_json_ready_and_thresholds_are_settable(cnn: DigitsCnn) -> None:
    reference = load_reference(cnn.reference)
    sketcher = DriftSketcher(spec_from_reference(cnn.reference), sample_rate=1.0, seed=0)
    (payload,) = run_windows(cnn, sketcher, windows=1, calls=200, seed=0)
    window = decode_window(payload)
    strict = judge(reference, window, thresholds=DriftThresholds(psi=0.001, min_rows=10))
    assert not judge(reference, window).judged  # 200 rows: under the default 300
    assert strict.alert
    doc = json.loads(json.dumps(strict.to_dict()))
    assert doc["alert"] is True and doc["thresholds"]["psi"] == 0.001
    assert {f["key"] for f in doc["figures"]} == {"i0.c0", "i0.px", "o0.cls", "o0.conf"}
