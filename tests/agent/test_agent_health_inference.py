"""Health gate, runtimes, the Python inference API and the local endpoint."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from edgepack.agent.bundle import read_bundle
from edgepack.agent.errors import DataError
from edgepack.agent.health import HealthOptions, check_model, run_health_check
from edgepack.agent.inference import (
    Client,
    InferenceServer,
    InferenceService,
    Model,
    NoModelError,
)
from edgepack.agent.runtimes import available_runtimes, runtime_version
from edgepack.agent.telemetry import LatencyStats


@pytest.fixture(scope="module")
def slot(tmp_path_factory, bundles):
    d = tmp_path_factory.mktemp("slot")
    read_bundle(bundles.get("1.0.0")).extract(d)
    return d


def _slot(tmp_path, bundle):
    read_bundle(bundle).extract(tmp_path)
    return tmp_path


def test_health_passes_and_measures(slot):
    # In process, the peak RSS is the whole test worker's (VmHWM), so the budgets are
    # left to the child-process check below, which is how the agent runs the gate.
    r = check_model(slot, HealthOptions(runs=30, warmup=2, enforce_budgets=False))
    assert r.passed, r.failures
    assert r.samples == 8 and {o["name"] for o in r.outputs} == {"logits", "label"}
    assert r.latency_ms["runs"] == 30 and 0 < r.latency_ms["p50"] <= r.latency_ms["p95"]
    assert r.peak_rss_mb >= r.baseline_rss_mb > 0 and r.runtime == "onnxruntime"


def test_health_in_a_child_process(slot):
    r = run_health_check(slot, HealthOptions(runs=10))
    assert r.passed and r.peak_rss_mb > 0 and "passed" in r.summary()
    assert r.budgets["peak_rss_mb"] and r.peak_rss_mb <= r.budgets["peak_rss_mb"]


def test_wrong_golden_outputs_fail(tmp_path, bundles):
    r = check_model(_slot(tmp_path, bundles.get("1.1.0", broken=True)))
    assert not r.passed
    assert any("logits" in f and "cosine" in f for f in r.failures)
    assert any("label agreement" in f for f in r.failures)


def test_budgets_fail_the_gate(tmp_path, bundles):
    b = bundles.get("1.2.0", budgets={"p95_ms": 1e-6, "peak_rss_mb": 1, "model_mb": 100})
    r = check_model(_slot(tmp_path, b))
    assert not r.passed and len(r.failures) == 2
    assert "p95 latency" in r.failures[0] and "peak RSS" in r.failures[1]
    assert check_model(tmp_path, HealthOptions(enforce_budgets=False)).passed


def test_a_model_that_crashes_the_runtime_fails_cleanly(tmp_path, bundles):
    d = _slot(tmp_path, bundles.get("1.0.0"))
    (d / "model.onnx").write_bytes(b"\x08\x07garbage" * 10)
    r = run_health_check(d, HealthOptions(runs=5))
    assert not r.passed and "cannot load" in r.failures[0]


def test_runtimes_are_found_without_importing_them():
    code = ("import sys; from edgepack.agent.runtimes import available_runtimes as a; "
            "import edgepack.agent.daemon; print(a()); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('onnxruntime', 'onnx', 'tensorflow', 'ai_edge_litert') or "
            "m.startswith('edgepack.host')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert "onnxruntime" in out[0] and out[1] == "[]"
    assert runtime_version("onnxruntime")


TFLITE = Path(__file__).parent / "data" / "relu8.tflite"  # y = relu(2x - 1), x: float32[1, 8]


def test_tflite_runtime_behind_the_same_interface(tmp_path, keys):
    if "litert" not in available_runtimes():
        pytest.skip("no LiteRT interpreter installed")
    from edgepack.agent.runtimes import open_model
    from edgepack.host.build.package import npz_bytes, write_bundle
    from edgepack.host.keys import sign_bytes

    sess = open_model(TFLITE, "litert", threads=1)
    assert sess.inputs[0].shape == (1, 8) and sess.inputs[0].dtype == "float32"
    x = np.linspace(-1, 1, 8, dtype=np.float32)[None]
    (y,) = sess.run({sess.inputs[0].name: x})
    np.testing.assert_allclose(y, np.maximum(x * 2 - 1, 0), rtol=1e-6)

    # a LiteRT bundle through the health gate and the Python API
    xs = np.random.default_rng(0).standard_normal((4, 1, 8)).astype(np.float32)
    ys = np.maximum(xs * 2 - 1, 0)
    spec = lambda t: {"name": t.name, "dtype": "float32", "shape": [1, 8],  # noqa: E731
                      "quantization": None}
    manifest = {"name": "relu", "version": "1.0.0", "target": "rpi4",
                "model": {"file": "model.tflite", "format": "tflite",
                          "inputs": [spec(sess.inputs[0])], "outputs": [spec(sess.outputs[0])]},
                "runtime": {"name": "litert", "min_version": "1.0", "threads": 1},
                "health": {"golden": "golden.npz", "samples": 4, "atol": 1e-5, "rtol": 1e-5,
                           "min_cosine": 0.9999, "min_label_agreement": 1.0},
                "budgets": {"p95_ms": 100, "peak_rss_mb": 1024, "model_mb": 1}}
    bundle = write_bundle(tmp_path / "relu.edgepack", manifest, TFLITE.read_bytes(),
                          {"golden.npz": npz_bytes({"input_0": xs, "output_0": ys})},
                          sign=lambda d: sign_bytes(d, keys.private))
    d = _slot(tmp_path / "slot", bundle)
    r = run_health_check(d, HealthOptions(runs=10))
    assert r.passed and r.runtime == "litert", r.failures
    m = Model.open(d)
    np.testing.assert_allclose(m.predict(xs[0][0])[sess.outputs[0].name], ys[0], rtol=1e-6)


def test_python_api(bundles):
    stats = LatencyStats()
    m = Model.open(bundles.get("1.0.0"), stats=stats)
    assert m.name == "tiny" and m.version == "1.0.0" and len(m.bundle_id) == 64
    x = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    a = m.predict(x)  # no batch axis: added
    b = m.predict({"x": x[None].astype(np.float64)})  # dtype converted
    c = m.predict([x.tolist()])
    for out in (b, c):
        np.testing.assert_allclose(a["logits"], out["logits"], rtol=1e-6)
    assert a["label"].dtype == np.int64
    with pytest.raises(DataError, match="unknown input"):
        m.predict({"x": x, "y": x})
    w = stats.drain()
    assert w.inferences == 3 and w.errors == 1 and w.p95 > 0
    assert m.describe()["inputs"][0]["name"] == "x"


def test_endpoint_unix_and_http(tmp_path, bundles):
    stats = LatencyStats()
    service = InferenceService(stats)
    server = InferenceServer(service, socket_path=tmp_path / "a.sock",
                             http="127.0.0.1:0").start()
    try:
        client = Client(f"unix:{tmp_path / 'a.sock'}")
        with pytest.raises(NoModelError):
            client.predict({"x": np.zeros((1, 64), np.float32)})
        service.swap(Model.open(bundles.get("1.0.0"), stats=stats))
        x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
        out = client.predict({"x": x})
        assert out["logits"].shape == (1, 10) and out["label"].dtype == np.int64
        out2 = client.predict(x)  # npy for a one-input model
        np.testing.assert_array_equal(out["logits"], out2["logits"])
        host, port = server.http_address
        http = Client(f"http://{host}:{port}")
        assert http.info()["version"] == "1.0.0"
        req = urllib.request.Request(f"http://{host}:{port}/v1/predict", method="POST",
                                     data=json.dumps({"inputs": {"x": x.tolist()}}).encode(),
                                     headers={"Content-Type": "application/json"})
        doc = json.loads(urllib.request.urlopen(req, timeout=5).read())
        np.testing.assert_allclose(doc["outputs"]["logits"], out["logits"], rtol=1e-6)
        assert doc["dtypes"]["label"] == "int64" and doc["latency_ms"] > 0
        bad = urllib.request.Request(f"http://{host}:{port}/v1/predict", method="POST",
                                     data=b'{"inputs": {"z": [1]}}')
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(bad, timeout=5)
        assert e.value.code == 400
        w = stats.drain()
        assert w.inferences == 3 and w.errors == 1  # every call was timed
    finally:
        server.close()
    assert not (tmp_path / "a.sock").exists()
