"""The measurement child of a profile job: ``python -m edgepack.agent.measure BUNDLE_DIR``.

It measures load time, the first inference, p50/p95/p99 over N timed runs after warm-up, peak
RSS (VmHWM), the outputs on the bundle's golden inputs (compared as the health gate does) and on
the job's eval samples (returned for the host's accuracy gate), and a per-operator breakdown:
onnxruntime's profiler (``SessionOptions.enable_profiling``, JSON trace parsed here); LiteRT's
Python interpreter has no per-operator profiler, so its results say so and list the ops. After
every step it rewrites its report file, so a killed child still leaves what it measured. The
agent side (admission, download, supervision) is :mod:`edgepack.agent.profiler`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["NICE", "MeasureOptions", "measure_bundle", "summarize_ort_trace", "main"]

_MB = 1024 * 1024
NICE = 10  # the measurement yields the CPU to the agent and the applications it serves
_EVAL_OUT_BYTES = 384 * 1024  # eval outputs in one result message (base64 stays < 1 MiB)


@dataclass(frozen=True)
class MeasureOptions:
    """How one bundle is measured (in the child process)."""

    runs: int = 50
    warmup: int = 5
    threads: int = 0  # 0: the bundle's runtime.threads, then one per core
    op_profile: bool = True
    op_runs: int = 20
    max_timing_s: float = 30.0  # stop timing early (fewer runs) rather than miss the deadline
    eval_path: str | None = None
    max_eval_out_bytes: int = _EVAL_OUT_BYTES


def _set_pdeathsig() -> None:
    """Die with the agent (Linux): a killed agent must not leave a measurement running."""
    with contextlib.suppress(Exception):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


def _percentiles(times_ms: list[float]) -> dict[str, float]:
    import numpy as np

    t = np.asarray(times_ms)
    return {"p50": round(float(np.percentile(t, 50)), 4),
            "p95": round(float(np.percentile(t, 95)), 4),
            "p99": round(float(np.percentile(t, 99)), 4),
            "mean": round(float(t.mean()), 4), "min": round(float(t.min()), 4),
            "max": round(float(t.max()), 4), "stdev": round(float(t.std()), 4),
            "runs": len(times_ms)}


def _to_model_dtype(arr: Any, spec: Mapping[str, Any]) -> Any:
    """Eval samples arrive as floats; a quantized-I/O model (TFLite int8) wants codes."""
    import numpy as np

    dtype = spec.get("dtype")
    if not dtype or dtype in ("str", "string"):
        return arr
    want = np.dtype(dtype)
    arr = np.asarray(arr)
    q = spec.get("quantization") or {}
    if want.kind in "iu" and arr.dtype.kind == "f" and q.get("scale"):
        info = np.iinfo(want)
        codes = np.round(arr / float(q["scale"]) + float(q.get("zero_point") or 0))
        return np.clip(codes, info.min, info.max).astype(want)
    return arr.astype(want, copy=False)


def _npz_b64(arrays: Mapping[str, Any]) -> str:
    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return base64.b64encode(buf.getvalue()).decode()


def _run_outputs(session: Any, feeds: list[dict], limit_bytes: int) -> dict[str, Any]:
    """Outputs on ``feeds`` as ``output_{j}`` arrays (n, *shape), bounded in bytes."""
    import numpy as np

    per: list[list[Any]] = []
    for f in feeds:
        outs = session.run(f)
        if not per:
            per = [[] for _ in outs]
        for j, o in enumerate(outs):
            per[j].append(o)
    arrays: dict[str, Any] = {}
    skipped = []
    for j, outs in enumerate(per):
        if not all(isinstance(o, np.ndarray) for o in outs):
            skipped.append(j)  # sequences/maps (ZipMap): the host compares tensors only
            continue
        try:
            arrays[f"output_{j}"] = np.stack(outs)
        except ValueError:
            skipped.append(j)
    n = len(feeds)
    size = sum(a.nbytes for a in arrays.values())
    keep = n if size <= limit_bytes or n == 0 else max(1, int(n * limit_bytes / size))
    if keep < n:
        arrays = {k: v[:keep] for k, v in arrays.items()}
    return {"samples": keep, "truncated": keep < n, "skipped_outputs": skipped,
            "outputs_npz": _npz_b64(arrays) if arrays else None}


def measure_bundle(bundle_dir: str | os.PathLike, opts: MeasureOptions = MeasureOptions(),
                   report: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Measure an unpacked bundle in this process; ``report`` gets the figures after each step.

    The agent runs this in a child (see the module doc); a benchmark may call it directly.
    """
    import numpy as np

    # The health gate's own comparison, so "golden passed" means what the install gate means.
    from edgepack.agent.health import DEFAULT_TOLERANCES, _rss_mb, compare_golden
    from edgepack.agent.runtimes import (
        FORMAT_RUNTIME,
        open_model,
        resolve_threads,
        runtime_module,
    )

    started = time.perf_counter()
    d = Path(bundle_dir)
    manifest = json.loads((d / "manifest.json").read_text())
    model = manifest["model"]
    rt = manifest.get("runtime") or {}
    runtime = rt.get("name") or FORMAT_RUNTIME.get(model.get("format", ""), "")
    out: dict[str, Any] = {"stage": "start", "runtime": runtime, "name": manifest.get("name"),
                           "version": manifest.get("version"),
                           "bundle_target": manifest.get("target"),
                           "model_sha256": model.get("sha256"), "model_bytes": model.get("bytes")}

    def step(stage: str, **figures: Any) -> None:
        out.update(figures)
        out["stage"] = stage
        out["seconds"] = round(time.perf_counter() - started, 3)
        if report is not None:
            report(dict(out))

    mod = runtime_module(runtime)
    mod.preload()
    out["runtime_version"] = mod.version()
    baseline = _rss_mb("VmRSS")
    threads = resolve_threads(opts.threads or int(rt.get("threads") or 0))
    providers = tuple(rt.get("providers") or ())
    path = d / model["file"]
    t0 = time.perf_counter()
    session = open_model(path, runtime, threads=threads, providers=providers)
    step("loaded", load_ms=round((time.perf_counter() - t0) * 1e3, 3), threads=threads,
         baseline_rss_mb=round(baseline, 2))

    in_specs, out_specs = model["inputs"], model["outputs"]
    health = manifest.get("health") or {}
    golden: dict[str, Any] = {}
    if health.get("golden") and (d / health["golden"]).exists():
        with np.load(d / health["golden"], allow_pickle=False) as z:
            golden = {k: z[k] for k in z.files}
    n_golden = min((len(golden.get(f"input_{i}", ())) for i in range(len(in_specs))), default=0)
    n_golden = min(n_golden, int(health.get("samples") or n_golden))
    golden_feeds = [{s["name"]: _to_model_dtype(golden[f"input_{i}"][k], s)
                     for i, s in enumerate(in_specs)} for k in range(n_golden)]
    eval_feeds: list[dict] = []
    if opts.eval_path:
        with np.load(opts.eval_path, allow_pickle=False) as z:
            ev = {k: z[k] for k in z.files}
        n_eval = min((len(ev.get(f"input_{i}", ())) for i in range(len(in_specs))), default=0)
        eval_feeds = [{s["name"]: _to_model_dtype(ev[f"input_{i}"][k], s)
                       for i, s in enumerate(in_specs)} for k in range(n_eval)]
    feeds = golden_feeds or eval_feeds
    if not feeds:  # no data at all: zeros of the declared shape still time the model
        feeds = [{s["name"]: np.zeros([x if isinstance(x, int) and x > 0 else 1
                                       for x in s["shape"]], dtype=s["dtype"])
                  for s in in_specs}]

    t0 = time.perf_counter()
    session.run(feeds[0])
    step("first", first_ms=round((time.perf_counter() - t0) * 1e3, 3))

    if golden_feeds:
        tol = {k: float(health[k]) if health.get(k) is not None else v
               for k, v in DEFAULT_TOLERANCES.items()}
        results = [session.run(f) for f in golden_feeds]
        rows, failures = compare_golden(results, golden, out_specs, n_golden, tol,
                                        quantized_io=bool(health.get("quantized_io")))
        step("golden", golden={"passed": bool(rows) and not failures, "samples": n_golden,
                               "outputs": rows, "failures": failures})
    else:
        step("golden", golden={"passed": False, "samples": 0, "outputs": [],
                               "failures": ["the bundle has no golden samples"]})

    if eval_feeds:
        step("eval", eval=_run_outputs(session, eval_feeds, opts.max_eval_out_bytes))

    for w in range(opts.warmup):
        session.run(feeds[w % len(feeds)])
    times: list[float] = []
    stop_at = time.perf_counter() + opts.max_timing_s
    for r in range(opts.runs):
        f = feeds[r % len(feeds)]
        t = time.perf_counter()
        session.run(f)
        times.append((time.perf_counter() - t) * 1e3)
        if time.perf_counter() > stop_at:
            break
    peak = _rss_mb("VmHWM")  # before the profiling session below adds its own memory
    step("latency", latency_ms=_percentiles(times), peak_rss_mb=round(peak, 2),
         model_rss_mb=round(max(0.0, peak - baseline), 2),
         timing_cut_short=len(times) < opts.runs)

    ops: dict[str, Any] = {"available": False, "reason": "not requested"}
    if opts.op_profile:
        if runtime == "onnxruntime":
            ops = _onnx_ops(path, feeds, threads, providers, opts.op_runs,
                            opts.max_timing_s)
        else:
            ops = _litert_ops(session)
    step("done", ops=ops)
    return out


def _onnx_ops(path: Path, feeds: list[dict], threads: int, providers: tuple[str, ...],
              runs: int, max_s: float, warm: int = 2) -> dict[str, Any]:
    """Per-operator times from onnxruntime's profiler, in a second session (the timed runs above
    are not slowed by tracing)."""
    import tempfile

    import onnxruntime as ort

    from edgepack.agent.runtimes.onnx import session_options

    with tempfile.TemporaryDirectory(prefix="edgepack-ops-") as tmp:
        so = session_options(threads)
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "ort")
        have = set(ort.get_available_providers())
        chosen = [p for p in providers if p in have] or ["CPUExecutionProvider"]
        sess = ort.InferenceSession(str(path), sess_options=so, providers=chosen)
        names = [o.name for o in sess.get_outputs()]
        stop_at = time.perf_counter() + max(0.2, max_s / 2)
        for k in range(warm + max(1, runs)):
            sess.run(names, feeds[k % len(feeds)])
            if k >= warm and time.perf_counter() > stop_at:
                break
        trace = Path(sess.end_profiling())
        try:
            events = json.loads(trace.read_text())
        finally:
            trace.unlink(missing_ok=True)
    return summarize_ort_trace(events, skip_runs=warm)


def summarize_ort_trace(events: list[dict], *, skip_runs: int = 0, top: int = 12
                        ) -> dict[str, Any]:
    """Average per-inference time by operator type and by node from an onnxruntime trace.

    The trace (Chrome trace format) holds one ``Session``/``model_run`` event per inference
    and one ``Node`` event named ``{node}_kernel_time`` per kernel, with ``args.op_name``;
    durations are microseconds. The first ``skip_runs`` inferences (warm-up) are left out.
    """
    runs = sorted((e for e in events if e.get("cat") == "Session"
                   and e.get("name") == "model_run"), key=lambda e: e.get("ts", 0))
    counted = runs[skip_runs:] or runs
    if not counted:
        return {"available": False, "reason": "the onnxruntime trace holds no model_run events"}
    t0 = counted[0].get("ts", 0)
    n = len(counted)
    by_op: dict[str, float] = defaultdict(float)
    nodes_of: dict[str, set] = defaultdict(set)
    by_node: dict[str, tuple[str, float]] = {}
    providers: set[str] = set()
    for e in events:
        name = str(e.get("name", ""))
        if e.get("cat") != "Node" or not name.endswith("_kernel_time") or e.get("ts", 0) < t0:
            continue
        args = e.get("args") or {}
        op = str(args.get("op_name") or "?")
        node = name[:-len("_kernel_time")]
        dur = float(e.get("dur", 0))
        by_op[op] += dur
        nodes_of[op].add(node)
        prev = by_node.get(node, (op, 0.0))
        by_node[node] = (op, prev[1] + dur)
        if args.get("provider"):
            providers.add(str(args["provider"]))
    kernel_us = sum(by_op.values())
    run_ms = sum(float(r.get("dur", 0)) for r in counted) / 1e3 / n
    ops = [{"op": op, "ms": round(us / 1e3 / n, 4),
            "share": round(us / kernel_us, 4) if kernel_us else 0.0, "nodes": len(nodes_of[op])}
           for op, us in sorted(by_op.items(), key=lambda kv: -kv[1])]
    nodes = [{"node": node, "op": op, "ms": round(us / 1e3 / n, 4)}
             for node, (op, us) in sorted(by_node.items(), key=lambda kv: -kv[1][1])]
    return {"available": True, "source": "onnxruntime profiling", "runs": n,
            "run_ms": round(run_ms, 4), "kernel_ms": round(kernel_us / 1e3 / n, 4),
            "ops": ops[:top], "nodes": nodes[:top], "providers": sorted(providers)}


def _litert_ops(session: Any) -> dict[str, Any]:
    counts: dict[str, int] = defaultdict(int)
    interp = getattr(session, "_interp", None)
    with contextlib.suppress(Exception):  # a private API: absent in some LiteRT builds
        for op in interp._get_ops_details():
            counts[str(op.get("op_name"))] += 1
    return {"available": False,
            "reason": "LiteRT's Python interpreter exposes no per-operator profiler; run "
                      "LiteRT's benchmark_model --enable_op_profiling=true on the device for one",
            "op_counts": dict(counts)}


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, default=str))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """Child entry point: measure BUNDLE_DIR, rewriting ``--out`` after every step."""
    p = argparse.ArgumentParser(prog="python -m edgepack.agent.measure",
                                description="Measure an unpacked bundle (a profile job's child).")
    p.add_argument("bundle_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--nice", type=int, default=NICE)
    p.add_argument("--max-timing-s", type=float, default=30.0)
    p.add_argument("--eval")
    p.add_argument("--no-ops", action="store_true")
    a = p.parse_args(argv)
    _set_pdeathsig()
    if a.nice:
        with contextlib.suppress(OSError):
            os.nice(a.nice)
    out = Path(a.out)
    last: dict[str, Any] = {}

    def report(doc: dict) -> None:
        last.clear()
        last.update(doc)
        _write_json(out, doc)

    opts = MeasureOptions(runs=a.runs, warmup=a.warmup, threads=a.threads,
                          op_profile=not a.no_ops, max_timing_s=a.max_timing_s,
                          eval_path=a.eval, op_runs=min(20, a.runs))
    try:
        measure_bundle(a.bundle_dir, opts, report)
    except Exception as exc:  # noqa: BLE001 - reported to the agent, which reports it to the host
        last["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        _write_json(out, last)
        return 3
    return 0



if __name__ == "__main__":
    sys.exit(main())
