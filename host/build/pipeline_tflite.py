"""``edgepack build`` for TFLite and TFLite Micro targets: convert → optimize → gate → package.

The TFLite twin of :func:`edgepack.host.build.pipeline.run_build`, called by it when the target's first
format is ``tflite``/``tflm`` or the user asked for ``--format tflite``. The float32 TFLite model
run in LiteRT is the reference; every candidate (full int8, dynamic, fp16, selective int8) runs in
LiteRT on the same samples through the same gate (``edgepack.host.build.validate``), and the bundle and
report have the ONNX build's structure.

Integer-only targets (Edge TPU, microcontrollers) never get a float fallback: an op without an
int8 kernel, an op the Edge TPU does not map, or a gate failure is an error naming the layers.
"""

from __future__ import annotations

import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.agent.errors import BudgetError, DataError, GateError, ModelError
from edgepack.agent.profiles import Profile
from edgepack.host.build.convert_tflite import (
    LiteRTSession,
    TFLiteResult,
    compile_edgetpu,
    edgetpu_shape_warnings,
    edgetpu_unsupported_ops,
    layer_ops,
    non_int8_ops,
    onnx_to_saved_model,
    quantize_keeping_float,
    rank_sensitive_layers,
    tflite_ops,
    to_tflite,
)
from edgepack.host.build.data import Dataset, TensorSpec
from edgepack.host.build.pipeline import (
    BuildConfig,
    BuildResult,
    _created,
    _golden,
    _health,
    _host_threads,
    _load_inputs,
    _toolchain,
    host_cpu,
    package_build,
)
from edgepack.host.build.report import Progress
from edgepack.host.build.validate import GateMetrics, Outputs, compare, measure_latency, run_outputs

__all__ = ["run_tflite_build", "wants_tflite"]

LITERT_MIN_VERSION = "2.14"  # tflite-runtime 2.14 / any ai-edge-litert run these models
_BOUNDARY = ("QUANTIZE", "DEQUANTIZE")


def wants_tflite(cfg: Any, profile: Profile) -> bool:
    """True when ``run_build`` should hand the build to :func:`run_tflite_build`."""
    fmt = getattr(cfg, "format", None)
    if fmt:
        return fmt in ("tflite", "tflm")
    return profile.runtime.formats[0] in ("tflite", "tflm")


@dataclass(frozen=True)
class _Specs:
    """What the shared pipeline helpers need of a model: input and output specs."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass
class _Candidate:
    result: TFLiteResult
    session: LiteRTSession
    metrics: GateMetrics
    outputs: Outputs
    latency: dict

    @property
    def label(self) -> str:
        r = self.result
        extra = f" +{len(r.float_layers)} float" if r.float_layers else ""
        io = f" {r.io_type} I/O" if r.mode == "int8" else ""
        return f"{r.mode}{io}{extra}"


def _is_edgetpu(profile: Profile) -> bool:
    return "edgetpu" in profile.runtime.delegates or "edgetpu" in profile.hardware.accelerators


def _source(cfg: BuildConfig, imported: Any, workdir: str) -> tuple[str | None, bytes | None,
                                                                     list[str]]:
    """``(saved_model_dir, tflite_bytes, notes)`` from the importer's result (or the path)."""
    notes = list(getattr(imported, "notes", None) or [])
    if imported is not None:
        if getattr(imported, "tflite_bytes", None):
            return None, bytes(imported.tflite_bytes), notes
        if getattr(imported, "saved_model_dir", None):
            return str(imported.saved_model_dir), None, notes
        if getattr(imported, "float_only", False):
            raise ModelError(f"{Path(cfg.model).name} is a "
                             f"{getattr(imported, 'kind', 'model')} with no TFLite path (no int8 "
                             "kernels either): pick a target that runs ONNX.")
        if getattr(imported, "onnx_path", None):
            return str(onnx_to_saved_model(imported.onnx_path, workdir, cfg.target)), None, notes + [
                "ONNX converted to TensorFlow with onnx2tf"]
    src = Path(cfg.model)
    if src.is_dir() and (src / "saved_model.pb").exists():
        return str(src), None, notes
    if src.suffix.lower() == ".tflite":
        try:
            return None, src.read_bytes(), notes
        except OSError as exc:
            raise ModelError(f"cannot read {src}: {exc.strerror}") from None
    if src.suffix.lower() == ".onnx":
        return str(onnx_to_saved_model(src, workdir, cfg.target)), None, notes
    raise ModelError(f"{src} is not a SavedModel directory or a .tflite file (Keras models come "
                     "through the importer)")


def _measure(res: TFLiteResult, specs: _Specs, evalset: Dataset, ref: Outputs, batch: int,
             threads: int, feed: dict) -> _Candidate:
    sess = LiteRTSession(res.model_bytes, threads)
    outs = run_outputs(sess, evalset, batch)
    metrics = compare(specs.outputs, ref, outs, evalset.labels)
    return _Candidate(res, sess, metrics, outs, measure_latency(sess, feed))


def _names(ops: list) -> str:
    return ", ".join(f"{o.layer} ({o.op})" for o in ops[:12]) + (
        f" and {len(ops) - 12} more" if len(ops) > 12 else "")


def _check_integer_only(model_bytes: bytes, profile: Profile) -> None:
    """Every op int8 (I/O boundary (de)quantize excepted when the model I/O is float)."""
    bad = [o for o in non_int8_ops(model_bytes) if o.op not in _BOUNDARY]
    if bad:
        raise GateError(f"{profile.name} runs integer-only kernels, but these layers are not "
                        f"int8: {_names(bad)}. Replace them with int8-capable layers or pick a "
                        "CPU target.", target=profile.name, stage="gate")


def _check_edgetpu(model_bytes: bytes, profile: Profile, io_type: str) -> None:
    bad = [o for o in edgetpu_unsupported_ops(model_bytes)
           if not (io_type == "float32" and o.op in _BOUNDARY)]
    if bad:
        raise GateError(
            f"the Edge TPU does not run these layers: {_names(bad)}. The compiler would stop the "
            "TPU segment at the first one and run the rest on the host CPU. Replace them with "
            "supported ops (e.g. ReLU/ReLU6 instead of LeakyReLU/HardSwish) — see Coral's "
            "supported-operations list.", target=profile.name, stage="gate")


def _int8(cfg: BuildConfig, profile: Profile, sm_dir: str, fp32: TFLiteResult, specs: _Specs,
          calib: Dataset, evalset: Dataset, ref: Outputs, ctx: dict, max_drop: float,
          progress: Progress, report: dict) -> _Candidate:
    """Full int8; on CPU targets failing the gate, layers kept in float, then dynamic range."""
    integer_only = profile.runtime.integer_only
    io_type = getattr(cfg, "tflite_io", None) or profile.quantization.tflite_io
    batch, threads, feed = ctx["batch"], ctx["threads"], ctx["feed"]
    with progress.stage(f"int8 TFLite calibration ({len(calib)} samples)", total=len(calib)):
        res = to_tflite(sm_dir, "int8", calib=calib, io_type=io_type,
                        integer_only=integer_only, batch=batch)
    if integer_only:
        _check_integer_only(res.model_bytes, profile)
    if _is_edgetpu(profile):
        _check_edgetpu(res.model_bytes, profile, io_type)
    with progress.stage("int8 TFLite validation"):
        cand = _measure(res, specs, evalset, ref, batch, threads, feed)
    tried = [cand]
    if cand.metrics.drop_points <= max_drop:
        return cand
    sample = evalset.take(slice(0, min(len(evalset), 32)))
    with progress.stage("ranking sensitive layers"):
        ranked = [n for n, _ in rank_sensitive_layers(fp32.model_bytes, calib, sample)]
    if integer_only:
        worst = ", ".join(n.split(";")[0] for n in ranked[:3]) or "unknown (install "\
            "ai-edge-quantizer to rank layers)"
        raise GateError(
            f"full int8 loses {cand.metrics.drop_points:.2f} points ({cand.metrics.basis}), over "
            f"the allowed {max_drop:g}, and {profile.name} is integer-only, so no layer can stay "
            f"float. The layers that lose most signal under int8: {worst}. Try more or more "
            "representative calibration data, quantization-aware training, or raise --max-drop.",
            target=profile.name, stage="gate")
    n_ops = len(layer_ops(fp32.model_bytes))
    limit = max(1, int(n_ops * 0.3))
    k = 1
    while ranked and k <= min(limit, len(ranked)):
        with progress.stage(f"int8 with {k} layer(s) in float"):
            sel = quantize_keeping_float(fp32.model_bytes, calib, ranked[:k])
            c = _measure(sel, specs, evalset, ref, batch, threads, feed)
        tried.append(c)
        if c.metrics.drop_points <= max_drop:
            _variants(report, tried, c, max_drop)
            return c
        k *= 2
    with progress.stage("dynamic-range fallback"):
        dyn = to_tflite(sm_dir, "dynamic", batch=batch)
        dyn = TFLiteResult(dyn.model_bytes, dyn.mode, dyn.notes + (
            "full int8 failed the gate; dynamic range (float activations) is the fallback",),
            io_type="float32")
        c = _measure(dyn, specs, evalset, ref, batch, threads, feed)
    tried.append(c)
    _variants(report, tried, c, max_drop)
    if c.metrics.drop_points <= max_drop:
        report["warnings"].append(
            f"full int8 lost {cand.metrics.drop_points:.2f} points"
            + (f" and selective int8 with up to {min(limit, len(ranked))} float layer(s) did not "
               "pass" if ranked else " (install ai-edge-quantizer to try keeping layers float)")
            + "; the bundle is dynamic-range int8 (int8 weights, float activations)")
        return c
    raise GateError(
        f"int8 loses {cand.metrics.drop_points:.2f} points, over the allowed {max_drop:g}, and "
        f"neither selective int8 ({'tried' if ranked else 'ai-edge-quantizer not installed'}) "
        f"nor dynamic range (drop {c.metrics.drop_points:.2f}) passes. Try --quantize fp16, "
        "more representative calibration data, or raise --max-drop.",
        target=profile.name, stage="gate")


def _variants(report: dict, tried: list[_Candidate], chosen: _Candidate, max_drop: float) -> None:
    report["variants"] = [{
        "scheme": c.label, "bytes": len(c.result.model_bytes), "latency": c.latency,
        "drop_points": c.metrics.drop_points, "passed": c.metrics.drop_points <= max_drop,
        "result": "chosen" if c is chosen else
        f"gate: drop {c.metrics.drop_points:.2f} > {max_drop:g} pt"} for c in tried]


def _entries(sess: LiteRTSession, which: str) -> list[dict]:
    return [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape), "quantization": q}
            for s, q in zip(sess.tensor_specs(which, raw=True), sess.quantization(which),
                            strict=True)]


def _raw_golden(sess: LiteRTSession, specs: _Specs, evalset: Dataset, batch: int
                ) -> tuple[dict, int]:
    """golden.npz in the model's own dtypes (int8/uint8 I/O fed and returned as is)."""
    n = max(1, min(8, len(evalset) // batch))  # feeds, each of ``batch`` rows (as _golden)
    ins: list[list[np.ndarray]] = [[] for _ in specs.inputs]
    outs: list[list[np.ndarray]] = [[] for _ in sess.output_names]
    for feed in evalset.take(slice(0, n * batch)).batches(batch):
        raw = sess.quantize_inputs(feed)
        for i, name in enumerate(sess.input_names):
            ins[i].append(raw[name])
        for j, y in enumerate(sess.run_raw(raw)):
            outs[j].append(y)
    arrays = {f"input_{i}": np.stack(a) for i, a in enumerate(ins)}
    arrays |= {f"output_{j}": np.stack(a) for j, a in enumerate(outs)}
    return arrays, n


def _tflm_host_check(model_bytes: bytes, sess: LiteRTSession, feeds: list[dict]) -> dict:
    """Run the model in the TFLM interpreter (reference kernels) when ``tflite-micro`` is here."""
    try:
        from tflite_micro.python.tflite_micro import runtime
    except Exception:
        return {"ran": False, "why": "tflite-micro (the TFLM Python interpreter) is not installed"}
    import re

    try:
        it = runtime.Interpreter.from_bytes(model_bytes, arena_size=4 * 1024 * 1024)
        agree, total = 0, 0
        max_diff = 0
        for feed in feeds:
            raw = sess.quantize_inputs(feed)
            for i, name in enumerate(sess.input_names):
                it.set_input(raw[name], i)
            it.invoke()
            ref = sess.run_raw(raw)
            for j, r in enumerate(ref):
                y = it.get_output(j)
                max_diff = max(max_diff, int(np.abs(y.astype(np.int64) - r.astype(np.int64)).max()))
                if r.ndim == 2 and r.shape[1] > 1:
                    agree += int((y.argmax(1) == r.argmax(1)).sum())
                    total += len(r)
        # print_allocations writes to the C-level stdout/stderr: capture both through a file.
        text = _capture_fds(it.print_allocations)
        m = re.search(r"Arena allocation total (\d+) bytes", text)
        h = re.search(r"Arena allocation head (\d+) bytes", text)
        return {"ran": True, "samples": len(feeds), "max_abs_diff_vs_litert_q": max_diff,
                "top1_agreement_vs_litert": agree / total if total else None,
                "host_arena_total_bytes": int(m.group(1)) if m else None,
                "host_arena_head_bytes": int(h.group(1)) if h else None,
                "note": "TFLM reference kernels on this 64-bit host: the head (activations) "
                        "matches a 32-bit MCU, the tail (structs) is larger here"}
    except Exception as exc:
        return {"ran": False, "why": f"TFLM interpreter failed: {str(exc)[:300]}"}


def _capture_fds(fn: Any) -> str:
    import os

    with tempfile.TemporaryFile() as f:
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            fn()
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
        f.seek(0)
        return f.read().decode(errors="replace")


def run_tflite_build(cfg: BuildConfig, profile: Profile, imported: Any = None,
                     progress: Progress | None = None) -> BuildResult:
    """Build a TFLite (``tflite``) or TFLite Micro (``tflm``) bundle for ``profile``."""
    progress = progress or Progress(enabled=False)
    with tempfile.TemporaryDirectory(prefix="edgepack-tfl-") as workdir:
        return _run(cfg, profile, imported, progress, workdir)


def _run(cfg: BuildConfig, profile: Profile, imported: Any, progress: Progress,
         workdir: str) -> BuildResult:
    from edgepack.agent.bundle import parse_version
    from edgepack.agent.protocol import check_id

    src = Path(cfg.model)
    fmt = "tflm" if (getattr(cfg, "format", None) == "tflm" or
                     profile.runtime.formats[0] == "tflm") else "tflite"
    integer_only = profile.runtime.integer_only
    mode = profile.quantization.default if cfg.quantize == "auto" else cfg.quantize
    name = cfg.name or src.stem or src.name
    check_id(name, "bundle name")
    parse_version(cfg.version)
    with progress.stage("import"):
        sm_dir, given, import_notes = _source(cfg, imported, workdir)
    as_is = given is not None
    if not as_is and integer_only and mode != "int8":
        raise ModelError(f"{profile.name} runs integer-only kernels: --quantize {mode} cannot "
                         "run there. Use --quantize int8 with --calibration data.",
                         target=profile.name)
    if not as_is and mode == "int8" and not cfg.calibration:
        raise DataError("full-int8 TFLite needs calibration data: pass --calibration data.npz "
                        "(a few hundred representative inputs keyed by input name)"
                        + ("" if integer_only else ", or use --quantize dynamic or fp16"),
                        target=profile.name)
    q = profile.quantization
    max_drop = cfg.max_drop if cfg.max_drop is not None else q.max_drop_points
    threads = _host_threads(profile)
    report: dict[str, Any] = {"warnings": []}
    warnings: list[str] = report["warnings"]

    with progress.stage("fp32 TFLite"):
        fp32 = (TFLiteResult(given, "none", ("packaged as given",), tool="as given") if as_is
                else to_tflite(sm_dir, "none", batch=cfg.batch))
        ref_sess = LiteRTSession(fp32.model_bytes, threads)
    specs = _Specs(ref_sess.tensor_specs("inputs", by_signature=True),
                   ref_sess.tensor_specs("outputs"))
    fp32_size = len(fp32.model_bytes)
    budget_bytes = profile.budgets.model_mb * 1024 * 1024
    shrink = {"int8": 4.0, "dynamic": 4.0, "fp16": 2.0}.get(mode, 1.0) if not as_is else 1.0
    if fp32_size / shrink > budget_bytes:
        raise BudgetError(f"the model is {fp32_size / 2**20:.2f} MB as fp32 TFLite; even {mode} "
                          f"(~{shrink:g}x smaller) cannot fit {profile.name}'s "
                          f"{profile.budgets.model_mb:g} MB model budget. Use a smaller model "
                          "(edgepack distill) or a bigger target.", target=profile.name)
    with progress.stage("loading data"):
        calib, evalset, eval_source = _load_inputs(cfg, profile, specs)
    feed = {s.name: evalset.inputs[s.name][:cfg.batch].reshape(s.shape) for s in specs.inputs}
    ctx = {"batch": cfg.batch, "threads": threads, "feed": feed}
    with progress.stage("fp32 reference"):
        ref = run_outputs(ref_sess, evalset, cfg.batch)
        fp32_lat = measure_latency(ref_sess, feed)

    if as_is:
        best = _Candidate(fp32, ref_sess, compare(specs.outputs, ref, ref, evalset.labels), ref,
                          fp32_lat)
        quantized = any(not o.float_io for o in layer_ops(fp32.model_bytes))
        mode = "int8" if quantized else "none"
        if integer_only:
            _check_integer_only(fp32.model_bytes, profile)
        if _is_edgetpu(profile):
            io = "float32" if ref_sess.quantization()[0] is None else "int8"
            _check_edgetpu(fp32.model_bytes, profile, io)
    elif mode == "int8":
        assert calib is not None  # checked above
        best = _int8(cfg, profile, sm_dir, fp32, specs, calib, evalset, ref, ctx, max_drop,
                     progress, report)
    elif mode in ("dynamic", "fp16"):
        with progress.stage(f"{mode} TFLite"):
            res = to_tflite(sm_dir, mode, batch=cfg.batch)
            best = _measure(res, specs, evalset, ref, cfg.batch, threads, feed)
    else:
        best = _Candidate(fp32, ref_sess, compare(specs.outputs, ref, ref, evalset.labels), ref,
                          fp32_lat)
    res = best.result
    m = best.metrics
    if m.drop_points > max_drop:
        raise GateError(f"{best.label} TFLite loses {m.drop_points:.2f} points ({m.basis}), over "
                        f"the allowed {max_drop:g}. Try another --quantize mode or raise "
                        "--max-drop.", target=profile.name, stage="gate")
    model_bytes = res.model_bytes
    opt_size = len(model_bytes)
    if opt_size > budget_bytes:
        raise BudgetError(f"the optimized model is {opt_size / 2**20:.2f} MB, over "
                          f"{profile.name}'s {profile.budgets.model_mb:g} MB model budget",
                          target=profile.name)

    files: dict[str, bytes] = {}
    needs: list[str] = []
    model_file = "model.tflite"
    runtime_name = "litert"
    if fmt == "tflm":
        from edgepack.host.build import tflm

        with progress.stage("TFLM sources"):
            plan = tflm.plan_arena(model_bytes)
            budget_notes = tflm.check_budgets(model_bytes, plan, profile)
            ins, outs = _entries(best.session, "inputs"), _entries(best.session, "outputs")
            for fname, data in tflm.write_sources(model_bytes, plan, inputs=ins, outputs=outs,
                                                  name=name, target=profile.name).items():
                files[f"tflm/{fname}"] = data
            host_check = _tflm_host_check(model_bytes, best.session, [
                f for _, f in zip(range(16), evalset.batches(cfg.batch), strict=False)])
        runtime_name = "tflm"
        report["tflm"] = {"arena": plan.to_dict(), "budgets": budget_notes,
                          "resolver": [{"op": o, "method": mth, "uses": c}
                                       for o, mth, c in tflm.resolver_ops(model_bytes)],
                          "host_check": host_check,
                          "files": sorted(files)}
    etpu = None
    if _is_edgetpu(profile) and mode == "int8":
        warnings.extend(edgetpu_shape_warnings(model_bytes))
        with progress.stage("edgetpu_compiler"):
            etpu = compile_edgetpu(model_bytes, workdir)
        if etpu.model_bytes is None:
            needs.append("edgetpu_compiler")
            warnings.extend(etpu.notes)
        else:
            files["model_cpu.tflite"] = model_bytes
            model_bytes = etpu.model_bytes
            model_file = "model_edgetpu.tflite"
        report["edgetpu"] = {"compiled": etpu.model_bytes is not None, "compiler": etpu.compiler,
                             "tpu_ops": etpu.tpu_ops, "cpu_ops": etpu.cpu_ops,
                             "log": etpu.log[-2000:], "notes": etpu.notes,
                             "ops_checked": "every op is on the Edge TPU's supported list"}

    speedup = fp32_lat["p50_ms"] / best.latency["p50_ms"]
    if mode != "none" and not as_is and speedup < 1.0 and profile.host_can_time:
        warnings.append(f"the {best.label} model is SLOWER than fp32 in LiteRT on this host "
                        f"({speedup:.2f}x of fp32 speed); consider --quantize none or fp16")
    if not profile.host_can_time:
        warnings.append(f"latency was measured in LiteRT on this host ({platform.machine()}), not "
                        f"on {profile.hardware.cpu}: use it to compare variants, not as the "
                        "target's figure")
    if eval_source.startswith("16 random"):
        warnings.append("no eval or calibration data: the gate compared outputs on random inputs")

    in_q = best.session.quantization("inputs")
    out_q = best.session.quantization("outputs")
    int_io = any(x is not None for x in in_q + out_q)
    effective = res.mode
    summary = {"none": "fp32 TFLite (no quantization)" if not as_is else "TFLite as given",
               "fp16": "fp16 weights, float32 compute on CPUs",
               "dynamic": "dynamic-range int8 (int8 weights, float activations)",
               "int8": f"full int8, {res.io_type} I/O" if not as_is else "int8 TFLite as given"
               }[effective if not (as_is and mode == "int8") else "int8"]
    if res.float_layers:
        summary = f"int8 with {len(res.float_layers)} layer(s) in float, float32 I/O"
    n_q = sum(1 for o in layer_ops(res.model_bytes) if not o.float_io)
    optimization = {
        "mode": mode if as_is else effective, "requested": "as-is" if as_is else (
            cfg.quantize if cfg.quantize != "auto" else mode),
        "summary": summary, "format": "TFLite", "tool": res.tool,
        "activation_type": "int8" if effective == "int8" else None,
        "weight_type": "int8" if effective in ("int8", "dynamic") else None,
        "per_channel": True if effective in ("int8", "dynamic") else None,
        "reduce_range": False if effective in ("int8", "dynamic") else None,
        "io_type": res.io_type if not as_is else ("quantized" if int_io else "float32"),
        "calibration_method": "minmax" if effective == "int8" and not as_is else None,
        "calibration_samples": len(calib) if calib is not None and effective == "int8" else 0,
        "calibration_fingerprint": calib.fingerprint() if calib is not None else None,
        "quantized_ops": n_q, "nodes_in_float": list(res.float_layers), "preflight": [],
        "integer_only": integer_only, "needs": needs, "notes": list(res.notes),
        "ops": [{"op": o, "count": c} for o, c in tflite_ops(res.model_bytes)],
        "warnings": warnings,
    }
    metrics = {
        "fp32_bytes": fp32_size, "optimized_bytes": opt_size, "size_ratio": fp32_size / opt_size,
        "top1_agreement": m.top1_agreement, "accuracy_fp32": m.accuracy_fp32,
        "accuracy_optimized": m.accuracy_optimized, "drop_points": m.drop_points,
        "min_cosine": m.min_cosine, "max_abs_error": m.max_abs_error,
        "eval_samples": m.samples, "eval_source": eval_source,
        "host_latency_ms": {"fp32": fp32_lat, "optimized": best.latency, "cpu": host_cpu(),
                            "runtime": "litert", "representative": profile.host_can_time,
                            "threads": threads},
    }
    if int_io:
        golden, n_golden = _raw_golden(best.session, specs, evalset, cfg.batch)
    else:
        golden, n_golden = _golden(specs, evalset, best.outputs, cfg.batch)
    health = {"golden": "golden.npz", "samples": n_golden,
              **_health("int8" if effective in ("int8", "dynamic") else effective, ref)}
    if int_io:
        # Golden inputs/outputs are the model's own int8/uint8 values: dequantize outputs with
        # model.outputs[j].quantization before applying atol/rtol/min_cosine.
        health["quantized_io"] = True

    delegates = list(profile.runtime.delegates)
    manifest: dict[str, Any] = {
        "name": name, "version": cfg.version, "created": _created(), "target": profile.name,
        "model": {"file": model_file, "format": fmt, "inputs": _entries(best.session, "inputs"),
                  "outputs": _entries(best.session, "outputs"), "opset": None},
        "runtime": {"name": runtime_name,
                    "min_version": LITERT_MIN_VERSION if runtime_name == "litert" else None,
                    "threads": profile.runtime.threads, "providers": [],
                    "delegates": delegates},
        "optimization": optimization, "metrics": metrics, "health": health,
        "budgets": {"p95_ms": profile.budgets.p95_ms, "peak_rss_mb": profile.budgets.rss_mb,
                    "model_mb": profile.budgets.model_mb,
                    **({"arena_kb": profile.budgets.arena_kb} if fmt == "tflm" else {})},
        "toolchain": _toolchain_tf(),
    }
    report.update({
        "model": {"source": str(src), "inputs": manifest["model"]["inputs"],
                  "outputs": manifest["model"]["outputs"], "format": fmt,
                  "import_notes": list(import_notes),
                  "ops": dict(tflite_ops(res.model_bytes)),
                  "signature_inputs": {s.name: ref_sess.signature_inputs.get(t, t)
                                       for s, t in zip(specs.inputs, ref_sess.input_names,
                                                       strict=True)}},
        "optimization": optimization,
        "metrics": {"size": {"fp32_bytes": fp32_size, "optimized_bytes": opt_size,
                             "ratio": fp32_size / opt_size},
                    "accuracy": {**m.to_dict(), "source": eval_source},
                    "latency": {"fp32": fp32_lat, "optimized": best.latency,
                                "speedup_p50": speedup, "runtime": "litert",
                                "representative": profile.host_can_time, "threads": threads}},
        "timings_s": dict(progress.timings),
    })
    return package_build(cfg, profile, name, manifest, model_bytes, files, golden, report,
                         warnings, progress)


def _toolchain_tf() -> dict:
    import contextlib
    from importlib.metadata import PackageNotFoundError, version

    out = _toolchain()
    for pkg in ("tensorflow-cpu", "tensorflow", "ai-edge-litert", "ai-edge-quantizer",
                "tflite-micro"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out
