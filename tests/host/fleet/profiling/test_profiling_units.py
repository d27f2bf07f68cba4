"""Pure logic of profiling: job encoding and signatures, the onnxruntime trace summary, the
cache, eval payload bounds and device outputs. No broker, no agent."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest

from edgepack.agent.errors import DataError, ProtocolError
from edgepack.agent.profiler import summarize_ort_trace
from edgepack.agent.protocol import (
    MAX_EVAL_BYTES,
    MAX_JOB_BUNDLES,
    JobBundle,
    job_signed_part,
    parse_profile_job,
)
from edgepack.agent.signing import canonical_json, load_public_keys, verify_detached
from edgepack.host.build.data import Dataset, TensorSpec
from edgepack.host.fleet.profiling import ProfileCache, cache_key, make_job
from edgepack.host.fleet.profiling_choice import _device_outputs, _eval_payload

BID = "ab" * 32


def test_make_job_is_signed_over_its_canonical_json_and_parses_back(keys) -> None:
    ev = b"PK\x03\x04 npz bytes"
    job_id, payload = make_job([JobBundle(BID, bytes=1234, label="QDQ-U8S8-pc")],
                               key_path=keys.key, timeout_s=60, runs=7, warmup=2, eval_npz=ev)
    job = parse_profile_job(payload)
    assert (job.job_id, job.runs, job.warmup, job.eval_npz) == (job_id, 7, 2, ev)
    assert job.bundles[0] == JobBundle(BID, 1234, "QDQ-U8S8-pc")
    doc = json.loads(payload)
    assert isinstance(doc["ts"], float) and "ts" not in job_signed_part(doc)
    verify_detached(canonical_json(job_signed_part(doc)), job.sig, load_public_keys([keys.pub]),
                    what="profile job")


@pytest.mark.parametrize("change, match", [
    (lambda d: d.update(runs=5.5), "float"),
    (lambda d: d.update(bundles=[]), "1 to"),
    (lambda d: d.update(bundles=[{"bundle_id": BID}] * (MAX_JOB_BUNDLES + 1)), "1 to"),
    (lambda d: d["bundles"][0].update(bundle_id="xyz"), "sha256"),
    (lambda d: d.update(job_id="a/b"), "not allowed"),
    (lambda d: d.update(runs=0), "outside"),
    (lambda d: d["eval"].update(sha256="00" * 32), "do not match"),
    (lambda d: d["eval"].update(npz="A" * (MAX_EVAL_BYTES * 2)), "over"),
    (lambda d: d.pop("deadline"), "deadline"),
])
def test_malformed_jobs_are_protocol_errors(change, match) -> None:
    _, payload = make_job([JobBundle(BID)], key_path=None, timeout_s=10, eval_npz=b"x")
    doc = json.loads(payload)
    change(doc)
    with pytest.raises(ProtocolError, match=match):
        parse_profile_job(json.dumps(doc).encode())


def test_eval_over_the_job_limit_is_refused_on_the_host() -> None:
    with pytest.raises(DataError, match="over the"):
        make_job([JobBundle(BID)], key_path=None, timeout_s=10,
                 eval_npz=b"x" * (MAX_EVAL_BYTES + 1))


def _ev(cat: str, name: str, ts: int, dur: int, op: str | None = None) -> dict:
    return {"cat": cat, "name": name, "ts": ts, "dur": dur, "ph": "X",
            "args": {"op_name": op, "provider": "CPUExecutionProvider"} if op else {}}


def test_ort_trace_summary_averages_per_inference_and_skips_warmup() -> None:
    events = [_ev("Session", "model_run", 0, 1000), _ev("Node", "conv0_kernel_time", 10, 900,
                                                         "Conv")]  # warm-up, left out
    for k, t in enumerate((2000, 4000)):
        events += [_ev("Session", "model_run", t, 500),
                   _ev("Node", "conv0_kernel_time", t + 1, 300, "Conv"),
                   _ev("Node", "conv1_kernel_time", t + 301, 100 + 100 * k, "Conv"),
                   _ev("Node", "fc_kernel_time", t + 450, 50, "MatMul"),
                   _ev("Node", "fc_fence_before", t + 449, 1, "MatMul")]
    s = summarize_ort_trace(events, skip_runs=1)
    assert s["available"] and s["runs"] == 2 and s["run_ms"] == 0.5
    assert s["ops"][0] == {"op": "Conv", "ms": 0.45, "share": round(900 / 1000, 4), "nodes": 2}
    assert s["ops"][1]["op"] == "MatMul" and s["ops"][1]["ms"] == 0.05
    assert s["nodes"][0] == {"node": "conv0", "op": "Conv", "ms": 0.3}
    assert summarize_ort_trace([])["available"] is False


def test_cache_keeps_complete_results_per_board_and_eval_set(tmp_path) -> None:
    path = tmp_path / "c" / "profiles.json"
    cache = ProfileCache(path)
    key = cache_key("rpi4", "onnxruntime", "1.32.0", "cd" * 32, 0)
    res = {"status": "ok", "bundle_id": BID, "model_sha256": "cd" * 32,
           "latency_ms": {"p95": 2.0}, "eval": {"samples": 3, "outputs_npz": "QQ=="}}
    cache.put(key, {**res, "status": "partial"}, device_id="pi-1", job_id="j1")
    assert cache.get(key) is None, "partial results are not cached"
    cache.put(key, res, device_id="pi-1", job_id="j1", eval_fp="fp1")
    cache.save()
    again = ProfileCache(path)
    hit = again.get(key, "fp1")
    assert hit["latency_ms"] == {"p95": 2.0} and hit["cached"] and hit["measured_by"] == "pi-1"
    assert hit["eval"]["samples"] == 3
    assert again.get(key, "other-eval-set") is None  # the gate needs outputs on its samples
    assert "eval" not in again.get(key)  # figures only: edgepack profile sends no eval set
    assert again.get(cache_key("rpi5", "onnxruntime", "1.32.0", "cd" * 32, 0)) is None
    path.write_text("{not json")
    assert len(ProfileCache(path)) == 0


def test_eval_payload_is_model_shaped_and_bounded() -> None:
    x = np.arange(40 * 3 * 8 * 8, dtype=np.float32).reshape(40, 3, 8, 8)
    ds = Dataset({"x": x}, np.arange(40), "t")
    spec = [TensorSpec("x", "float32", (1, 3, 8, 8))]
    blob, n = _eval_payload(ds, 1, spec, MAX_EVAL_BYTES)
    with np.load(io.BytesIO(blob)) as z:
        assert z["input_0"].shape == (40, 1, 3, 8, 8)
    limit = 4096 + 512 + 2 * 768 + 100  # room for two samples of 768 bytes
    blob, n = _eval_payload(ds, 1, spec, limit)
    assert n == 2 and len(blob) <= limit
    with pytest.raises(DataError, match="more than a profile job carries"):
        _eval_payload(ds, 1, spec, 4000)


def test_device_outputs_are_reshaped_and_dequantized() -> None:
    buf = io.BytesIO()
    np.savez(buf, output_0=np.array([[[10, 20]], [[30, 40]]], dtype=np.int8),
             output_1=np.array([[3], [4]], dtype=np.int64))
    res = {"eval": {"samples": 2, "outputs_npz": base64.b64encode(buf.getvalue()).decode()}}
    meta = [{"quantization": {"scale": 0.5, "zero_point": 10}}, {"quantization": None}]
    arrays, k = _device_outputs(res, 3, 1, meta)
    assert k == 2 and arrays[2] is None
    np.testing.assert_allclose(arrays[0], [[0.0, 5.0], [10.0, 15.0]])
    assert arrays[1].tolist() == [3, 4]


def test_litert_bundle_is_measured_and_says_it_has_no_op_profiler(tmp_path) -> None:
    from edgepack.agent.bundle import read_bundle
    from edgepack.agent.profiler import MeasureOptions, measure_bundle
    from edgepack.agent.runtimes import available_runtimes
    from edgepack.host.build.package import npz_bytes, write_bundle

    if "litert" not in available_runtimes():
        pytest.skip("no LiteRT interpreter installed")
    tflite = Path(__file__).resolve().parents[3] / "agent" / "data" / "relu8.tflite"  # relu(2x - 1)
    xs = np.random.default_rng(0).standard_normal((4, 1, 8)).astype(np.float32)
    spec = {"name": "x", "dtype": "float32", "shape": [1, 8], "quantization": None}
    manifest = {"name": "relu", "version": "1.0.0", "target": "rpi4",
                "model": {"file": "model.tflite", "format": "tflite", "inputs": [spec],
                          "outputs": [{**spec, "name": "y"}]},
                "runtime": {"name": "litert", "min_version": "1.0", "threads": 1},
                "health": {"golden": "golden.npz", "samples": 4, "atol": 1e-5, "rtol": 1e-5},
                "budgets": {"p95_ms": 100, "peak_rss_mb": 1024, "model_mb": 1}}
    bundle = write_bundle(tmp_path / "relu.edgepack", manifest, tflite.read_bytes(),
                          {"golden.npz": npz_bytes({"input_0": xs,
                                                    "output_0": np.maximum(2 * xs - 1, 0)})})
    d = read_bundle(bundle).extract(tmp_path / "slot")
    np.savez(tmp_path / "eval.npz", input_0=xs[:3])
    steps: list[str] = []
    out = measure_bundle(d, MeasureOptions(runs=20, warmup=2, eval_path=str(tmp_path /
                                                                             "eval.npz")),
                         report=lambda doc: steps.append(doc["stage"]))
    assert steps == ["loaded", "first", "golden", "eval", "latency", "done"]
    assert out["runtime"] == "litert" and out["golden"]["passed"]
    assert out["latency_ms"]["runs"] == 20 and out["eval"]["samples"] == 3
    assert out["ops"]["available"] is False and "benchmark_model" in out["ops"]["reason"]
    assert out["ops"]["op_counts"], "the op list is still reported"


def test_a_v2_job_is_bound_to_its_device_and_names_bundles_and_samples_as_targets(
        keys, tmp_path) -> None:
    from edgepack.agent.trust import DesiredGate, Target
    from edgepack.agent.trust.errors import ControlRefused
    from edgepack.host.fleet.profiling import sign_profile_job

    ev = Target("cd" * 32, 700_000, "eval")
    job_id, payload = sign_profile_job([JobBundle(BID, bytes=1234, label="fp32")],
                                       key_path=keys.key, device="pi-1", fleet="f",
                                       timeout_s=60, runs=7, eval_target=ev)
    gate = DesiredGate(tmp_path / "pi-1", device_id="pi-1", fleet="f", trusted_keys=[keys.pub])
    v = gate.job(payload)
    assert v.new and v.kind == "job" and v.fields["job"]["job_id"] == job_id
    assert {(t.bundle_id, t.length) for t in v.targets} == {(BID, 1234), (ev.bundle_id, 700_000)}
    assert v.fields["job"]["eval"] == {"sha256": ev.bundle_id, "bytes": 700_000}
    assert not gate.job(payload).new  # the same message again: recognised, not new
    again = DesiredGate(tmp_path / "pi-1", device_id="pi-1", fleet="f",
                        trusted_keys=[keys.pub])
    assert not again.job(payload).new  # after a restart too (the ledger is on disk)
    other = DesiredGate(tmp_path / "pi-2", device_id="pi-2", fleet="f", trusted_keys=[keys.pub])
    with pytest.raises(ControlRefused, match="pi-1") as exc:
        other.job(payload)
    assert exc.value.reason == "wrong_device"
