"""A TFLite bundle with int8 weights and uint8 I/O carries drift.json made in float terms, and a
real ``edgepack-agent`` (LiteRT, a real Mosquitto) sketches its inferences the same way: windows
judged by the fleet server's judge stay quiet on unseen digits and alert on inverted ones."""

from __future__ import annotations

import json

import numpy as np
import pytest
from agent_helpers import TARGET, AgentProcess, Watcher, agent_config, deploy
from drift_models import digits_split
from tflite_models import keras_digits, tflite_bundle

from edgepack.agent.bundle import read_bundle
from edgepack.agent.drift import DriftSpec
from edgepack.agent.inference import Client
from edgepack.host.build.drift_reference import REFERENCE_MEMBER
from edgepack.host.fleet.drift import decode_window, judge, load_reference, merge_windows

pytestmark = pytest.mark.broker

DEV = "cam-tflite"


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory: pytest.TempPathFactory, keys) -> object:
    d = tmp_path_factory.mktemp("tflite-int8-drift")
    return tflite_bundle(keras_digits(tmp_path_factory), d / "out", target=TARGET, int8=True,
                         key=keys.key)


def test_int8_bundle_reference_is_in_float_terms(int8_bundle):
    r = int8_bundle
    assert r.report.optimization["io_type"] == "uint8"
    [tensor_in], [tensor_out] = r.manifest["model"]["inputs"], r.manifest["model"]["outputs"]
    assert tensor_in["dtype"] == tensor_out["dtype"] == "uint8"
    raw = read_bundle(r.path).read_member(REFERENCE_MEMBER)
    ref, spec = load_reference(raw), DriftSpec.from_reference(json.loads(raw))
    [s_in], [s_out] = spec.inputs, spec.outputs
    assert (s_in.name, s_in.kind, s_in.scale, s_in.zero_point) == (
        tensor_in["name"], "image", pytest.approx(tensor_in["quantization"]["scale"]),
        tensor_in["quantization"]["zero_point"])
    assert (s_out.name, s_out.kind, s_out.classes, s_out.scale, s_out.zero_point) == (
        tensor_out["name"], "probabilities", 10,
        pytest.approx(tensor_out["quantization"]["scale"]),
        tensor_out["quantization"]["zero_point"])
    assert s_out.activation == "softmax"  # dequantized logits, not probabilities
    # pixels as the model sees them, dequantized: [0, 1], not 0..255
    assert ref.figures["i0.px"].edges[0] >= 0.0 and ref.figures["i0.px"].edges[-1] <= 1.0
    assert 0.2 < ref.figures["i0.c0"].mean < 0.5
    classes = np.asarray(ref.figures["o0.cls"].counts, dtype=float) / ref.rows
    assert classes.sum() == pytest.approx(1.0) and classes[:10].min() > 0.03
    entry = r.report.model["drift"]
    assert entry["id"] == ref.id and entry["figures"] == 4 and ref.rows > 300
    assert entry["dequantized"] == sorted([tensor_in["name"], tensor_out["name"]])


def test_a_quantized_tflite_packaged_as_given_is_profiled_on_the_builds_data(
        int8_bundle, tmp_path):
    from edgepack.host.build import build

    model = tmp_path / "digits_uint8.tflite"
    model.write_bytes(read_bundle(int8_bundle.path).read_member("model.tflite"))
    np.savez(tmp_path / "eval.npz", image=digits_split().reference[300:])
    r = build(model=str(model), target="rpi4", eval=str(tmp_path / "eval.npz"),
              out=str(tmp_path / "out"), variants=False)
    assert r.report.optimization["requested"] == "as-is"
    raw = read_bundle(r.path).read_member(REFERENCE_MEMBER)
    ref, spec = load_reference(raw), DriftSpec.from_reference(json.loads(raw))
    assert ref.rows == 100 and r.report.model["drift"]["rows"] == 100  # the eval set
    assert spec.inputs[0].scale > 0 and spec.outputs[0].scale > 0
    assert len(r.report.model["drift"]["dequantized"]) == 2


def _windows(w: Watcher, since: int) -> list[dict]:
    return [t["drift"] for t in w.telemetry[since:] if t.get("drift")]


def _verdict(ref: object, windows: list[dict]) -> object:
    return judge(ref, merge_windows(decode_window(x) for x in windows))


def test_agent_sketches_the_tflite_bundle_and_inverted_images_alert(
        int8_bundle, tmp_path, mosquitto, fleet, keys):
    from datasketches import kll_floats_sketch

    ref = load_reference(read_bundle(int8_bundle.path).read_member(REFERENCE_MEMBER))
    cfg = agent_config(tmp_path / "dev", mosquitto.url, fleet, device_id=DEV, pub=keys.pub,
                       drift={"sample_rate": 1.0})
    agent = AgentProcess(cfg).start()
    try:
        with Watcher(mosquitto.url, fleet, DEV) as w:
            w.wait_state(lambda s: s.get("online") is True)
            bid, _ = deploy(mosquitto.url, fleet, int8_bundle.path, key=keys.key, device_id=DEV)
            w.wait_active(bid, timeout=60)
            client = Client(f"unix:{cfg.parent / 'data' / 'agent.sock'}")
            [name] = [t["name"] for t in int8_bundle.manifest["model"]["inputs"]]
            stream = digits_split().stream
            start = len(w.telemetry)
            w.wait(lambda: len(w.telemetry) > start + 1, 30, "a fresh telemetry window")

            # ---- in-distribution: unseen digits as floats, one a call (the agent quantizes)
            t0 = len(w.telemetry)
            for x in stream[:400]:
                client.predict({name: x[None]})
            quiet = w.wait(lambda: (ws := _windows(w, t0)) and sum(x["calls"] for x in ws)
                           >= 400 and ws, 30, "the in-distribution windows")
            assert all(x["ref"] == ref.id for x in quiet)
            v = _verdict(ref, quiet)
            assert v.rows == 400 and v.judged and not v.alert and v.score < 1.0, v.to_dict()
            # the agent sketched dequantized pixels, as the reference holds them
            px = kll_floats_sketch.deserialize(decode_window(quiet[-1]).sketches["i0.px"])
            assert px.get_min_value() >= 0.0 and px.get_max_value() <= 1.0

            # ---- a shifted stream: the same digits inverted (1 - x), flagged in three windows
            t1 = len(w.telemetry)
            for x in stream[:600]:
                client.predict({name: 1.0 - x[None]})
            shifted = w.wait(lambda: len(ws := _windows(w, t1)) >= 3 and ws[:3], 30,
                             "three windows of the shifted stream")
            v = _verdict(ref, shifted)
            assert v.judged and v.alert and v.score >= 1.0, v.to_dict()
            alerting = {f.key for f in v.alerts}
            assert "i0.c0" in alerting and "o0.conf" in alerting, alerting
        assert agent.stop() == 0
    finally:
        if agent.alive:
            agent.kill9()
