"""The TFLite backend: convert → optimize → gate in LiteRT, the bundle's TFLite entries.

The float32 TFLite model run in LiteRT is the reference; every candidate (full int8, dynamic,
fp16, selective int8) runs in LiteRT on the same samples through the same gate
(``edgepack.host.build.validate``), and the bundle and report have the ONNX build's structure.

Integer-only targets (Edge TPU, microcontrollers) never get a float fallback: an op without an
int8 kernel, an op the Edge TPU does not map, or a gate failure is an error naming the layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.agent.errors import DataError, GateError, ModelError
from edgepack.agent.profiles import Profile
from edgepack.host.build import gate, package
from edgepack.host.build.backends.base import Assembly, Baseline
from edgepack.host.build.convert_tflite import (
    LiteRTSession,
    TFLiteResult,
    layer_ops,
    non_int8_ops,
    onnx_to_saved_model,
    quantize_keeping_float,
    quantize_tflite,
    rank_sensitive_layers,
    tflite_ops,
    to_tflite,
)
from edgepack.host.build.data import Dataset, load_gate_data
from edgepack.host.build.drift_reference import NO_DRIFT_DATA, DriftSample, drift_sample
from edgepack.host.build.edgetpu import (
    compile_edgetpu,
    edgetpu_shape_warnings,
    edgetpu_unsupported_ops,
)
from edgepack.host.build.plan import BuildPlan
from edgepack.host.build.report import Progress
from edgepack.host.build.result import BuildReport
from edgepack.host.build.tflite_intake import TfliteInfo, inspect_tflite
from edgepack.host.build.validate import GateMetrics, Outputs, compare, measure_latency, run_outputs

__all__ = ["LITERT_MIN_VERSION", "TfliteBackend"]

LITERT_MIN_VERSION = "2.14"  # tflite-runtime 2.14 / any ai-edge-litert run these models
_BOUNDARY = ("QUANTIZE", "DEQUANTIZE")
# An already-quantized model's dtype (tflite_intake.TfliteInfo.dtype) → optimization.mode.
_MODE_OF = {"int8": "int8", "uint8": "int8", "16x8": "int8", "dynamic-int8": "dynamic",
            "float16": "fp16", "float32": "none"}
_ACTIVATIONS = {"int8": "int8", "uint8": "uint8", "16x8": "int16"}


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


@dataclass(frozen=True)
class _TfliteBaseline(Baseline):
    sm_dir: str | None
    as_is: bool  # a .tflite given and packaged as it is (quantized already, or `quantize=` none)
    info: TfliteInfo | None  # what the given .tflite is (None: converted here)
    import_notes: list[str]
    fp32: TFLiteResult
    ref_session: LiteRTSession
    feed: dict
    fp32_latency: dict


@dataclass
class _Optimized:
    best: _Candidate
    mode: str
    variants: list[dict] | None = None
    warnings: list[str] = field(default_factory=list)


def _is_edgetpu(profile: Profile) -> bool:
    return "edgetpu" in profile.runtime.delegates or "edgetpu" in profile.hardware.accelerators


def _source(plan: BuildPlan, imported: Any, workdir: Path) -> tuple[str | None, bytes | None,
                                                                    list[str]]:
    """``(saved_model_dir, tflite_bytes, notes)`` from the importer's result (or the path)."""
    notes = list(getattr(imported, "notes", None) or [])
    target = plan.profile.name
    if imported is not None:
        if getattr(imported, "tflite_bytes", None):
            return None, bytes(imported.tflite_bytes), notes
        if getattr(imported, "saved_model_dir", None):
            return str(imported.saved_model_dir), None, notes
        if getattr(imported, "float_only", False):
            raise ModelError(f"{plan.model.name} is a {getattr(imported, 'kind', 'model')} "
                             "with no TFLite path (no int8 kernels either): pick a target that "
                             "runs ONNX.")
        if getattr(imported, "onnx_path", None):
            return str(onnx_to_saved_model(imported.onnx_path, workdir, target)), None, notes + [
                "ONNX converted to TensorFlow with onnx2tf"]
    src = plan.model
    if src.is_dir() and (src / "saved_model.pb").exists():
        return str(src), None, notes
    if src.suffix.lower() == ".tflite":
        try:
            return None, src.read_bytes(), notes
        except OSError as exc:
            raise ModelError(f"cannot read {src}: {exc.strerror}") from None
    if src.suffix.lower() == ".onnx":
        return str(onnx_to_saved_model(src, workdir, target)), None, notes
    raise ModelError(f"{src} is not a SavedModel directory or a .tflite file (Keras models come "
                     "through the importer)")


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


def _entries(sess: LiteRTSession, which: str) -> list[dict]:
    return [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape), "quantization": q}
            for s, q in zip(sess.tensor_specs(which, raw=True), sess.quantization(which),
                            strict=True)]


class TfliteBackend:
    """Bundles whose model is a TFLite flatbuffer, run by LiteRT."""

    format = "tflite"

    # ------------------------------------------------------------------ pre-flight
    def prepare(self, plan: BuildPlan, imported: Any, work: Path,
                progress: Progress) -> _TfliteBaseline:
        profile, mode, batch = plan.profile, plan.mode, plan.data.batch
        integer_only = profile.runtime.integer_only
        sm_dir, given, import_notes = _source(plan, imported, work)
        info = inspect_tflite(given, name=plan.model.name) if given is not None else None
        quantized = info is not None and info.dtype != "float32"
        as_is = quantized or (info is not None and mode == "none")
        if not quantized and integer_only and mode != "int8":
            raise ModelError(f"{profile.name} runs integer-only kernels: `quantize=` {mode} "
                             "cannot run there. Use `quantize=` int8 with `calibration=` data.",
                             target=profile.name, field="quantize")
        if info is not None and not as_is and mode == "fp16":
            raise ModelError(f"{plan.model.name} is a float .tflite: edgepack quantizes it to int8 "
                             "(with `calibration=`) or dynamic, not fp16. Give the source model "
                             "(Keras, SavedModel or ONNX) for fp16.", target=profile.name,
                             field="quantize")
        if not as_is and mode == "int8" and not plan.data.calibration:
            raise DataError("full-int8 TFLite needs calibration data: pass `calibration=` "
                            "data.npz (a few hundred representative inputs keyed by input name)"
                            + ("" if integer_only else ", or use `quantize=` dynamic or fp16"),
                            target=profile.name, field="calibration")
        threads = plan.threads
        with progress.stage("fp32 TFLite" if info is None else f"{info.dtype} TFLite as given"):
            fp32 = (TFLiteResult(given, "none", ("packaged as given",), tool="as given")
                    if given is not None else to_tflite(sm_dir, "none", batch=batch))
            ref_sess = self.reference_session(fp32.model_bytes, plan, info)
        inputs = ref_sess.tensor_specs("inputs", by_signature=True)
        outputs = ref_sess.tensor_specs("outputs")
        gate.check_fp32_budget(len(fp32.model_bytes), "as given" if as_is else mode, profile,
                               what=f"as {info.dtype} TFLite" if info else "as fp32 TFLite",
                               digits=2)
        with progress.stage("loading data"):
            cap = plan.quantize.calibration_samples or profile.quantization.calibration_samples
            data = load_gate_data(inputs, calibration=plan.data.calibration, eval=plan.data.eval,
                                  sample_input=plan.data.sample_input, cap=cap)
        feed = {s.name: data.evalset.inputs[s.name][:batch].reshape(s.shape) for s in inputs}
        with progress.stage("fp32 reference"):
            ref = run_outputs(ref_sess, data.evalset, batch)
            fp32_lat = measure_latency(ref_sess, feed)
        return _TfliteBaseline(imported=imported, work=work, inputs=inputs, outputs=outputs,
                               data=data, reference=ref, threads=threads, sm_dir=sm_dir,
                               as_is=as_is, info=info, import_notes=import_notes, fp32=fp32,
                               ref_session=ref_sess, feed=feed, fp32_latency=fp32_lat)

    def reference_session(self, model_bytes: bytes, plan: BuildPlan,
                          info: TfliteInfo | None) -> Any:
        """The session the reference outputs come from: LiteRT, the interpreter the target runs
        (the TFLM backend runs a given .tflite in TFLite Micro)."""
        try:
            return LiteRTSession(model_bytes, plan.threads)
        except ModelError as exc:
            if info is None:
                raise
            raise ModelError(f"{plan.model.name}: {exc.message}. {plan.profile.name} runs LiteRT, "
                             "which refuses this model: convert it again from the float source, "
                             "or build it for a microcontroller target if TFLite Micro runs it.",
                             target=plan.profile.name, stage="validate") from None

    def device_candidates(self, plan: BuildPlan) -> list[tuple[str, BuildPlan]]:
        """fp32, fp16, dynamic range and (with calibration data) full int8 TFLite.

        Refused (DataError, before anything slow) for microcontrollers, which run the bundle's
        C sources rather than an agent, for integer-only targets, where int8 is the only
        candidate, and for a ``.tflite`` input, which is packaged as it is.
        """
        why = ("microcontroller bundles run as C sources, not in an agent that could measure "
               "them" if self.format == "tflm" else
               f"{plan.profile.name} is integer-only: full int8 is the one candidate"
               if plan.profile.runtime.integer_only else
               "a .tflite input is packaged as it is: there is nothing to choose between"
               if plan.source_kind == "tflite" else None)
        if why:
            raise DataError(f"`profile_on=` cannot choose for this build: {why}. Build without "
                            "it, and measure the bundle on a device with `edgepack profile`.",
                            field="profile_on", target=plan.profile.name)
        out = [("fp32", plan.with_quantize(mode="none")), ("fp16", plan.with_quantize(mode="fp16")),
               ("dynamic", plan.with_quantize(mode="dynamic"))]
        if plan.data.calibration:
            out.append(("int8", plan.with_quantize(mode="int8")))
        return out

    # ------------------------------------------------------------------ optimize + gate
    def optimize(self, base: _TfliteBaseline, plan: BuildPlan, progress: Progress) -> _Optimized:
        profile, mode = plan.profile, plan.mode
        if base.as_is:
            best = self._fp32(base)
            fp32 = base.fp32.model_bytes
            mode = _MODE_OF.get(base.info.dtype if base.info else "", "none")
            if profile.runtime.integer_only and self.format != "tflm":  # TFLM ran it already
                _check_integer_only(fp32, profile)
            if _is_edgetpu(profile):
                io = "float32" if base.ref_session.quantization()[0] is None else "int8"
                _check_edgetpu(fp32, profile, io)
            opt = _Optimized(best, mode)
        elif mode == "int8":
            opt = self._int8(base, plan, progress)
        elif mode in ("dynamic", "fp16"):
            with progress.stage(f"{mode} TFLite"):
                res = _convert(base, mode, batch=plan.data.batch)
                opt = _Optimized(_measure(res, base, plan.data.batch), mode)
        else:
            opt = _Optimized(self._fp32(base), mode)
        gate.check_drop(opt.best.metrics, plan.max_drop, f"{opt.best.label} TFLite",
                        target=profile.name)
        return opt

    def _fp32(self, base: _TfliteBaseline) -> _Candidate:
        ref = base.reference
        return _Candidate(base.fp32, base.ref_session,
                          compare(base.outputs, ref, ref, base.data.evalset.labels), ref,
                          base.fp32_latency)

    def _int8(self, base: _TfliteBaseline, plan: BuildPlan, progress: Progress) -> _Optimized:
        """Full int8; on CPU targets failing the gate, layers kept in float, then dynamic range."""
        profile, max_drop, batch = plan.profile, plan.max_drop, plan.data.batch
        integer_only = profile.runtime.integer_only
        io_type = plan.quantize.tflite_io or profile.quantization.tflite_io
        calib, evalset = base.data.calib, base.data.evalset
        assert calib is not None  # checked in prepare
        with progress.stage(f"int8 TFLite calibration ({len(calib)} samples)", total=len(calib)):
            res = _convert(base, "int8", calib=calib, io_type=io_type,
                           integer_only=integer_only, batch=batch)
        if integer_only:
            _check_integer_only(res.model_bytes, profile)
        if _is_edgetpu(profile):
            _check_edgetpu(res.model_bytes, profile, res.io_type)
        with progress.stage("int8 TFLite validation"):
            cand = _measure(res, base, batch)
        tried = [cand]
        if cand.metrics.drop_points <= max_drop:
            return _Optimized(cand, "int8")
        fp32 = base.fp32.model_bytes
        sample = evalset.take(slice(0, min(len(evalset), 32)))
        with progress.stage("ranking sensitive layers"):
            ranked = [n for n, _ in rank_sensitive_layers(fp32, calib, sample)]
        if integer_only:
            worst = ", ".join(n.split(";")[0] for n in ranked[:3]) or "unknown (install "\
                "ai-edge-quantizer to rank layers)"
            raise GateError(
                f"full int8 loses {cand.metrics.drop_points:.2f} points ({cand.metrics.basis}), "
                f"over the allowed {max_drop:g}, and {profile.name} is integer-only, so no layer "
                f"can stay float. The layers that lose most signal under int8: {worst}. Try more "
                "or more representative calibration data, quantization-aware training, or raise "
                "`max_drop=`.", target=profile.name, stage="gate", field="max_drop")
        limit = max(1, int(len(layer_ops(fp32)) * 0.3))
        k = 1
        while ranked and k <= min(limit, len(ranked)):
            with progress.stage(f"int8 with {k} layer(s) in float"):
                c = _measure(quantize_keeping_float(fp32, calib, ranked[:k]), base, batch)
            tried.append(c)
            if c.metrics.drop_points <= max_drop:
                return _Optimized(c, "int8", _variants(tried, c, max_drop))
            k *= 2
        with progress.stage("dynamic-range fallback"):
            dyn = _convert(base, "dynamic", batch=batch)
            dyn = TFLiteResult(dyn.model_bytes, dyn.mode, dyn.notes + (
                "full int8 failed the gate; dynamic range (float activations) is the fallback",),
                io_type="float32", tool=dyn.tool)
            c = _measure(dyn, base, batch)
        tried.append(c)
        if c.metrics.drop_points <= max_drop:
            return _Optimized(c, "int8", _variants(tried, c, max_drop), [
                f"full int8 lost {cand.metrics.drop_points:.2f} points"
                + (f" and selective int8 with up to {min(limit, len(ranked))} float layer(s) "
                   "did not pass" if ranked else
                   " (install ai-edge-quantizer to try keeping layers float)")
                + "; the bundle is dynamic-range int8 (int8 weights, float activations)"])
        raise GateError(
            f"int8 loses {cand.metrics.drop_points:.2f} points, over the allowed {max_drop:g}, "
            f"and neither selective int8 "
            f"({'tried' if ranked else 'ai-edge-quantizer not installed'}) nor dynamic range "
            f"(drop {c.metrics.drop_points:.2f}) passes. Try `quantize=` fp16, more "
            "representative calibration data, or raise `max_drop=`.",
            target=profile.name, stage="gate", field="max_drop")

    # ------------------------------------------------------------------ assemble
    def format_files(self, base: _TfliteBaseline, best: _Candidate, model_bytes: bytes,
                     plan: BuildPlan, progress: Progress) -> tuple[dict[str, bytes], dict]:
        """Extra bundle members and report sections of this format (TFLM: C sources)."""
        return {}, {}

    def assemble(self, base: _TfliteBaseline, opt: _Optimized, plan: BuildPlan,
                 progress: Progress) -> Assembly:
        profile, best, mode, as_is = plan.profile, opt.best, opt.mode, base.as_is
        res = best.result
        model_bytes = res.model_bytes
        measured = gate.Measured(len(base.fp32.model_bytes), len(model_bytes), best.metrics,
                                 base.data.source, base.fp32_latency, best.latency,
                                 base.threads, runtime="litert")
        gate.check_budget(measured.optimized_bytes, profile, digits=2)
        warnings = list(opt.warnings)
        files, sections = self.format_files(base, best, model_bytes, plan, progress)
        needs: list[str] = []
        model_file = "model.tflite"
        if _is_edgetpu(profile) and mode == "int8":
            warnings.extend(edgetpu_shape_warnings(model_bytes))
            with progress.stage("edgetpu_compiler"):
                etpu = compile_edgetpu(model_bytes, base.work)
            if etpu.model_bytes is None:
                needs.append("edgetpu_compiler")
                warnings.extend(etpu.notes)
            else:
                files["model_cpu.tflite"] = model_bytes
                model_bytes = etpu.model_bytes
                model_file = "model_edgetpu.tflite"
            sections["edgetpu"] = {
                "compiled": etpu.model_bytes is not None, "compiler": etpu.compiler,
                "tpu_ops": etpu.tpu_ops, "cpu_ops": etpu.cpu_ops, "log": etpu.log[-2000:],
                "notes": etpu.notes, "ops_checked": "every op is on the Edge TPU's supported list"}
        measured_mode = "none" if as_is else mode  # no SLOWER warning for a model as given
        warnings += gate.host_warnings(measured, profile, mode=measured_mode, label=best.label,
                                       where=" in LiteRT")
        optimization = self._optimization(base, opt, plan, needs, warnings)
        golden, health = self._golden(base, best, optimization["mode"], plan.data.batch)
        runtime = "tflm" if self.format == "tflm" else "litert"
        inputs, outputs = _entries(best.session, "inputs"), _entries(best.session, "outputs")
        manifest = package.manifest(
            plan,
            model={"file": model_file, "format": self.format, "inputs": inputs,
                   "outputs": outputs, "opset": None},
            runtime={"name": runtime,
                     "min_version": LITERT_MIN_VERSION if runtime == "litert" else None,
                     "threads": profile.runtime.threads, "providers": [],
                     "delegates": list(profile.runtime.delegates)},
            optimization=optimization, metrics=measured.manifest_metrics(profile),
            health=health,
            budgets={"arena_kb": sections["tflm"]["arena_kb"]} if "tflm" in sections else None,
            toolchain=package.toolchain("tensorflow-cpu", "tensorflow", "ai-edge-litert",
                                        "ai-edge-quantizer", "tflite-micro"))
        ref_sess = base.ref_session
        report = BuildReport(
            model={"source": str(plan.model), "inputs": inputs, "outputs": outputs,
                   "format": self.format, "import_notes": list(base.import_notes),
                   "ops": dict(tflite_ops(res.model_bytes)),
                   "signature_inputs": {s.name: ref_sess.signature_inputs.get(t, t)
                                        for s, t in zip(base.inputs, ref_sess.input_names,
                                                        strict=True)}},
            optimization=optimization, metrics=measured.report_metrics(profile),
            warnings=warnings, timings_s=dict(progress.timings), variants=opt.variants,
            **sections)
        drift, skipped = (None, "TFLite Micro bundles run on microcontrollers, which do not "
                          "sketch drift") if self.format == "tflm" else \
            _drift_sample(base, best, plan.data.batch)
        return Assembly(manifest, model_bytes, files, golden, report, drift, skipped)

    def _optimization(self, base: _TfliteBaseline, opt: _Optimized, plan: BuildPlan,
                      needs: list[str], warnings: list[str]) -> dict[str, Any]:
        best, as_is, mode = opt.best, base.as_is, opt.mode
        res = best.result
        int_io = _int_io(best.session)
        effective = res.mode
        info = base.info if as_is else inspect_tflite(res.model_bytes)
        summary = {"none": "fp32 TFLite (no quantization)",
                   "fp16": "fp16 weights, float32 compute on CPUs",
                   "dynamic": "dynamic-range int8 (int8 weights, float activations)",
                   "int8": f"full int8, {res.io_type} I/O"}[effective]
        if as_is:
            summary = f"{info.dtype} TFLite as given (not re-quantized)"
        if res.float_layers:
            summary = f"int8 with {len(res.float_layers)} layer(s) in float, float32 I/O"
        calib = base.data.calib
        quant = effective in ("int8", "dynamic")
        return {
            "mode": mode if as_is else effective,
            "dtype": info.dtype,  # what the shipped model really is: int8, 16x8, float16, …
            "requested": "as-is" if as_is else (
                plan.quantize.mode if plan.quantize.mode != "auto" else mode),
            "summary": summary, "format": "TFLite", "tool": res.tool,
            "activation_type": _ACTIVATIONS.get(info.dtype),
            "weight_type": ("uint8" if info.dtype == "uint8" else "int8") if
            info.weights_quantized else ("float16" if info.dtype == "float16" else None),
            "per_channel": True if quant and not as_is else None,
            "reduce_range": False if quant and not as_is else None,
            "io_type": res.io_type if not as_is else ("quantized" if int_io else "float32"),
            "calibration_method": "minmax" if effective == "int8" and not as_is else None,
            "calibration_samples": len(calib) if calib is not None and effective == "int8"
            else 0,
            "calibration_fingerprint": calib.fingerprint() if calib is not None else None,
            "quantized_ops": sum(1 for o in layer_ops(res.model_bytes) if not o.float_io),
            "nodes_in_float": list(res.float_layers), "preflight": [],
            "integer_only": plan.profile.runtime.integer_only, "needs": needs,
            "notes": list(res.notes),
            "ops": [{"op": o, "count": c} for o, c in tflite_ops(res.model_bytes)],
            "warnings": warnings,
        }

    def _golden(self, base: _TfliteBaseline, best: _Candidate, mode: str,
                batch: int) -> tuple[dict, dict]:
        int_io = _int_io(best.session)
        if int_io:
            golden, n = _raw_golden(best.session, base, base.data.evalset, batch)
        else:
            golden, n = package.golden(base.inputs, base.data.evalset, best.outputs, batch)
        effective = mode if base.as_is else best.result.mode
        health = {"golden": "golden.npz", "samples": n,
                  **package.health("int8" if effective in ("int8", "dynamic") else effective,
                                   base.reference)}
        if int_io:
            # Golden inputs/outputs are the model's own int8/uint8 values: dequantize outputs
            # with model.outputs[j].quantization before applying atol/rtol/min_cosine.
            health["quantized_io"] = True
        return golden, health


def _convert(base: _TfliteBaseline, mode: str, **kw: Any) -> TFLiteResult:
    """The float model in ``mode``: TFLiteConverter from the SavedModel, or ai-edge-quantizer
    when a float .tflite was given (no SavedModel behind it)."""
    if base.sm_dir is not None:
        return to_tflite(base.sm_dir, mode, **kw)
    return quantize_tflite(base.fp32.model_bytes, mode, calib=kw.get("calib"))


def _int_io(sess: LiteRTSession) -> bool:
    return any(x is not None for x in sess.quantization("inputs") + sess.quantization("outputs"))


def _measure(res: TFLiteResult, base: _TfliteBaseline, batch: int) -> _Candidate:
    sess = LiteRTSession(res.model_bytes, base.threads)
    outs = run_outputs(sess, base.data.evalset, batch)
    metrics = compare(base.outputs, base.reference, outs, base.data.evalset.labels)
    return _Candidate(res, sess, metrics, outs, measure_latency(sess, base.feed))


class _RawRunner:
    """A LiteRT session fed and answering in the model's own I/O types (``run_outputs``'s
    session interface)."""

    def __init__(self, sess: LiteRTSession) -> None:
        self.output_names = sess.output_names
        self.run = sess.run_raw


def _drift_sample(base: _TfliteBaseline, best: _Candidate, batch: int
                  ) -> tuple[DriftSample | None, str]:
    """Calibration and eval inputs with the shipped model's outputs on them (drift.json), as
    the device sees them: by tensor name, int8/uint8 I/O as the model's own integers (their
    scale and zero point go into the reference, which is made in float terms)."""
    data, sess = base.data, best.session
    if data.random:
        return None, NO_DRIFT_DATA
    sets = [data.evalset]
    if data.calib is not None and data.calib is not data.evalset:
        sets.append(data.calib)
    raw = [Dataset(sess.quantize_inputs(d.inputs), None, d.source) for d in sets]
    names = sess.input_names + sess.output_names
    scales = sess.quantization("inputs") + sess.quantization("outputs")
    quant = {n: (q["scale"], q["zero_point"]) for n, q in zip(names, scales, strict=True) if q}
    runner = _RawRunner(sess)
    return drift_sample(sess.tensor_specs("inputs", raw=True),
                        sess.tensor_specs("outputs", raw=True),
                        [(d, run_outputs(runner, d, batch)) for d in raw], quantization=quant), ""


def _variants(tried: list[_Candidate], chosen: _Candidate, max_drop: float) -> list[dict]:
    return [{
        "scheme": c.label, "bytes": len(c.result.model_bytes), "latency": c.latency,
        "drop_points": c.metrics.drop_points, "passed": c.metrics.drop_points <= max_drop,
        "result": "chosen" if c is chosen else
        f"gate: drop {c.metrics.drop_points:.2f} > {max_drop:g} pt"} for c in tried]


def _raw_golden(sess: LiteRTSession, base: _TfliteBaseline, evalset: Dataset, batch: int
                ) -> tuple[dict, int]:
    """golden.npz in the model's own dtypes (int8/uint8 I/O fed and returned as is)."""
    n = max(1, min(package.GOLDEN_SAMPLES, len(evalset) // batch))
    ins: list[list[np.ndarray]] = [[] for _ in base.inputs]
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

