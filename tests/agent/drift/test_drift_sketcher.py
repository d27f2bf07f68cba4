"""The device side of drift: what DriftSketcher samples, sketches and sends per window."""

from __future__ import annotations

import base64
import dataclasses
import json
import subprocess
import sys
import threading

import numpy as np
import pytest
from datasketches import kll_floats_sketch
from drift_models import IMAGE, LOGITS, DigitsCnn, run_windows

from edgepack.agent.drift import (
    DEFAULT_SAMPLE_RATE,
    SCHEMA,
    DriftSketcher,
    DriftSpec,
    extract_figures,
    payload_bytes,
)
from edgepack.agent.errors import BundleError, DataError
from edgepack.host.build.drift_reference import make_reference, spec_from_reference

WINDOW_BUDGET = 2048


def test_window_payload_names_every_figure_and_resets(cnn: DigitsCnn) -> None:
    sketcher = DriftSketcher(spec_from_reference(cnn.reference), sample_rate=1.0, seed=1)
    first, second = run_windows(cnn, sketcher, windows=2, calls=50, seed=0)

    assert first["schema"] == SCHEMA and first["ref"] == cnn.reference["id"]
    assert (first["calls"], first["sampled"], first["rows"]) == (50, 50, 50)
    assert set(first["s"]) == {"i0.c0", "i0.px"}
    assert set(first["c"]) == {"o0.cls", "o0.conf"}
    assert sum(first["c"]["o0.cls"]) == 50 and len(first["c"]["o0.cls"]) == 11
    assert sum(first["c"]["o0.conf"]) == 50 and 0 < first["sum"]["o0.conf"] <= 50
    assert second["calls"] == 50  # a fresh window: nothing carried over
    json.dumps(first)  # JSON-ready as it is


def test_empty_window_has_no_figures(cnn: DigitsCnn) -> None:
    payload = DriftSketcher(spec_from_reference(cnn.reference)).take_window()
    assert (payload["calls"], payload["rows"], payload["s"], payload["c"]) == (0, 0, {}, {})


def test_sampling_follows_the_rate_and_the_seed(cnn: DigitsCnn) -> None:
    spec = spec_from_reference(cnn.reference)
    x = cnn.split.stream[:1]
    y = cnn.logits(x)

    def sampled(seed: int, rate: float) -> list[bool]:
        s = DriftSketcher(spec, sample_rate=rate, seed=seed)
        return [s.observe({IMAGE: x}, {LOGITS: y}) for _ in range(5000)]

    assert sampled(7, 0.1) == sampled(7, 0.1)
    assert sampled(7, 0.1) != sampled(8, 0.1)
    assert 400 <= sum(sampled(7, 0.1)) <= 600
    assert sum(sampled(7, 0.0)) == 0
    every = sampled(7, 1.0)
    assert all(every[:spec.max_rows]) and not any(every[spec.max_rows:])  # the window's row cap


def test_default_rate_comes_from_the_reference(cnn: DigitsCnn) -> None:
    spec = spec_from_reference(cnn.reference)
    assert DriftSketcher(spec).sample_rate == spec.sample_rate == DEFAULT_SAMPLE_RATE == 0.01


def test_rate_outside_zero_to_one_is_refused(cnn: DigitsCnn) -> None:
    with pytest.raises(DataError, match="sample_rate=") as e:
        DriftSketcher(spec_from_reference(cnn.reference), sample_rate=1.5)
    assert e.value.context["field"] == "sample_rate"


def test_row_cap_bounds_a_window(cnn: DigitsCnn) -> None:
    spec = dataclasses.replace(spec_from_reference(cnn.reference), max_rows=70)
    sketcher = DriftSketcher(spec, sample_rate=1.0, seed=0)
    batch = cnn.split.stream[:32]
    for _ in range(4):
        sketcher.observe({IMAGE: batch}, {LOGITS: cnn.logits(batch)})
    payload = sketcher.take_window()
    assert (payload["calls"], payload["rows"]) == (4, 70)
    assert sum(payload["c"]["o0.cls"]) == 70


def test_digits_window_fits_two_kilobytes_even_at_the_row_cap(cnn: DigitsCnn) -> None:
    spec = spec_from_reference(cnn.reference)
    sketcher = DriftSketcher(spec, sample_rate=1.0, seed=3)
    stream = cnn.split.stream
    for start in range(0, spec.max_rows, 64):
        batch = stream[np.arange(start, start + 64) % len(stream)]
        sketcher.observe({IMAGE: batch}, {LOGITS: cnn.logits(batch)})
    full = sketcher.take_window()
    assert full["rows"] == spec.max_rows == 4096
    assert payload_bytes(full) <= WINDOW_BUDGET

    # a minute of a device at 100 inferences/s at the default rate: ~60 sampled rows
    sketcher = DriftSketcher(spec, seed=4)
    (typical,) = run_windows(cnn, sketcher, windows=1, calls=6000, seed=1)
    assert 30 <= typical["rows"] <= 90
    assert payload_bytes(typical) <= WINDOW_BUDGET


def test_tabular_inputs_sketch_the_top_features_by_variance() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 40)).astype(np.float32) * 1.2 ** np.arange(40)
    y = x[:, :3].sum(axis=1, keepdims=True)
    ref = make_reference({"x": x}, {"y": y}, task="regression", max_features=5)
    spec = spec_from_reference(ref)
    assert spec.inputs[0].features == (35, 36, 37, 38, 39)
    assert any("5 of 40 features" in note for note in ref["notes"])

    sketcher = DriftSketcher(spec, sample_rate=1.0, seed=0)
    sketcher.observe({"x": x[:10]}, {"y": y[:10]})
    payload = sketcher.take_window()
    assert set(payload["s"]) == {f"i0.f{j}" for j in range(35, 40)} | {"o0.v0"}


def test_token_ids_are_counted_in_buckets_with_an_out_of_range_bucket() -> None:
    ids = np.array([[0, 1, 99], [50, 120, -1]], dtype=np.int64)
    ref = make_reference({"ids": ids}, {"p": np.full((2, 2), 0.5, np.float32)},
                         task="classification", vocab={"ids": 100}, token_buckets=4)
    spec = spec_from_reference(ref)
    assert (spec.inputs[0].kind, spec.inputs[0].vocab, spec.inputs[0].buckets) == ("tokens", 100, 4)
    figs = extract_figures(spec, {"ids": ids}, {"p": np.array([[0.2, 0.8], [0.9, 0.1]])})
    assert figs.counts["i0.tok"].tolist() == [2, 0, 1, 1, 2]
    assert figs.counts["o0.cls"].tolist() == [1, 1, 0]
    # top probabilities 0.8 and 0.9 fall in the bins [.8, .9) and [.9, 1]
    assert figs.counts["o0.conf"].tolist() == [0] * 8 + [1, 1]


def test_integer_labels_count_unknown_labels_apart() -> None:
    x = np.random.default_rng(0).random((6, 3)).astype(np.float32)
    labels = np.array([3, 7, 7, 3, 9, 3], dtype=np.int64)
    ref = make_reference({"x": x}, {"label": labels}, task="classification")
    spec = spec_from_reference(ref)
    assert spec.outputs[0].labels == (3, 7, 9)
    figs = extract_figures(spec, {"x": x[:3]}, {"label": np.array([7, 5, 9])})
    assert figs.counts["o0.cls"].tolist() == [0, 1, 1, 1]


def test_a_spec_is_only_read_from_a_drift_reference() -> None:
    with pytest.raises(BundleError, match="not a drift reference"):
        DriftSpec.from_reference({"schema": "edgepack.bundle/1"})
    with pytest.raises(BundleError) as e:
        DriftSpec.from_reference({"schema": "edgepack.drift/1", "id": "x",
                                  "spec": {"inputs": [{"name": "a", "kind": "video"}],
                                           "outputs": [], "k": 32, "sample_rate": 0.1,
                                           "max_rows": 10}})
    assert e.value.context["field"] == "spec"


def test_the_agent_side_imports_no_host_or_onnx() -> None:
    code = ("import sys, numpy as np; from edgepack.agent import drift; "
            "spec = drift.DriftSpec((drift.InputSpec('x', 'tabular', features=(0,)),), ()); "
            "s = drift.DriftSketcher(spec, sample_rate=1.0); "
            "s.observe({'x': np.ones((2, 1), np.float32)}, {}); s.take_window(); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('onnx', 'tensorflow', "
            "'onnxruntime', 'sklearn') or m.startswith('edgepack.host')]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_threads_share_a_sketcher_and_every_call_is_counted(cnn: DigitsCnn) -> None:
    spec = dataclasses.replace(spec_from_reference(cnn.reference), max_rows=20_000)
    sketcher = DriftSketcher(spec, sample_rate=0.5, seed=0)
    x = cnn.split.stream[:1]
    y = cnn.logits(x)

    def serve() -> None:
        for _ in range(3000):
            sketcher.observe({IMAGE: x}, {LOGITS: y})

    threads = [threading.Thread(target=serve) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    payload = sketcher.take_window()
    assert payload["calls"] == 12_000
    assert payload["rows"] == payload["sampled"] == sum(payload["c"]["o0.cls"])
    assert 5000 <= payload["sampled"] <= 7000


def test_the_callers_buffers_are_copied_not_kept(cnn: DigitsCnn) -> None:
    sketcher = DriftSketcher(spec_from_reference(cnn.reference), sample_rate=1.0, seed=0)
    frame = np.full((1, 8, 8, 1), 0.25, np.float32)
    sketcher.observe({IMAGE: frame}, {LOGITS: cnn.logits(frame)})
    frame[:] = 1.0  # a camera reusing its buffer for the next frame
    blob = base64.b64decode(sketcher.take_window()["s"]["i0.c0"])
    assert kll_floats_sketch.deserialize(blob).get_max_value() == 0.25
