"""The accuracy gate, its report, the float fallback, held-out data and variant choice."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from build_models import IN_NAME

from edgepack.agent.errors import GateError
from edgepack.agent.profiles import load_profile
from edgepack.host.build import build
from edgepack.host.build.backends.onnx import PREFER_DEFAULT
from edgepack.host.build.choose import EQUAL_SIZE


def _manifest(path) -> dict:
    with zipfile.ZipFile(path) as zf:
        return json.loads(zf.read("manifest.json"))


def test_digits_int8_accuracy_within_two_points_of_fp32(digits_vnni):
    acc = digits_vnni.report.metrics["accuracy"]

    assert acc["basis"] == "accuracy vs labels"
    assert acc["samples"] == 360
    assert acc["accuracy_fp32"] > 0.9
    assert acc["accuracy_optimized"] >= acc["accuracy_fp32"] - 0.02
    assert acc["drop_points"] == pytest.approx(
        100 * (acc["accuracy_fp32"] - acc["accuracy_optimized"]))
    assert acc["top1_agreement"] >= 0.97


def test_report_gives_size_accuracy_error_and_latency(digits_vnni):
    m = digits_vnni.report.metrics

    size = m["size"]
    assert size["fp32_bytes"] > size["optimized_bytes"] > 0
    assert size["ratio"] == pytest.approx(size["fp32_bytes"] / size["optimized_bytes"])
    acc = m["accuracy"]
    for key in ("top1_agreement", "accuracy_fp32", "accuracy_optimized"):
        assert 0.0 <= acc[key] <= 1.0
    assert 0.5 < acc["min_cosine"] <= 1.0 + 1e-9
    assert acc["max_abs_error"] > 0.0  # int8 is not bit-exact
    lat = m["latency"]
    for which in ("fp32", "optimized"):
        assert 0 < lat[which]["p50_ms"] <= lat[which]["p95_ms"]
        assert lat[which]["runs"] >= 50
    assert lat["speedup_p50"] == pytest.approx(
        lat["fp32"]["p50_ms"] / lat["optimized"]["p50_ms"])
    # the manifest carries the same figures for the device side
    mm = _manifest(digits_vnni.path)["metrics"]
    assert mm["size_ratio"] == pytest.approx(size["ratio"])
    assert mm["accuracy_fp32"] == acc["accuracy_fp32"]
    assert mm["accuracy_optimized"] == acc["accuracy_optimized"]
    assert mm["min_cosine"] == acc["min_cosine"]
    assert mm["max_abs_error"] == acc["max_abs_error"]
    assert set(mm["host_latency_ms"]["fp32"]) >= {"p50_ms", "p95_ms"}
    assert set(mm["host_latency_ms"]["optimized"]) >= {"p50_ms", "p95_ms"}


def test_variants_on_x86_vnni_choose_the_fastest_passing(digits_vnni):
    q = load_profile("x86-64-vnni").quantization
    expected = list(dict.fromkeys(s.label for s in (q.scheme, *q.candidates)))

    rows = digits_vnni.report.variants

    assert [r["scheme"] for r in rows] == expected
    chosen = [r for r in rows if r["result"] == "chosen"]
    assert len(chosen) == 1
    best = chosen[0]
    assert best["passed"] is True
    assert best["drop_points"] <= q.max_drop_points
    passing = [r for r in rows if r["passed"]]
    fastest = min(r["latency"]["p50_ms"] for r in passing)
    # Speeds within PREFER_DEFAULT (EQUAL_SPEED) of the fastest are equal; among them the
    # smallest ships (sizes within EQUAL_SIZE are equal), and among equals the profile's default.
    near = [r for r in passing if r["latency"]["p50_ms"] <= fastest * PREFER_DEFAULT]
    smallest = min(r["bytes"] for r in near)
    compact = [r for r in near if r["bytes"] <= smallest * EQUAL_SIZE]
    assert best in compact
    if rows[0] in compact:
        assert best is rows[0]
    else:
        assert best["latency"]["p50_ms"] == min(r["latency"]["p50_ms"] for r in compact)
    for r in rows:
        if r is not best:
            assert r["result"].startswith(("slower", "p50") if r["passed"] else "gate")
    # The shipped model and the manifest describe the chosen scheme.
    scheme = next(s for s in (q.scheme, *q.candidates) if s.label == best["scheme"])
    opt = _manifest(digits_vnni.path)["optimization"]
    assert opt["format"] == scheme.format
    assert opt["activation_type"] == scheme.activation_type
    assert opt["weight_type"] == scheme.weight_type
    assert opt["per_channel"] == scheme.per_channel
    assert best["scheme"] in opt["summary"]
    assert _manifest(digits_vnni.path)["model"]["bytes"] == best["bytes"]


def test_int8_slower_than_fp32_is_said_loudly(digits_vnni):
    lat = digits_vnni.report.metrics["latency"]
    report_warnings = digits_vnni.report.warnings
    manifest_warnings = _manifest(digits_vnni.path)["optimization"]["warnings"]

    slower = lat["speedup_p50"] < 1.0
    assert any("SLOWER" in w for w in report_warnings) == slower
    assert any("SLOWER" in w for w in manifest_warnings) == slower


def test_no_variants_when_the_host_cannot_time_the_target(mlp, tmp_path):
    # rpi4 is ARM: timing candidates on this x86 host would say nothing about the Pi.
    result = build(model=str(mlp.model), target="rpi4", quantize="int8",
                   calibration=str(mlp.calib), eval=str(mlp.eval),
                   out=str(tmp_path), variants=True)

    assert result.report.variants is None
    assert result.report.metrics["latency"]["representative"] is False
    assert any("not on Cortex-A72" in w for w in result.report.warnings)


def test_calibration_is_held_out_when_eval_is_missing(mlp, tmp_path):
    result = build(model=str(mlp.model), target="rpi4", quantize="int8",
                   calibration=str(mlp.calib), out=str(tmp_path),
                   variants=False)

    acc = result.report.metrics["accuracy"]
    assert "held out" in acc["source"]
    assert acc["samples"] == 40  # 20% of 200
    assert result.report.optimization["calibration_samples"] == 160
    assert "held out" in _manifest(result.path)["metrics"]["eval_source"]
    assert acc["basis"] == "top-1 agreement with fp32"  # the calibration file has no labels


def test_all_zero_calibration_really_breaks_plain_int8(mlp, tmp_path):
    """Precondition of the fallback test: without help, this int8 model fails any strict gate."""
    from edgepack.agent.profiles import load_profile
    from edgepack.host.build.convert_onnx import prepare_onnx
    from edgepack.host.build.data import load_dataset
    from edgepack.host.build.quantize import quantize_static
    from edgepack.host.build.validate import Session, run_outputs

    zeros = tmp_path / "zeros.npz"
    np.savez(zeros, **{IN_NAME: np.zeros((8, 64), np.float32)})
    prepared = prepare_onnx(mlp.model, opset=17)
    calib = load_dataset(zeros, prepared.inputs)
    evalset = load_dataset(mlp.eval, prepared.inputs, what="eval")

    res = quantize_static(prepared.model_bytes, calib, load_profile("rpi4").quantization.scheme)
    out = run_outputs(Session(res.model_bytes), evalset).arrays[0]

    assert (out.argmax(1) == mlp.y_test).mean() < 0.8


def test_gate_failure_keeps_sensitive_nodes_in_float_or_explains(mlp, tmp_path):
    zeros = tmp_path / "zeros.npz"
    np.savez(zeros, **{IN_NAME: np.zeros((8, 64), np.float32)})
    cfg = dict(model=str(mlp.model), target="rpi4", quantize="int8",
               calibration=str(zeros), eval=str(mlp.eval), max_drop=0.0,
               out=str(tmp_path / "dist"), variants=False)

    try:
        result = build(**cfg)
    except GateError as exc:
        assert "kept:" in str(exc)
        assert any(n in str(exc) for n in ("fc1", "act", "fc2"))
        assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").iterdir())
    else:
        opt = result.report.optimization
        assert opt["nodes_in_float"]
        assert set(opt["nodes_in_float"]) <= {"fc1", "act", "fc2"}
        assert result.report.metrics["accuracy"]["drop_points"] <= 0.0
        assert f"{len(opt['nodes_in_float'])} node(s) in float" in opt["summary"]


def test_default_build_searches_fp32_dynamic_and_static_and_never_ships_slower_int8(
        tmp_path):
    """A regression MLP (one continuous output) with 64 calibration rows and no eval set: the
    13 held-out rows gate it by relative error and cosine, never by top-1; the search weighs
    fp32, dynamic and the static schemes and ships no quantized model slower than fp32."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1, w2 = rng.normal(size=(32, 64)).astype(np.float32), rng.normal(size=(64, 1))
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W1"], ["h"], name="fc1"),
         helper.make_node("Relu", ["h"], ["r"], name="act"),
         helper.make_node("Gemm", ["r", "W2"], ["y"], name="fc2")],
        "reg", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
        [numpy_helper.from_array(w1, "W1"),
         numpy_helper.from_array((w2 / 8).astype(np.float32), "W2")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              tmp_path / "reg.onnx")
    np.savez(tmp_path / "calib.npz", x=rng.normal(size=(64, 32)).astype(np.float32))

    result = build(model=str(tmp_path / "reg.onnx"), target="x86-64-vnni",
                   calibration=str(tmp_path / "calib.npz"), out=str(tmp_path / "dist"),
                   max_drop=5.0)

    acc = result.report.metrics["accuracy"]
    assert acc["basis"] == "relative error and cosine similarity with fp32"
    assert acc["top1_agreement"] is None and acc["samples"] == 13
    rows = result.report.variants
    assert [r["scheme"] for r in rows][:2] == ["fp32", "dynamic-S8-pc"]
    q = load_profile("x86-64-vnni").quantization
    assert {s.label for s in (q.scheme, *q.candidates)} <= {r["scheme"] for r in rows}
    chosen = [r for r in rows if r["result"] == "chosen"]
    assert len(chosen) == 1
    fp32 = rows[0]
    if chosen[0] is not fp32:
        assert chosen[0]["latency"]["p50_ms"] <= fp32["latency"]["p50_ms"]
    for r in rows:
        if r["mode"] != "none" and r["passed"] and r["latency"]["p50_ms"] > \
                fp32["latency"]["p50_ms"]:
            assert r["result"].startswith("slower than fp32")
    opt = _manifest(result.path)["optimization"]
    assert opt["chosen_by"] == chosen[0]["why"]
    assert opt["mode"] == chosen[0]["mode"]
    assert "forced" not in opt
