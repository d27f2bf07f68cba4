"""The ONNX backend: pre-flight in onnxruntime, fp16/dynamic/static int8 candidates, the bundle's
ONNX entries.

Every candidate runs in onnxruntime on the same eval samples through the same gate
(``validate.compare`` against the fp32 reference). With the default mode on a target whose CPU
family this host can time, the candidates are fp32, dynamic int8 and the profile's static int8
schemes, and :func:`~edgepack.host.build.choose.choose_on_host` picks the one to ship (never a
quantized model slower than fp32). A forced ``quantize=`` int8 tries the static schemes only;
when none passes, the nodes that hurt most are kept in float until one does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgepack.agent.errors import GateError, ModelError
from edgepack.agent.profiles import QuantScheme
from edgepack.host.build import gate, package
from edgepack.host.build.backends.base import Assembly, Baseline
from edgepack.host.build.choose import EQUAL_SPEED, HostChoice, Variant, choose_on_host
from edgepack.host.build.convert_onnx import PreparedModel, prepare_onnx
from edgepack.host.build.data import load_gate_data
from edgepack.host.build.plan import BuildPlan
from edgepack.host.build.quantize import (
    QuantResult,
    convert_fp16,
    quantize_dynamic,
    quantize_static,
)
from edgepack.host.build.report import Progress
from edgepack.host.build.result import BuildReport
from edgepack.host.build.validate import (
    GateMetrics,
    Outputs,
    Session,
    compare,
    measure_interleaved,
    rank_sensitive_nodes,
    run_outputs,
)

if TYPE_CHECKING:
    from edgepack.host.build.drift_reference import DriftSample

__all__ = ["PREFER_DEFAULT", "OnnxBackend"]

# A candidate must be this much faster than the profile's default scheme to replace it: closer
# than that is within timing noise on a shared machine, and flipping between runs would make
# builds irreproducible for no gain.
PREFER_DEFAULT = EQUAL_SPEED
# onnxruntime release that first runs each opset: the device's minimum runtime version.
_ORT_FOR_OPSET = {13: "1.8", 14: "1.10", 15: "1.11", 16: "1.12", 17: "1.13", 18: "1.14",
                  19: "1.16", 20: "1.17", 21: "1.20", 22: "1.20", 23: "1.22"}


@dataclass
class _Candidate:
    result: QuantResult
    metrics: GateMetrics
    outputs: Outputs
    latency: dict = field(default_factory=dict)
    gated: bool = True  # False: timed only, it could not win (its metrics are _UNGATED)
    session: Session | None = field(default=None, repr=False)  # the timing session, reused

    @property
    def label(self) -> str:
        r = self.result
        if r.mode == "dynamic" and r.scheme:
            s = r.scheme
            return (f"dynamic-{'U8' if s.weight_type == 'uint8' else 'S8'}-"
                    f"{'pc' if s.per_channel else 'pt'}{'-rr' if s.reduce_range else ''}")
        if r.mode == "int8" and r.scheme:
            return r.scheme.label + (f" +{len(r.excluded_nodes)} float" if r.excluded_nodes
                                     else "")
        return {"none": "fp32"}.get(r.mode, r.mode)


_UNGATED = GateMetrics(samples=0, drop_points=math.nan, basis="not gated: it could not win")


@dataclass(frozen=True)
class _OnnxBaseline(Baseline):
    prepared: PreparedModel
    ref_session: Session
    feed: dict
    unpruned: bytes
    pruning: dict | None


@dataclass(frozen=True)
class _Optimized:
    best: _Candidate
    kept: list[str]
    fp32_latency: dict
    variants: list[dict] | None
    mode: str  # what was asked of this candidate, after float-only models stayed float
    float_note: str | None
    chosen_by: str | None = None  # why the winner won (variant search)
    search_notes: tuple[str, ...] = ()  # candidates not tried or skipped, and why
    forced_slower: bool = False  # a forced int8 measured slower than fp32


def _mode(plan: BuildPlan, base: Baseline) -> tuple[str, str | None]:
    mode = plan.mode
    if base.imported.float_only and mode in ("int8", "dynamic"):
        why = [n for n in base.imported.notes if "int8" in n] or ["no op has an int8 kernel"]
        return "none", (f"nothing in this model was quantized: kept float32, not {mode} "
                        f"({why[-1]})")
    return mode, None


def _searches(plan: BuildPlan, mode: str) -> bool:
    """The default mode on a target this host can time: fp32 and dynamic int8 compete too."""
    return (plan.quantize.mode == "auto" and mode in ("int8", "dynamic")
            and plan.quantize.variants and plan.quantize.scheme is None
            and plan.profile.host_can_time)


class OnnxBackend:
    """Bundles whose model is ONNX, run by onnxruntime."""

    format = "onnx"

    # ------------------------------------------------------------------ pre-flight
    def prepare(self, plan: BuildPlan, imported: Any, work: Path,
                progress: Progress) -> _OnnxBaseline:
        profile = plan.profile
        if "onnx" not in profile.runtime.formats:
            raise ModelError(
                f"target {profile.name} runs {'/'.join(profile.runtime.formats)} models only; "
                "this edgepack builds ONNX bundles for it not yet (TFLite and TFLM output are not "
                "supported). Pick an ONNX target (edgepack targets list).", target=profile.name)
        if imported.onnx_path is None:
            raise ModelError(f"{plan.model.name} is a {imported.kind} model, which packages only "
                             f"for TFLite targets; {profile.name} runs ONNX. Build from the "
                             "source model (Keras, SavedModel or ONNX) instead.",
                             target=profile.name)
        with progress.stage("pre-flight"):
            prepared = prepare_onnx(imported.onnx_path, opset=profile.runtime.opset,
                                    batch=plan.data.batch, target=profile.name)
        base_mode = plan.mode if not imported.float_only else "none"
        gate.check_fp32_budget(len(prepared.model_bytes), base_mode, profile)
        with progress.stage("loading data"):
            data = _gate_data(plan, prepared, getattr(imported, "domain", None))
        batch, threads = plan.data.batch, plan.threads
        feed = {k: v[:batch] for k, v in data.evalset.inputs.items()}
        feed = {s.name: feed[s.name].reshape(s.shape) for s in prepared.inputs}
        with progress.stage("fp32 reference"):
            ref_sess = Session(prepared.model_bytes, threads)
            ref = run_outputs(ref_sess, data.evalset, batch)
        unpruned, pruning = prepared.model_bytes, None
        if plan.prune.sparsity is not None and plan.prune.train is None:
            from edgepack.host.build.prune import prune_onnx

            with progress.stage(f"pruning to {plan.prune.sparsity:.0%}"):
                pruned = prune_onnx(prepared.model_bytes, plan.prune.sparsity)
            prepared = replace(prepared, model_bytes=pruned.model_bytes)
            pruning = {"sparsity": pruned.sparsity_achieved, "notes": list(pruned.notes),
                       "fine_tuned": False}
        return _OnnxBaseline(imported=imported, work=work, inputs=prepared.inputs,
                             outputs=prepared.outputs, data=data, reference=ref,
                             threads=threads, prepared=prepared,
                             ref_session=ref_sess, feed=feed, unpruned=unpruned, pruning=pruning)

    def device_candidates(self, plan: BuildPlan) -> list[tuple[str, BuildPlan]]:
        """fp32, fp16 and each int8 scheme of the profile (or dynamic): the devices choose."""
        q = plan.profile.quantization
        out = [("fp32", plan.with_quantize(mode="none")), ("fp16", plan.with_quantize(mode="fp16"))]
        if plan.mode == "int8" or plan.data.calibration:
            for scheme in dict.fromkeys([q.scheme, *q.candidates]):
                out.append((scheme.label, plan.with_quantize(mode="int8", scheme=scheme)))
        elif plan.mode == "dynamic":
            out.append(("dynamic", plan.with_quantize(mode="dynamic")))
        return out

    # ------------------------------------------------------------------ optimize + gate
    def optimize(self, base: _OnnxBaseline, plan: BuildPlan, progress: Progress) -> _Optimized:
        mode, float_note = _mode(plan, base)
        if _searches(plan, mode):
            return self._search(base, plan, progress, float_note)
        q = plan.profile.quantization
        max_drop = plan.max_drop
        prepared = base.prepared
        if mode in ("none", "fp16", "dynamic"):
            if mode == "none":
                res = QuantResult(prepared.model_bytes, "none", None, 0)
            else:
                with progress.stage(f"{mode} conversion"):
                    res = (convert_fp16(prepared.model_bytes,
                                        keep_io_types=plan.quantize.keep_io_types)
                           if mode == "fp16" else quantize_dynamic(prepared.model_bytes, q.scheme))
            cand = _measure(res, base, plan.data.batch)
            if mode != "none":
                gate.check_drop(cand.metrics, max_drop,
                                {"fp16": "fp16", "dynamic": "dynamic int8"}[mode])
            fp32_lat = _time([cand], base, progress)
            return _Optimized(cand, [], fp32_lat, None, mode, float_note)
        return self._int8(base, plan, progress, float_note)

    def _int8(self, base: _OnnxBaseline, plan: BuildPlan, progress: Progress,
              float_note: str | None) -> _Optimized:
        q = plan.profile.quantization
        calib, max_drop, method = base.data.calib, plan.max_drop, plan.calibration_method
        batch, model_bytes = plan.data.batch, base.prepared.model_bytes
        assert calib is not None  # the plan checked it
        schemes = [plan.quantize.scheme or q.scheme]
        if plan.quantize.scheme is None and plan.quantize.variants and \
                plan.profile.host_can_time and q.candidates:
            schemes = list(dict.fromkeys([q.scheme, *q.candidates]))
        cands: list[_Candidate] = []
        for scheme in schemes:
            with progress.stage(f"int8 {scheme.label} calibration ({method})",
                                total=len(calib)) as tick:
                res = quantize_static(model_bytes, calib, scheme, method=method, batch=batch,
                                      tick=tick, cache_dir=base.work)
            with progress.stage(f"int8 {scheme.label} validation"):
                cands.append(_measure(res, base, batch))
        if not any(c.result.quantized_ops for c in cands):
            # No op has an int8 kernel (tree ensembles, label post-processing): ship the float
            # model; the report says nothing was quantized.
            cand = _measure(QuantResult(model_bytes, "int8", q.scheme, 0), base, batch)
            return _Optimized(cand, [], _time([cand], base, progress), None, "int8", float_note)
        passing = [c for c in cands if c.metrics.drop_points <= max_drop and c.result.quantized_ops]
        kept: list[str] = []
        if not passing:
            best, kept = _int8_with_fallback(base, q.scheme, method, max_drop, batch, progress)
            cands.append(best)
        fp32_lat = _time(cands, base, progress, max_drop)
        choice = _choose(cands, max_drop, q.scheme, forced=True, fp32_lat=fp32_lat)
        best = cands[choice.winner]
        variants = _variants(cands, choice, max_drop) if len(cands) > 1 else None
        return _Optimized(best, kept, fp32_lat, variants, "int8", float_note,
                          forced_slower=plan.quantize.mode == "int8" and choice.slower_than_fp32)

    def _search(self, base: _OnnxBaseline, plan: BuildPlan, progress: Progress,
                float_note: str | None) -> _Optimized:
        """fp32, dynamic int8 and each static scheme: all timed together, then gated fastest
        first — only while a candidate can still win (faster than fp32, and within
        EQUAL_SPEED of the fastest that passed)."""
        q = plan.profile.quantization
        calib, max_drop, method = base.data.calib, plan.max_drop, plan.calibration_method
        batch, model_bytes = plan.data.batch, base.prepared.model_bytes
        fp32 = QuantResult(model_bytes, "none", None, 0)
        cands = [_Candidate(fp32, compare(base.outputs, base.reference, base.reference,
                                          base.data.evalset.labels), base.reference)]
        notes: list[str] = []
        made: list[QuantResult] = []
        ops = base.prepared.op_counts
        if ops.get("Conv", 0) > sum(ops.get(o, 0) for o in ("MatMul", "Gemm", "Gather")):
            notes.append("dynamic int8 not tried: a convolutional model, and onnxruntime's "
                         "dynamic ConvInteger kernels are slower than fp32 Conv")
        else:
            with progress.stage("dynamic int8 conversion"):
                try:
                    made.append(quantize_dynamic(model_bytes, q.scheme))
                except ModelError as exc:
                    notes.append(f"dynamic int8 candidate skipped: {exc.message}")
        for scheme in (dict.fromkeys([q.scheme, *q.candidates]) if calib is not None else ()):
            with progress.stage(f"int8 {scheme.label} calibration ({method})",
                                total=len(calib)) as tick:
                try:
                    made.append(quantize_static(model_bytes, calib, scheme, method=method,
                                                batch=batch, tick=tick, cache_dir=base.work))
                except ModelError as exc:
                    notes.append(f"int8 {scheme.label} candidate skipped: {exc.message}")
        cands += [_Candidate(r, _UNGATED, Outputs([]), gated=False) for r in made
                  if r.quantized_ops]
        fp32_lat = _time(cands, base, progress)
        self._gate_fastest_first(cands, base, batch, max_drop, fp32_lat, progress)
        quantized = [c for c in cands if c.result.mode != "none"]
        kept: list[str] = []
        if calib is not None and quantized and not any(
                c.gated and c.metrics.drop_points <= max_drop for c in quantized) and any(
                c.latency["p50_ms"] < fp32_lat["p50_ms"] for c in quantized
                if c.result.mode == "int8"):
            try:  # int8 would be faster but fails the gate: keep the worst nodes in float
                fallback, kept = _int8_with_fallback(base, q.scheme, method, max_drop, batch,
                                                     progress)
                cands.append(fallback)
                _time([fallback], base, progress)
            except GateError as exc:
                notes.append(f"int8 with nodes kept in float: {exc.message}")
        choice = _choose(cands, max_drop, q.scheme, forced=False, fp32_lat=fp32_lat)
        best = cands[choice.winner]
        if best.result.mode != "int8" or not best.result.excluded_nodes:
            kept = []
        if not quantized:
            notes.append("no candidate quantized anything (no ops with int8 kernels): fp32 ships")
        return _Optimized(best, kept, fp32_lat, _variants(cands, choice, max_drop),
                          best.result.mode, float_note, chosen_by=choice.why,
                          search_notes=tuple(notes))

    @staticmethod
    def _gate_fastest_first(cands: list[_Candidate], base: _OnnxBaseline, batch: int,
                            max_drop: float, fp32_lat: dict, progress: Progress) -> None:
        """Gate the timed candidates fastest first; stop once none left can win."""
        passed_p50 = None
        for i in sorted(range(len(cands)), key=lambda k: cands[k].latency["p50_ms"]):
            c = cands[i]
            p50 = c.latency["p50_ms"]
            if c.gated:
                continue
            if p50 > fp32_lat["p50_ms"] or (passed_p50 is not None and
                                             p50 > passed_p50 * EQUAL_SPEED):
                continue  # cannot win: slower than fp32, or than a passing one
            with progress.stage(f"{c.label} validation"):
                cands[i] = _measure(c.result, base, batch, c.session)
            cands[i].latency = c.latency
            if cands[i].metrics.drop_points <= max_drop and passed_p50 is None:
                passed_p50 = p50

    # ------------------------------------------------------------------ assemble
    def assemble(self, base: _OnnxBaseline, opt: _Optimized, plan: BuildPlan,
                 progress: Progress) -> Assembly:
        profile, prepared, best = plan.profile, base.prepared, opt.best
        res, mode = best.result, opt.mode
        measured = gate.Measured(len(base.unpruned), len(res.model_bytes), best.metrics,
                                 base.data.source, opt.fp32_latency, best.latency, base.threads)
        gate.check_budget(measured.optimized_bytes, profile)
        warnings = [opt.float_note] if opt.float_note else []
        warnings.extend(res.notes)
        if mode in ("int8", "dynamic") and res.quantized_ops == 0:
            warnings.append("nothing in this model was quantized (no ops with int8 kernels): "
                            "the bundle is float32")
        warnings += gate.host_warnings(measured, profile, mode=mode, label=best.label,
                                       forced=opt.forced_slower)
        effective = mode if (mode not in ("int8", "dynamic") or res.quantized_ops) else "none"
        summary = {"none": "fp32 (no quantization)", "fp16": "fp16 weights and compute"
                   + (", float32 I/O" if plan.quantize.keep_io_types else ""),
                   "dynamic": f"dynamic int8 ({best.label})",
                   "int8": f"static int8 {best.label}"}[effective]
        if opt.kept:
            summary += f", {len(opt.kept)} node(s) in float"
        calib, s = base.data.calib, res.scheme
        optimization: dict[str, Any] = {
            "mode": effective, "requested": plan.mode, "summary": summary,
            "format": s.format if s and effective == "int8" else None,
            "activation_type": s.activation_type if s and effective == "int8" else None,
            "weight_type": s.weight_type if s and effective in ("int8", "dynamic") else None,
            "per_channel": s.per_channel if s and effective != "none" else None,
            "reduce_range": s.reduce_range if s and effective != "none" else None,
            "calibration_method": plan.calibration_method if effective == "int8" else None,
            "calibration_samples": len(calib) if calib is not None and effective == "int8"
            else 0,
            "calibration_fingerprint": calib.fingerprint() if calib is not None else None,
            "quantized_ops": res.quantized_ops,
            "nodes_in_float": opt.kept,
            "preflight": list(prepared.steps),
            "warnings": warnings,
        }
        if opt.chosen_by:
            optimization["chosen_by"] = opt.chosen_by
            optimization["search_notes"] = list(opt.search_notes)
        if opt.forced_slower:
            optimization["forced"] = {"mode": plan.mode, "slower_than_fp32": True,
                                      "speedup_p50": measured.speedup}
        pruning = dict(base.pruning) if base.pruning else None
        if plan.prune.sparsity is not None:
            from edgepack.host.build.prune import sparsity_report

            pruning = pruning or {}
            optimization["pruning"] = dict(pruning)
            pruning["report"] = sparsity_report(res.model_bytes, baseline=base.unpruned).to_dict()
        golden, n_golden = package.golden(prepared.inputs, base.data.evalset, best.outputs,
                                          plan.data.batch)
        inputs, outputs = _entries(prepared.inputs), _entries(prepared.outputs)
        manifest = package.manifest(
            plan,
            model={"file": "model.onnx", "format": "onnx", "inputs": inputs, "outputs": outputs,
                   "opset": prepared.opset},
            runtime={"name": "onnxruntime",
                     "min_version": _ORT_FOR_OPSET.get(prepared.opset, "1.17"),
                     "threads": profile.runtime.threads,
                     "providers": list(profile.runtime.providers)},
            optimization=optimization, metrics=measured.manifest_metrics(profile),
            health={"golden": "golden.npz", "samples": n_golden,
                    **package.health(effective, base.reference)},
            toolchain=package.toolchain())
        imported = base.imported
        report = BuildReport(
            model={"source": str(plan.model), "kind": imported.kind,
                   "import_notes": list(imported.notes), "inputs": inputs, "outputs": outputs,
                   "preflight": list(prepared.steps), "ops": prepared.op_counts,
                   "source_opset": prepared.source_opset,
                   **getattr(imported, "details", {})},
            optimization=optimization, metrics=measured.report_metrics(profile),
            warnings=warnings, timings_s=dict(progress.timings), variants=opt.variants,
            pruning=pruning)
        drift, skipped = _drift_sample(base, res.model_bytes, best.outputs, plan.data.batch)
        return Assembly(manifest, res.model_bytes, {}, golden, report, drift, skipped)


def _gate_data(plan: BuildPlan, prepared: PreparedModel, domain: Any = None) -> Any:
    cap = plan.quantize.calibration_samples or plan.profile.quantization.calibration_samples
    return load_gate_data(prepared.inputs, calibration=plan.data.calibration,
                          eval=plan.data.eval, sample_input=plan.data.sample_input, cap=cap,
                          domain=domain)


def _entries(specs: Any) -> list[dict]:
    return [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape), "quantization": None}
            for s in specs]


def _measure(result: QuantResult, base: _OnnxBaseline, batch: int,
             session: Session | None = None) -> _Candidate:
    outs = run_outputs(session or Session(result.model_bytes, base.threads), base.data.evalset,
                       batch)
    metrics = compare(base.prepared.outputs, base.reference, outs, base.data.evalset.labels)
    return _Candidate(result, metrics, outs)


def _time(cands: list[_Candidate], base: _OnnxBaseline, progress: Progress,
          max_drop: float | None = None) -> dict:
    """Time fp32 and ``cands`` interleaved in one run; fills ``latency``, returns fp32's.

    Candidates over ``max_drop`` cannot ship and are not timed; fp32 candidates are the
    reference session's figures.
    """
    sessions = {"fp32": base.ref_session}
    for i, c in enumerate(cands):
        if c.result.mode != "none" and (max_drop is None or not c.gated
                                        or c.metrics.drop_points <= max_drop):
            c.session = c.session or Session(c.result.model_bytes, base.threads)
            sessions[f"{i}"] = c.session
    with progress.stage("timing fp32 and optimized, interleaved"):
        # A few runs per slot, six rotating rounds: enough to rank candidates whose speeds
        # differ by more than EQUAL_SPEED, at a cost that stays small beside calibration.
        lat = measure_interleaved(sessions, base.feed, budget_s=0.4 * len(sessions),
                                  min_runs=2, warmup=2, settle_s=0.02, reference="fp32")
    for i, c in enumerate(cands):
        c.latency = lat["fp32"] if c.result.mode == "none" else lat.get(
            f"{i}", {"p50_ms": None, "untimed": "failed the gate"})
    return lat["fp32"]


def _choose(cands: list[_Candidate], max_drop: float, default: QuantScheme, *, forced: bool,
            fp32_lat: dict) -> HostChoice:
    """:func:`choose_on_host` over the measured candidates (fp32 timed beside them)."""
    variants = [Variant(c.label, c.result.mode, len(c.result.model_bytes),
                        c.latency["p50_ms"] if c.latency["p50_ms"] is not None else math.inf,
                        c.metrics.drop_points,
                        c.gated and c.metrics.drop_points <= max_drop and (
                            c.result.mode == "none" or c.result.quantized_ops > 0),
                        default=c.result.mode == "int8" and c.result.scheme == default
                        and not c.result.excluded_nodes, gated=c.gated)
                for c in cands]
    if forced:
        variants.append(Variant("fp32", "none", 0, fp32_lat["p50_ms"], 0.0, True))
    choice = choose_on_host(variants, forced=forced)
    assert choice is not None  # forced: a passing candidate exists; else fp32 always passes
    return choice


def _variants(cands: list[_Candidate], choice: HostChoice, max_drop: float) -> list[dict]:
    """The report's candidate table: every candidate with size, time, gate result and why."""
    return [{"scheme": c.label, "mode": c.result.mode, "bytes": len(c.result.model_bytes),
             "latency": c.latency, "drop_points": c.metrics.drop_points if c.gated else None,
             "basis": c.metrics.basis,
             "passed": c.metrics.drop_points <= max_drop if c.gated else None,
             "result": result, "why": choice.why if result == "chosen" else result}
            for c, result in zip(cands, choice.results, strict=False)]


def _int8_with_fallback(base: _OnnxBaseline, scheme: QuantScheme, method: str, max_drop: float,
                        batch: int, progress: Progress) -> tuple[_Candidate, list[str]]:
    """Keep the nodes that hurt most in float until the gate passes (or give up)."""
    import onnx

    model_bytes, calib, evalset = base.prepared.model_bytes, base.data.calib, base.data.evalset
    assert calib is not None
    with progress.stage("ranking sensitive nodes"):
        qdq = quantize_static(model_bytes, calib, replace(scheme, format="QDQ"), method=method,
                              batch=batch, cache_dir=base.work)
        sample = evalset.take(slice(0, min(len(evalset), 32)))
        ranked = [name for name, _ in rank_sensitive_nodes(model_bytes, qdq.model_bytes, sample,
                                                           batch)]
    if not ranked:
        raise GateError(f"int8 ({scheme.label}) fails the gate and no node could be ranked for "
                        "keeping in float. Try `quantize=` fp16 or dynamic, or raise "
                        "`max_drop=`.", stage="gate", field="max_drop")
    n_nodes = len(onnx.load_from_string(model_bytes).graph.node)
    limit = max(1, int(n_nodes * 0.3))
    k, last = 1, None
    while k <= min(limit, len(ranked)):
        excluded = ranked[:k]
        with progress.stage(f"int8 with {k} node(s) in float", total=len(calib)) as tick:
            res = quantize_static(model_bytes, calib, scheme, method=method, batch=batch,
                                  nodes_to_exclude=excluded, tick=tick, cache_dir=base.work)
        last = _measure(res, base, batch)
        if last.metrics.drop_points <= max_drop:
            return last, excluded
        k *= 2
    drop = last.metrics.drop_points if last else float("nan")
    raise GateError(
        f"int8 ({scheme.label}) loses more than the allowed {max_drop:g} points even with the "
        f"{min(limit, len(ranked))} most sensitive nodes kept in float (best drop "
        f"{drop:.2f} points; kept: {', '.join(ranked[:min(limit, len(ranked))])}). Try "
        "`calibration_method=` entropy or percentile, more or more representative calibration "
        "data, `quantize=` fp16, or raise `max_drop=`.", stage="gate", field="max_drop")



def _drift_sample(base: _OnnxBaseline, model_bytes: bytes, eval_outputs: Outputs, batch: int
                  ) -> tuple[DriftSample | None, str]:
    """Calibration and eval inputs with the chosen model's outputs on them (drift.json)."""
    from edgepack.host.build.drift_reference import NO_DRIFT_DATA, drift_sample

    data = base.data
    if data.random:
        return None, NO_DRIFT_DATA
    sets = [(data.evalset, eval_outputs)]
    if data.calib is not None and data.calib is not data.evalset:
        sets.append((data.calib, run_outputs(Session(model_bytes, base.threads), data.calib,
                                             batch)))
    return drift_sample(base.inputs, base.outputs, sets), ""
