"""``edgepack build``: import → pre-flight → optimize → validate (gate) → package.

One function, :func:`run_build`, driven by a frozen :class:`BuildConfig`. Each stage lives in
its own module; this one decides the plan from the flags and the target profile and writes the
report every stage contributes to.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.agent.errors import BudgetError, DataError, GateError, ModelError
from edgepack.agent.profiles import Profile, QuantScheme, load_profile
from edgepack.host.build.convert_onnx import PreparedModel, prepare_onnx
from edgepack.host.build.data import Dataset, load_dataset
from edgepack.host.build.quantize import QuantResult, convert_fp16, quantize_dynamic, quantize_static
from edgepack.host.build.report import Progress
from edgepack.host.build.validate import (
    GateMetrics,
    Outputs,
    Session,
    compare,
    measure_interleaved,
    rank_sensitive_nodes,
    run_outputs,
)

__all__ = ["BuildConfig", "BuildResult", "run_build"]

GOLDEN_SAMPLES = 8
# A candidate must be this much faster than the profile's default scheme to replace it: closer
# than that is within timing noise on a shared machine, and flipping between runs would make
# builds irreproducible for no gain.
PREFER_DEFAULT = 1.10
HOLDOUT_FRACTION = 0.2
# onnxruntime release that first runs each opset: the device's minimum runtime version.
_ORT_FOR_OPSET = {13: "1.8", 14: "1.10", 15: "1.11", 16: "1.12", 17: "1.13", 18: "1.14",
                  19: "1.16", 20: "1.17", 21: "1.20", 22: "1.20", 23: "1.22"}


@dataclass(frozen=True)
class BuildConfig:
    """Everything ``edgepack build`` was asked to do."""

    model: str
    target: str
    quantize: str = "auto"  # auto | int8 | dynamic | fp16 | none
    calibration: str | None = None
    calibration_method: str | None = None
    calibration_samples: int | None = None
    eval_data: str | None = None
    max_drop: float | None = None
    batch: int = 1
    name: str | None = None
    version: str = "1.0.0"
    key: str | None = None
    out_dir: str = "dist"
    variants: bool = True
    keep_io_types: bool = True
    sample_input: str | None = None
    format: str | None = None  # onnx | tflite | tflm; default: the target's first format
    tflite_io: str | None = None  # float32 | int8 | uint8; default: the target's
    prune: float | None = None  # magnitude-pruning sparsity in (0, 1)
    train: str | None = None  # NPZ to fine-tune a pruned Keras model on
    scheme: QuantScheme | None = None  # int8 scheme instead of the profile's default
    profile_on: tuple[str, ...] = ()  # devices that measure the candidates and choose
    broker: str | None = None
    fleet: str = "default"
    profile_timeout: float = 600.0
    profile_runs: int = 50
    profile_cache: str | None = None


@dataclass
class BuildResult:
    path: Path
    bundle_id: str
    report: dict
    model_bytes: bytes = field(repr=False, default=b"")


@dataclass
class _Candidate:
    result: QuantResult
    metrics: GateMetrics
    outputs: Outputs
    latency: dict

    @property
    def label(self) -> str:
        r = self.result
        return r.scheme.label if r.mode in ("int8", "dynamic") and r.scheme else r.mode


def host_cpu() -> str:
    """The host CPU's model name (``platform.processor()`` is empty on Linux)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _host_threads(profile: Profile) -> int:
    want = profile.runtime.threads or profile.hardware.cores
    return max(1, min(want, os.cpu_count() or 1))


def _load_inputs(cfg: BuildConfig, profile: Profile, prepared: PreparedModel
                 ) -> tuple[Dataset | None, Dataset, str]:
    """Calibration set and eval set (held out from calibration when --eval is absent)."""
    cap = cfg.calibration_samples or profile.quantization.calibration_samples
    calib = evalset = None
    if cfg.calibration:
        calib = load_dataset(cfg.calibration, prepared.inputs, what="calibration")
    if cfg.eval_data:
        evalset = load_dataset(cfg.eval_data, prepared.inputs, what="eval")
        source = f"--eval {Path(cfg.eval_data).name}"
    elif calib is not None and len(calib) >= 2:
        n_hold = max(1, int(round(len(calib) * HOLDOUT_FRACTION)))
        evalset = calib.take(slice(len(calib) - n_hold, len(calib)))
        calib = calib.take(slice(0, len(calib) - n_hold))
        source = f"{n_hold} samples held out of --calibration"
    elif calib is not None:
        evalset = calib
        source = "the single calibration sample (no --eval given)"
    elif cfg.sample_input:
        evalset = load_dataset(cfg.sample_input, prepared.inputs, what="sample-input")
        source = f"--sample-input {Path(cfg.sample_input).name} (no --eval given)"
    else:
        rng = np.random.default_rng(0)
        arrays = {}
        for s in prepared.inputs:
            shape = (16, *s.shape[1:])
            dt = np.dtype(s.dtype)
            arrays[s.name] = (rng.standard_normal(shape).astype(dt) if dt.kind == "f"
                              else rng.integers(0, 2, shape).astype(dt))
        evalset = Dataset(arrays, None, "random")
        source = "16 random inputs (no --eval or --calibration given: pass --eval for a real gate)"
    if calib is not None and len(calib) > cap:
        calib = calib.take(slice(0, cap))
    return calib, evalset, source


def _measure(result: QuantResult, prepared: PreparedModel, evalset: Dataset, ref: Outputs,
             batch: int, threads: int, feed: dict) -> _Candidate:
    sess = Session(result.model_bytes, threads)
    outs = run_outputs(sess, evalset, batch)
    metrics = compare(prepared.outputs, ref, outs, evalset.labels)
    return _Candidate(result, metrics, outs, {})


def _time(cands: list[_Candidate], ctx: dict, progress: Progress) -> None:
    """Time fp32 and ``cands`` interleaved in one run; fills ``latency`` and ``ctx``."""
    sessions = {"fp32": ctx["ref_session"]}
    for i, c in enumerate(cands):
        sessions[f"{i}"] = Session(c.result.model_bytes, ctx["threads"])
    with progress.stage("timing fp32 and optimized, interleaved"):
        lat = measure_interleaved(sessions, ctx["feed"], budget_s=0.6 * len(sessions))
    ctx["fp32_latency"] = lat["fp32"]
    for i, c in enumerate(cands):
        c.latency = lat[f"{i}"]


def _int8_with_fallback(prepared: PreparedModel, calib: Dataset, evalset: Dataset,
                        ref: Outputs, scheme: QuantScheme, method: str, max_drop: float,
                        ctx: dict, progress: Progress) -> tuple[_Candidate, list[str]]:
    """Keep the nodes that hurt most in float until the gate passes (or give up)."""
    import onnx

    batch, threads, feed = ctx["batch"], ctx["threads"], ctx["feed"]
    qdq_scheme = replace(scheme, format="QDQ")
    with progress.stage("ranking sensitive nodes"):
        qdq = quantize_static(prepared.model_bytes, calib, qdq_scheme, method=method, batch=batch,
                              cache_dir=ctx["work"])
        sample = evalset.take(slice(0, min(len(evalset), 32)))
        ranked = [name for name, _ in rank_sensitive_nodes(prepared.model_bytes,
                                                           qdq.model_bytes, sample, batch)]
    if not ranked:
        raise GateError(f"int8 ({scheme.label}) fails the gate and no node could be ranked for "
                        "keeping in float. Try --quantize fp16 or dynamic, or raise --max-drop.",
                        stage="gate")
    n_nodes = len(onnx.load_from_string(prepared.model_bytes).graph.node)
    limit = max(1, int(n_nodes * 0.3))
    k, last = 1, None
    while k <= min(limit, len(ranked)):
        excluded = ranked[:k]
        with progress.stage(f"int8 with {k} node(s) in float", total=len(calib)) as tick:
            res = quantize_static(prepared.model_bytes, calib, scheme, method=method,
                                  batch=batch, nodes_to_exclude=excluded, tick=tick,
                                  cache_dir=ctx["work"])
        last = _measure(res, prepared, evalset, ref, batch, threads, feed)
        if last.metrics.drop_points <= max_drop:
            return last, excluded
        k *= 2
    drop = last.metrics.drop_points if last else float("nan")
    raise GateError(
        f"int8 ({scheme.label}) loses more than the allowed {max_drop:g} points even with the "
        f"{min(limit, len(ranked))} most sensitive nodes kept in float (best drop "
        f"{drop:.2f} points; kept: {', '.join(ranked[:min(limit, len(ranked))])}). Try "
        "--calibration-method entropy or percentile, more or more representative calibration "
        "data, --quantize fp16, or raise --max-drop.", stage="gate")


def _optimize(cfg: BuildConfig, profile: Profile, prepared: PreparedModel, mode: str,
              calib: Dataset | None, evalset: Dataset, ref: Outputs, ctx: dict,
              progress: Progress, report: dict) -> tuple[_Candidate, list[str]]:
    q = profile.quantization
    max_drop = cfg.max_drop if cfg.max_drop is not None else q.max_drop_points
    method = cfg.calibration_method or q.calibration_method
    batch, threads, feed = ctx["batch"], ctx["threads"], ctx["feed"]
    if mode in ("none", "fp16", "dynamic"):
        if mode == "none":
            res = QuantResult(prepared.model_bytes, "none", None, 0)
        else:
            with progress.stage(f"{mode} conversion"):
                res = (convert_fp16(prepared.model_bytes, keep_io_types=cfg.keep_io_types)
                       if mode == "fp16" else quantize_dynamic(prepared.model_bytes, q.scheme))
        cand = _measure(res, prepared, evalset, ref, batch, threads, feed)
        if mode != "none":
            _gate(cand, max_drop, {"fp16": "fp16", "dynamic": "dynamic int8"}[mode])
        _time([cand], ctx, progress)
        return cand, []
    # static int8
    assert calib is not None  # checked by the caller
    schemes = [cfg.scheme or q.scheme]
    if cfg.scheme is None and cfg.variants and profile.host_can_time and q.candidates:
        schemes = list(dict.fromkeys([q.scheme, *q.candidates]))
    cands: list[_Candidate] = []
    for scheme in schemes:
        with progress.stage(f"int8 {scheme.label} calibration ({method})",
                            total=len(calib)) as tick:
            res = quantize_static(prepared.model_bytes, calib, scheme, method=method,
                                  batch=batch, tick=tick, cache_dir=ctx["work"])
        with progress.stage(f"int8 {scheme.label} validation"):
            cands.append(_measure(res, prepared, evalset, ref, batch, threads, feed))
    if not any(c.result.quantized_ops for c in cands):
        # No op has an int8 kernel (tree ensembles, label post-processing): ship the float
        # model; the report says nothing was quantized.
        res = QuantResult(prepared.model_bytes, "int8", q.scheme, 0)
        cand = _measure(res, prepared, evalset, ref, batch, threads, feed)
        _time([cand], ctx, progress)
        return cand, []
    passing = [c for c in cands if c.metrics.drop_points <= max_drop and c.result.quantized_ops]
    kept: list[str] = []
    if passing:
        _time(cands, ctx, progress)
        best = min(passing, key=lambda c: c.latency["p50_ms"])
        default = cands[0]
        if default in passing and best.latency["p50_ms"] * PREFER_DEFAULT > \
                default.latency["p50_ms"]:
            best = default  # within timing noise of the profile's scheme: keep the default
    else:
        best, kept = _int8_with_fallback(prepared, calib, evalset, ref, q.scheme, method,
                                         max_drop, ctx, progress)
        cands.append(best)
        _time(cands, ctx, progress)
    if len(cands) > 1:
        report["variants"] = [{
            "scheme": c.label + (f" +{len(c.result.excluded_nodes)} float" if
                                 c.result.excluded_nodes else ""),
            "bytes": len(c.result.model_bytes), "latency": c.latency,
            "drop_points": c.metrics.drop_points,
            "passed": c.metrics.drop_points <= max_drop,
            "result": "chosen" if c is best else (
                f"gate: drop {c.metrics.drop_points:.2f} > {max_drop:g} pt"
                if c.metrics.drop_points > max_drop else
                f"slower: p50 {c.latency['p50_ms'] / best.latency['p50_ms']:.2f}x of chosen"
                if c.latency["p50_ms"] >= best.latency["p50_ms"] else
                f"p50 {c.latency['p50_ms'] / best.latency['p50_ms']:.2f}x of the default: "
                f"under {PREFER_DEFAULT:.2f}x is noise, default kept"),
        } for c in cands]
    return best, kept


def _choose_on_devices(cfg: BuildConfig, profile: Profile, prepared: PreparedModel,
                       evalset: Dataset, ref: Outputs, mode: str, name: str, work: Path,
                       progress: Progress) -> BuildResult:
    """``--profile-on``: package every candidate, let the named devices measure and gate them,
    ship the fastest that passes on the devices (with their figures in the manifest)."""
    from edgepack.agent.bundle import sha256_file
    from edgepack.host.fleet.profiling import (
        Candidate,
        ProfileCache,
        choose_on_devices,
        stamp_bundle,
    )

    if not cfg.broker or not cfg.key:
        raise DataError("--profile-on needs --broker (where the devices are) and --key (jobs "
                        "and candidate bundles are signed)")
    q = profile.quantization
    plans: list[tuple[str, BuildConfig]] = [("fp32", replace(cfg, quantize="none")),
                                            ("fp16", replace(cfg, quantize="fp16"))]
    if mode == "int8" or cfg.calibration:
        for scheme in dict.fromkeys([q.scheme, *q.candidates]):
            plans.append((scheme.label, replace(cfg, quantize="int8", scheme=scheme)))
    elif mode == "dynamic":
        plans.append(("dynamic", replace(cfg, quantize="dynamic")))
    built: dict[str, BuildResult] = {}
    skipped: dict[str, str] = {}
    for label, plan in plans:
        with progress.stage(f"candidate {label}"):
            try:
                built[label] = run_build(replace(plan, profile_on=(), variants=False,
                                                 out_dir=str(work / "candidates" / label),
                                                 name=name))
            except GateError as exc:  # fails the gate on the host already: not sent to devices
                skipped[label] = f"failed the gate on the host: {exc.message}"
    max_drop = cfg.max_drop if cfg.max_drop is not None else q.max_drop_points
    with progress.stage(f"profiling {len(built)} candidates on {', '.join(cfg.profile_on)}"):
        choice = choose_on_devices(
            [Candidate(label, str(r.path)) for label, r in built.items()],
            devices=cfg.profile_on, broker=cfg.broker, key_path=cfg.key, fleet=cfg.fleet,
            input_specs=prepared.inputs, output_specs=prepared.outputs, evalset=evalset,
            reference=ref, batch=cfg.batch, max_drop=max_drop,
            rss_budget_mb=profile.budgets.rss_mb, p95_budget_ms=profile.budgets.p95_ms,
            runs=cfg.profile_runs, timeout=cfg.profile_timeout,
            cache=ProfileCache(cfg.profile_cache) if cfg.profile_cache
            else ProfileCache.default())
    winner = choice.require()
    report = dict(built[winner.label].report)
    report["device_profile"] = {**choice.to_dict(), "skipped_on_host": skipped}
    out = Path(cfg.out_dir) / f"{name}-{cfg.version}-{profile.name}.edgepack"
    stamp_bundle(winner.bundle, out, choice.manifest_entry(), key_path=cfg.key,
                 report_extra={"device_profile": choice.to_dict()})
    bid = sha256_file(out)
    report["bundle"] = {**report["bundle"], "path": str(out), "bundle_id": bid,
                        "bytes": out.stat().st_size}
    return BuildResult(path=out, bundle_id=bid, report=report)


def _gate(cand: _Candidate, max_drop: float, what: str) -> None:
    if cand.metrics.drop_points > max_drop:
        raise GateError(f"{what} loses {cand.metrics.drop_points:.2f} points "
                        f"({cand.metrics.basis}), over the allowed {max_drop:g}. Try another "
                        "--quantize mode or raise --max-drop.", stage="gate")


def _tensor_entries(specs: Any, model_bytes: bytes) -> list[dict]:
    return [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape), "quantization": None}
            for s in specs]


def _golden(prepared: PreparedModel, evalset: Dataset, outputs: Outputs,
            batch: int) -> tuple[dict, int]:
    """Up to GOLDEN_SAMPLES model-shaped feeds (``batch`` rows each) and their outputs."""
    n = max(1, min(GOLDEN_SAMPLES, len(evalset) // batch))
    rows = n * batch
    arrays: dict[str, np.ndarray] = {}
    for i, spec in enumerate(prepared.inputs):
        arrays[f"input_{i}"] = evalset.inputs[spec.name][:rows].reshape(n, *spec.shape)
    for j, arr in enumerate(outputs.arrays):
        if arr is not None:
            arrays[f"output_{j}"] = arr[:rows].reshape(n, batch, *arr.shape[1:])
    return arrays, n


def _health(mode: str, outputs: Outputs) -> dict:
    # Int8 kernels differ by a rounding step between CPUs (x86 VNNI vs ARM NEON), so the
    # device's check is looser than bit-exactness but tight enough to catch a broken model.
    loose = mode in ("int8", "dynamic")
    scale = max((float(np.abs(a).max()) for a in outputs.arrays
                 if a is not None and a.dtype.kind == "f"), default=1.0)
    return {"atol": (0.05 if loose else 1e-3) * max(scale, 1e-6) + 1e-5,
            "rtol": 0.05 if loose else 1e-3,
            "min_cosine": 0.99 if loose else 0.999,
            "min_label_agreement": 0.85 if loose else 1.0}


def _toolchain() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("edgepack", "onnx", "onnxruntime", "onnxconverter-common", "numpy"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def _created() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    t = (_dt.datetime.fromtimestamp(int(epoch), _dt.timezone.utc) if epoch
         else _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0))
    return t.isoformat().replace("+00:00", "Z")


def run_build(cfg: BuildConfig, progress: Progress | None = None) -> BuildResult:
    """Build a signed bundle for ``cfg.target``; raises EdgepackError subclasses on bad input."""
    progress = progress or Progress(enabled=False)
    profile = load_profile(cfg.target)
    src = Path(cfg.model)
    from edgepack.host.build.importers import detect_kind

    detect_kind(src)  # unknown formats fail before anything slow
    mode = profile.quantization.default if cfg.quantize == "auto" else cfg.quantize
    if mode == "int8" and not cfg.calibration:
        raise DataError("int8 quantization needs calibration data: pass --calibration data.npz "
                        "(a few hundred representative inputs keyed by input name), or use "
                        "--quantize dynamic (no calibration) or fp16.", target=profile.name)
    name = cfg.name or src.stem
    from edgepack.agent.bundle import parse_version
    from edgepack.agent.protocol import check_id

    check_id(name, "bundle name")
    parse_version(cfg.version)
    if cfg.format and cfg.format not in profile.runtime.formats:
        raise ModelError(f"target {profile.name} runs {'/'.join(profile.runtime.formats)}, not "
                         f"{cfg.format}", target=profile.name)
    if cfg.prune is not None and not 0.0 < cfg.prune < 1.0:
        raise ModelError(f"--prune takes a sparsity between 0 and 1 (exclusive), not {cfg.prune}")
    with tempfile.TemporaryDirectory(prefix="edgepack-build-") as work:
        src, prune_notes = _prune_keras_source(cfg, src, Path(work), progress)
        from edgepack.host.build.pipeline_tflite import run_tflite_build, wants_tflite

        if wants_tflite(cfg, profile):
            from edgepack.host.build.importers import import_model

            with progress.stage("import"):
                imported = import_model(src, workdir=Path(work), opset=profile.runtime.opset,
                                        sample_input=cfg.sample_input)
            return run_tflite_build(replace(cfg, name=name), profile, imported, progress)
        result = _build_onnx(cfg, profile, src, Path(work), mode, name, progress)
        if prune_notes:
            result.report.setdefault("pruning", {})["keras_fine_tuning"] = prune_notes
        return result


def _prune_keras_source(cfg: BuildConfig, src: Path, work: Path, progress: Progress
                        ) -> tuple[Path, dict | None]:
    """``--prune`` with ``--train`` on a Keras model: prune while fine-tuning, before export."""
    if cfg.prune is None or cfg.train is None:
        return src, None
    from edgepack.host.build.importers import detect_kind

    if detect_kind(src) != "keras":
        raise ModelError("--train fine-tunes Keras models only; for other models drop --train "
                         "(one-shot magnitude pruning under the accuracy gate)")
    from edgepack.host.build.distill import load_teacher, load_training_npz
    from edgepack.host.build.prune import prune_keras

    with progress.stage(f"pruning to {cfg.prune:.0%} with fine-tuning"):
        model = load_teacher(src, what="model")
        x, y = load_training_npz(cfg.train, model, flag="--train")
        pruned, result = prune_keras(model, cfg.prune, (x, y))
    out = work / f"{src.stem}-pruned.keras"
    out.write_bytes(result.model_bytes)
    return out, {"sparsity": result.sparsity_achieved, "notes": list(result.notes),
                 "fine_tuned_on": Path(cfg.train).name}


def _build_onnx(cfg: BuildConfig, profile: Profile, src: Path, work: Path, mode: str,
                name: str, progress: Progress) -> BuildResult:
    from edgepack.host.build.importers import import_model

    if "onnx" not in profile.runtime.formats:
        raise ModelError(
            f"target {profile.name} runs {'/'.join(profile.runtime.formats)} models only; this "
            "edgepack builds ONNX bundles for it not yet (TFLite and TFLM output are not "
            "supported). Pick an ONNX target (edgepack targets list).", target=profile.name)
    with progress.stage("import"):
        imported = import_model(src, workdir=work, opset=profile.runtime.opset,
                                sample_input=cfg.sample_input)
    if imported.onnx_path is None:
        raise ModelError(f"{src.name} is a {imported.kind} model, which packages only for TFLite "
                         f"targets; {profile.name} runs ONNX. Build from the source model "
                         "(Keras, SavedModel or ONNX) instead.", target=profile.name)
    float_note = None
    requested = mode
    if imported.float_only and mode in ("int8", "dynamic"):
        why = [n for n in imported.notes if "int8" in n] or ["no op has an int8 kernel"]
        float_note = f"nothing in this model was quantized: kept float32, not {mode} ({why[-1]})"
        mode = "none"
    with progress.stage("pre-flight"):
        prepared = prepare_onnx(imported.onnx_path, opset=profile.runtime.opset, batch=cfg.batch,
                                target=profile.name)
    fp32_size = len(prepared.model_bytes)
    budget_bytes = profile.budgets.model_mb * 1024 * 1024
    shrink = {"int8": 4.0, "dynamic": 4.0, "fp16": 2.0}.get(mode, 1.0)
    if fp32_size / shrink > budget_bytes:
        raise BudgetError(f"the model is {fp32_size / 2**20:.1f} MB in fp32; even {mode} "
                          f"(~{shrink:g}x smaller) cannot fit {profile.name}'s "
                          f"{profile.budgets.model_mb:g} MB model budget. Use a smaller model "
                          "(edgepack distill) or a bigger target.", target=profile.name)
    with progress.stage("loading data"):
        calib, evalset, eval_source = _load_inputs(cfg, profile, prepared)

    threads = _host_threads(profile)
    feed = {k: v[:cfg.batch] for k, v in evalset.inputs.items()}
    feed = {s.name: feed[s.name].reshape(s.shape) for s in prepared.inputs}
    with progress.stage("fp32 reference"):
        ref_sess = Session(prepared.model_bytes, threads)
        ref = run_outputs(ref_sess, evalset, cfg.batch)
    ctx = {"batch": cfg.batch, "threads": threads, "feed": feed, "ref_session": ref_sess,
           "work": work}
    if cfg.profile_on:
        return _choose_on_devices(cfg, profile, prepared, evalset, ref, mode, name, work,
                                  progress)

    report: dict[str, Any] = {"warnings": [float_note] if float_note else []}
    unpruned = prepared.model_bytes
    if cfg.prune is not None and cfg.train is None:
        from edgepack.host.build.prune import prune_onnx

        with progress.stage(f"pruning to {cfg.prune:.0%}"):
            pruned = prune_onnx(prepared.model_bytes, cfg.prune)
        prepared = replace(prepared, model_bytes=pruned.model_bytes)
        report["pruning"] = {"sparsity": pruned.sparsity_achieved, "notes": list(pruned.notes),
                             "fine_tuned": False}
    best, kept = _optimize(cfg, profile, prepared, mode, calib, evalset, ref, ctx, progress,
                           report)
    res = best.result
    fp32_lat = ctx["fp32_latency"]
    opt_size = len(res.model_bytes)
    if opt_size > budget_bytes:
        raise BudgetError(f"the optimized model is {opt_size / 2**20:.1f} MB, over "
                          f"{profile.name}'s {profile.budgets.model_mb:g} MB model budget",
                          target=profile.name)
    warnings: list[str] = report["warnings"]
    warnings.extend(res.notes)
    speedup = fp32_lat["p50_ms"] / best.latency["p50_ms"]
    if mode in ("int8", "dynamic") and res.quantized_ops == 0:
        warnings.append("nothing in this model was quantized (no ops with int8 kernels): the "
                        "bundle is float32")
    if mode != "none" and speedup < 1.0 and profile.host_can_time:
        warnings.append(f"the {best.label} model is SLOWER than fp32 on this host "
                        f"({speedup:.2f}x of fp32 speed, p50 {best.latency['p50_ms']:.3f} ms vs "
                        f"{fp32_lat['p50_ms']:.3f} ms); consider --quantize none or fp16")
    if not profile.host_can_time:
        warnings.append(f"latency was measured on this host ({platform.machine()}), not on "
                        f"{profile.hardware.cpu}: use it to compare variants, not as the target's "
                        "figure")
    if eval_source.startswith("16 random"):
        warnings.append("no eval or calibration data: the gate compared outputs on random inputs")

    effective = mode if (mode not in ("int8", "dynamic") or res.quantized_ops) else "none"
    summary = {"none": "fp32 (no quantization)", "fp16": "fp16 weights and compute"
               + (", float32 I/O" if cfg.keep_io_types else ""),
               "dynamic": f"dynamic int8 ({best.label})",
               "int8": f"static int8 {best.label}"}[effective]
    if kept:
        summary += f", {len(kept)} node(s) in float"
    m = best.metrics
    optimization = {
        "mode": effective, "requested": requested, "summary": summary,
        "format": res.scheme.format if res.scheme and effective == "int8" else None,
        "activation_type": res.scheme.activation_type if res.scheme and effective == "int8"
        else None,
        "weight_type": res.scheme.weight_type if res.scheme and effective in ("int8", "dynamic")
        else None,
        "per_channel": res.scheme.per_channel if res.scheme and effective != "none" else None,
        "reduce_range": res.scheme.reduce_range if res.scheme and effective != "none" else None,
        "calibration_method": (cfg.calibration_method or profile.quantization.calibration_method)
        if effective == "int8" else None,
        "calibration_samples": len(calib) if calib is not None and effective == "int8" else 0,
        "calibration_fingerprint": calib.fingerprint() if calib is not None else None,
        "quantized_ops": res.quantized_ops,
        "nodes_in_float": kept,
        "preflight": list(prepared.steps),
        "warnings": warnings,
    }
    metrics = {
        "fp32_bytes": fp32_size, "optimized_bytes": opt_size,
        "size_ratio": fp32_size / opt_size,
        "top1_agreement": m.top1_agreement, "accuracy_fp32": m.accuracy_fp32,
        "accuracy_optimized": m.accuracy_optimized, "drop_points": m.drop_points,
        "min_cosine": m.min_cosine, "max_abs_error": m.max_abs_error,
        "eval_samples": m.samples, "eval_source": eval_source,
        "host_latency_ms": {"fp32": fp32_lat, "optimized": best.latency,
                            "cpu": host_cpu(),
                            "representative": profile.host_can_time, "threads": threads},
    }
    if cfg.prune is not None:
        from edgepack.host.build.prune import sparsity_report

        report.setdefault("pruning", {})["report"] = sparsity_report(
            res.model_bytes, baseline=unpruned).to_dict()
        optimization["pruning"] = {k: v for k, v in report["pruning"].items() if k != "report"}
    golden, n_golden = _golden(prepared, evalset, best.outputs, cfg.batch)

    manifest: dict[str, Any] = {
        "name": name, "version": cfg.version, "created": _created(), "target": profile.name,
        "model": {"file": "model.onnx", "format": "onnx",
                  "inputs": _tensor_entries(prepared.inputs, res.model_bytes),
                  "outputs": _tensor_entries(prepared.outputs, res.model_bytes),
                  "opset": prepared.opset},
        "runtime": {"name": "onnxruntime",
                    "min_version": _ORT_FOR_OPSET.get(prepared.opset, "1.17"),
                    "threads": profile.runtime.threads,
                    "providers": list(profile.runtime.providers)},
        "optimization": optimization, "metrics": metrics,
        "health": {"golden": "golden.npz", "samples": n_golden, **_health(effective, ref)},
        "budgets": {"p95_ms": profile.budgets.p95_ms, "peak_rss_mb": profile.budgets.rss_mb,
                    "model_mb": profile.budgets.model_mb},
        "toolchain": _toolchain(),
    }
    report.update({
        "model": {"source": str(src), "kind": imported.kind,
                  "import_notes": list(imported.notes), "inputs": manifest["model"]["inputs"],
                  "outputs": manifest["model"]["outputs"], "preflight": list(prepared.steps),
                  "ops": prepared.op_counts, "source_opset": prepared.source_opset},
        "optimization": optimization,
        "metrics": {"size": {"fp32_bytes": fp32_size, "optimized_bytes": opt_size,
                             "ratio": fp32_size / opt_size},
                    "accuracy": {**m.to_dict(), "source": eval_source},
                    "latency": {"fp32": fp32_lat, "optimized": best.latency,
                                "speedup_p50": speedup,
                                "representative": profile.host_can_time,
                                "threads": threads}},
        "timings_s": dict(progress.timings),
    })
    return package_build(cfg, profile, name, manifest, res.model_bytes, {}, golden, report,
                         warnings, progress)


def _json_default(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else float(v)


def package_build(cfg: BuildConfig, profile: Profile, name: str, manifest: dict,
                  model_bytes: bytes, files: dict[str, bytes], golden: dict[str, np.ndarray],
                  report: dict, warnings: list[str], progress: Progress) -> BuildResult:
    """Sign (with ``cfg.key``) and write ``NAME-VERSION-TARGET.edgepack``; finish the report."""
    from edgepack.agent.bundle import sha256_file
    from edgepack.host.keys import signer
    from edgepack.host.build.package import npz_bytes, write_bundle

    sign, signed_by = signer(cfg.key)
    if sign is None:
        warnings.append("the bundle is unsigned (no --key): devices refuse it unless "
                        "allow_unsigned = true")
    out = Path(cfg.out_dir) / f"{name}-{cfg.version}-{profile.name}.edgepack"
    files = {**files, "golden.npz": npz_bytes(golden),
             "report.json": json.dumps(report, indent=2, sort_keys=True,
                                       default=_json_default).encode()}
    with progress.stage("packaging"):
        write_bundle(out, manifest, model_bytes, files, sign=sign)
    bid = sha256_file(out)
    report["bundle"] = {"path": str(out), "bundle_id": bid, "bytes": out.stat().st_size,
                        "name": name, "version": cfg.version, "target": profile.name,
                        "signed_by": signed_by}
    report["timings_s"] = dict(progress.timings)
    return BuildResult(path=out, bundle_id=bid, report=report, model_bytes=model_bytes)
