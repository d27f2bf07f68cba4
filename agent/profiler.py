"""Profile jobs: measure candidate bundles on this device, without touching the active model.

The host publishes a signed job on ``devices/{id}/jobs`` naming published bundles
(``docs/protocol.md`` § Profile jobs). The agent loop hands every job message to a
:class:`Profiler`, which works in its own thread, one job at a time:

1. admit: parse, check the signature against the trusted keys, refuse duplicates, expired jobs,
   and jobs that arrive while an install is in progress or while free RAM or disk is short;
2. for each bundle: fetch it with the normal :class:`~edgepack.agent.transfer.Transfer` into a
   scratch directory (``{data_dir}/profiling``, never a slot), verify its signature, unpack it,
   and measure it in a child process (``python -m edgepack.agent.profiler``) at lower priority
   (``nice`` 10), killed when it outgrows the memory bound, when the job's deadline comes, or
   when an install starts (installs always win);
3. answer on ``devices/{id}/results`` through the agent's outbox: ``accepted``, ``progress``,
   one ``result`` per bundle (partial figures when a measurement was cut short), ``done``.

The child measures load time, the first inference, p50/p95/p99 over N timed runs after warm-up,
peak RSS (VmHWM), the outputs on the bundle's golden inputs (compared as the health gate does)
and on the job's eval samples (returned for the host's accuracy gate), and a per-operator
breakdown: onnxruntime's profiler (``SessionOptions.enable_profiling``, JSON trace parsed here);
LiteRT's Python interpreter has no per-operator profiler, so its results say so and list the ops.
After every step it rewrites its report file, so a killed child still leaves what it measured.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.agent.errors import BundleError, ProtocolError, SignatureError
from edgepack.agent.protocol import (
    MAX_JSON_BYTES,
    JobBundle,
    ProfileJob,
    Topics,
    job_signed_part,
    parse_profile_job,
)
from edgepack.agent.signing import canonical_json, verify_detached

__all__ = ["MeasureOptions", "Profiler", "measure_bundle", "summarize_ort_trace", "main"]

log = logging.getLogger("edgepack.agent.profiler")
_MB = 1024 * 1024
NICE = 10  # the measurement yields the CPU to the agent and the applications it serves
RAM_RESERVE_MB = 128  # refuse a job when less than this (plus its max_rss_mb) is available
_SEEN_JOBS = 256
_EVAL_OUT_BYTES = 384 * 1024  # eval outputs in one result message (base64 stays < 1 MiB)


# =========================================================================== child side
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
    from edgepack.agent.health import DEFAULT_TOLERANCES, _compare, _dequantize, _rss_mb
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
        rows, failures = [], []
        for j, spec in enumerate(out_specs):
            if f"output_{j}" not in golden:
                continue
            got = np.stack([np.asarray(r[j]) for r in results])
            expected = golden[f"output_{j}"][:n_golden]
            if health.get("quantized_io"):
                got, expected = _dequantize(got, spec), _dequantize(expected, spec)
            row = _compare(j, spec, got, expected, tol)
            rows.append(row)
            if not row["passed"]:
                failures.append(f"output {row['name']}: {row.get('detail', 'mismatch')}")
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

    with tempfile.TemporaryDirectory(prefix="edgepack-ops-") as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
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
    p = argparse.ArgumentParser(prog="python -m edgepack.agent.profiler",
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


# =========================================================================== agent side
class _Stopped(Exception):
    """The agent is shutting down."""


class _Failed(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class Profiler:
    """Runs profile jobs for the agent, one at a time, in its own thread.

    The agent loop calls :meth:`wants`, :meth:`on_message`, :meth:`on_connected`,
    :meth:`on_disconnected` and :meth:`close`; they only hand things over. ``link`` is the
    agent's connection (subscribe/unsubscribe are thread-safe); ``emit(topic, body)`` queues an
    outgoing message for the agent loop, which owns the outbox; ``busy()`` is true while an
    install is in progress.
    """

    def __init__(self, cfg: Any, topics: Topics, *, link: Any, keys: Mapping[str, Any],
                 emit: Callable[[str, dict], None], busy: Callable[[], bool]) -> None:
        self.cfg = cfg
        self.topics = topics
        self.link = link
        self.keys = keys
        self.emit = emit
        self.busy = busy
        self.jobs_topic = topics.jobs(cfg.device_id)
        self.results_topic = topics.results(cfg.device_id)
        self.root = Path(cfg.data_dir) / "profiling"
        self._q: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._transfer: Any = None
        self._connected = False
        self._seen: OrderedDict[str, None] = OrderedDict()

    # ---- called from the agent loop: never blocks
    def wants(self, topic: str) -> bool:
        tr = self._transfer
        return topic == self.jobs_topic or (tr is not None and tr.wants(topic))

    def on_message(self, topic: str, payload: bytes) -> None:
        if topic == self.jobs_topic:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="edgepack-profiler",
                                                daemon=True)
                self._thread.start()
            self._q.put(("job", payload))
        elif self._thread is not None:
            self._q.put(("msg", topic, payload))

    def on_connected(self) -> None:
        self._connected = True
        if self._thread is not None:
            self._q.put(("conn", True))

    def on_disconnected(self) -> None:
        self._connected = False
        if self._thread is not None:
            self._q.put(("conn", False))

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker: a running measurement is killed, scratch files removed."""
        self._q.put(("stop",))
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- worker thread
    def _run(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)  # leftovers of a crash
        while True:
            item = self._q.get()
            if item[0] == "stop":
                return
            if item[0] != "job":
                continue
            try:
                job = self._admit(item[1])
                if job is not None:
                    self._run_job(job)
            except _Stopped:
                return
            except Exception:  # noqa: BLE001 - a bug in one job must not end profiling
                log.exception("profile job failed")
            finally:
                self._transfer = None
                shutil.rmtree(self.root, ignore_errors=True)

    def _send(self, job_id: str, kind: str, **body: Any) -> None:
        self.emit(self.results_topic, {"job_id": job_id, "kind": kind,
                                       "device_id": self.cfg.device_id, **body})

    def _refuse(self, job_id: str, reason: str, detail: str) -> None:
        log.warning("profile job %s refused (%s): %s", job_id, reason, detail)
        self._send(job_id, "refused", reason=reason, detail=detail)

    def _admit(self, payload: bytes, running: str | None = None) -> ProfileJob | None:
        """Parse and check a job; refuse it (and return None) unless it may run now."""
        try:
            job = parse_profile_job(payload)
        except ProtocolError as exc:
            job_id = "unknown"
            with contextlib.suppress(Exception):
                raw = json.loads(payload[:MAX_JSON_BYTES])
                if isinstance(raw, dict) and isinstance(raw.get("job_id"), str):
                    job_id = raw["job_id"][:128]
            self._refuse(job_id, "malformed", str(exc))
            return None
        if job.sig is not None and (self.keys or not self.cfg.allow_unsigned):
            try:
                doc = json.loads(payload)
                verify_detached(canonical_json(job_signed_part(doc)), job.sig, self.keys,
                                what="profile job")
            except SignatureError as exc:
                self._refuse(job.job_id, "signature", str(exc))
                return None
        elif job.sig is None and not self.cfg.allow_unsigned:
            self._refuse(job.job_id, "signature", "the profile job is not signed; sign it with "
                         "the fleet key (edgepack profile --key)")
            return None
        if job.job_id in self._seen:
            self._refuse(job.job_id, "duplicate", "this job id was already received")
            return None
        self._seen[job.job_id] = None
        while len(self._seen) > _SEEN_JOBS:
            self._seen.popitem(last=False)
        now = time.time()
        if now >= job.deadline:
            self._refuse(job.job_id, "expired", f"the job's deadline passed {now - job.deadline:.0f}"
                         "s ago (was the device offline? is its clock right?)")
            return None
        if running is not None:
            self._refuse(job.job_id, "busy", f"profile job {running} is running; try again later")
            return None
        if self.busy():
            self._refuse(job.job_id, "busy", "an install is in progress on this device; profile "
                         "after it finished")
            return None
        import psutil

        avail = psutil.virtual_memory().available / _MB
        need = RAM_RESERVE_MB + (job.max_rss_mb or 0)
        if avail < need:
            self._refuse(job.job_id, "memory", f"{avail:.0f} MB of RAM available, {need:.0f} MB "
                         "needed (reserve + the job's max_rss_mb): measuring could starve the "
                         "device")
            return None
        self.root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.root).free / _MB
        biggest = max((b.bytes or 0 for b in job.bundles), default=0) / _MB
        need_disk = self.cfg.transfer.min_free_mb + 2 * biggest
        if free < need_disk:
            self._refuse(job.job_id, "disk", f"{free:.0f} MB of disk free, {need_disk:.0f} MB "
                         "needed (download + unpack + transfer.min_free_mb)")
            return None
        return job

    def _pump(self, timeout: float, job_id: str) -> None:
        """Handle what the agent loop handed over while a job runs."""
        try:
            item = self._q.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            kind = item[0]
            if kind == "stop":
                raise _Stopped
            tr = self._transfer
            if kind == "job":
                self._admit(item[1], running=job_id)
            elif kind == "msg" and tr is not None and tr.wants(item[1]):
                tr.on_message(item[1], item[2])
            elif kind == "conn" and tr is not None:
                if item[1]:
                    tr.on_connected()
                else:
                    tr.on_disconnected()
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                return

    def _run_job(self, job: ProfileJob) -> None:
        from edgepack.agent.runtimes import available_runtimes, runtime_version

        started = time.monotonic()
        allowed = max(0.0, min(float(job.timeout_s), job.deadline - time.time()))
        # Leave time to send the answers before the host stops listening.
        end = started + allowed - min(2.0, 0.1 * allowed)
        work = self.root / job.job_id
        work.mkdir(parents=True, exist_ok=True)
        eval_path = None
        if job.eval_npz is not None:
            eval_path = work / "eval.npz"
            eval_path.write_bytes(job.eval_npz)
        self._send(job.job_id, "accepted", board=self.cfg.board, target=self.cfg.target,
                   runtimes={n: runtime_version(n) for n in available_runtimes()},
                   cpu=_cpu_model(), cores=os.cpu_count(), deadline=job.deadline,
                   bundles=[b.bundle_id for b in job.bundles])
        log.info("profile job %s: %d bundle(s), %d runs", job.job_id, len(job.bundles), job.runs)
        summary = []
        for i, b in enumerate(job.bundles):
            left = end - time.monotonic()
            base = {"index": i, "bundle_id": b.bundle_id, "label": b.label,
                    "board": self.cfg.board, "target": self.cfg.target}
            if left <= 0:
                res = {**base, "status": "skipped", "reason": "deadline",
                       "detail": "the job's deadline came before this bundle's turn"}
            elif self.busy():
                res = {**base, "status": "skipped", "reason": "busy",
                       "detail": "an install started; profiling yields to it"}
            else:
                res = self._profile_one(job, b, base, end, left / (len(job.bundles) - i),
                                        work, eval_path)
            self._send(job.job_id, "result", **res)
            summary.append({"bundle_id": b.bundle_id, "status": res["status"],
                            "reason": res.get("reason")})
        complete = all(s["status"] == "ok" for s in summary)
        self._send(job.job_id, "done", status="complete" if complete else "partial",
                   results=summary, seconds=round(time.monotonic() - started, 3))
        log.info("profile job %s done (%s)", job.job_id, "complete" if complete else "partial")

    def _profile_one(self, job: ProfileJob, b: JobBundle, base: dict, end: float, share: float,
                     work: Path, eval_path: Path | None) -> dict[str, Any]:
        t0 = time.monotonic()
        self._send(job.job_id, "progress", bundle_id=b.bundle_id, stage="downloading")
        tr = None
        bdir = work / b.bundle_id[:16]
        try:
            tr = self._download(job, b.bundle_id, end)
            dl = {"bytes": tr.stats.bytes, "seconds": round(time.monotonic() - t0, 3)}
            from edgepack.agent.bundle import read_bundle

            try:
                bundle = read_bundle(tr.result_path, bundle_id=b.bundle_id)
                bundle.verify(self.keys, allow_unsigned=self.cfg.allow_unsigned)
                bundle.extract(bdir)
            except BundleError as exc:
                raise _Failed("rejected", str(exc)) from None
            self._check_runtime(bundle.manifest)
            tr.cleanup()  # the unpacked copy is all the measurement needs
            self._send(job.job_id, "progress", bundle_id=b.bundle_id, stage="measuring")
            res = self._measure(job, bdir, end, share, eval_path)
            res["download"] = dl
        except _Failed as f:
            res = {"status": "failed", "reason": f.reason, "detail": f.detail}
        finally:
            self._transfer = None
            if tr is not None:
                tr.cleanup()
            shutil.rmtree(bdir, ignore_errors=True)
        res["seconds"] = round(time.monotonic() - t0, 3)
        return {**base, **res}

    def _check_runtime(self, manifest: Mapping[str, Any]) -> None:
        from edgepack.agent.runtimes import FORMAT_RUNTIME, available_runtimes

        fmt = (manifest.get("model") or {}).get("format")
        runtime = (manifest.get("runtime") or {}).get("name") or FORMAT_RUNTIME.get(fmt or "")
        if runtime not in available_runtimes():
            raise _Failed("runtime", f"bundle needs runtime {runtime!r} (format {fmt!r}), which "
                          f"this device does not have (available: "
                          f"{', '.join(available_runtimes()) or 'none'})")

    def _download(self, job: ProfileJob, bundle_id: str, end: float) -> Any:
        from edgepack.agent.transfer import Rejected, Transfer

        t = self.cfg.transfer

        def precheck(table: Any) -> None:
            try:
                self._check_runtime(table.manifest)
            except _Failed as f:
                raise Rejected(f.detail, reason="runtime", bundle_id=bundle_id) from None

        tr = Transfer(bundle_id, topics=self.topics, directory=self.root / "downloads",
                      link=self.link, keys=self.keys, allow_unsigned=self.cfg.allow_unsigned,
                      window=t.window, chunk_timeout_s=t.chunk_timeout_s,
                      manifest_timeout_s=t.manifest_timeout_s, max_bundle_mb=t.max_bundle_mb,
                      min_free_mb=t.min_free_mb, precheck=precheck)
        self._transfer = tr
        tr.start(self._connected)
        while not tr.done:
            self._pump(0.1, job.job_id)
            tr.tick()
            if time.monotonic() > end:
                tr.cancel()
                tr.cleanup()
                raise _Failed("deadline", f"the job's deadline came while downloading bundle "
                              f"{bundle_id[:12]} ({tr.stats.chunks_done}/{tr.stats.chunks_total} "
                              "chunks)")
            if self.busy():
                tr.cancel()
                tr.cleanup()
                raise _Failed("busy", "an install started; profiling yields to it")
        self._transfer = None
        if tr.state != "done":
            exc = tr.error
            reason = getattr(exc, "reason", None)
            tr.cleanup()
            raise _Failed("runtime" if reason == "runtime" else
                          f"rejected:{reason}" if reason else "transfer", str(exc))
        return tr

    def _measure(self, job: ProfileJob, bdir: Path, end: float, share: float,
                 eval_path: Path | None) -> dict[str, Any]:
        import psutil

        out = bdir / "profile.json"
        err = bdir / "profile.stderr"
        threads = job.threads or self.cfg.runtime.threads
        cmd = [sys.executable, "-m", "edgepack.agent.profiler", str(bdir), "--out", str(out),
               "--runs", str(job.runs), "--warmup", str(job.warmup), "--threads", str(threads),
               "--nice", str(NICE), "--max-timing-s", f"{max(0.5, min(120.0, 0.4 * share)):.2f}"]
        if eval_path is not None:
            cmd += ["--eval", str(eval_path)]
        if not job.op_profile:
            cmd.append("--no-ops")
        avail = psutil.virtual_memory().available / _MB
        # Python + numpy + a runtime alone take ~60-80 MB: below 96 MB nothing could run.
        bound = float(job.max_rss_mb or max(96.0, 0.8 * avail - RAM_RESERVE_MB))
        with open(err, "wb") as errf:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errf,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        reason = None
        seen_mb = 0.0
        try:
            ps = psutil.Process(proc.pid)
            while proc.poll() is None:
                self._pump(0.05, job.job_id)
                with contextlib.suppress(psutil.Error):
                    seen_mb = max(seen_mb, ps.memory_info().rss / _MB)
                if seen_mb > bound:
                    reason = "memory"
                elif time.monotonic() > end:
                    reason = "deadline"
                elif self.busy():
                    reason = "busy"
                if reason:
                    break
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        try:
            figures = json.loads(out.read_text())
        except (OSError, ValueError):
            figures = {}
        stage = figures.get("stage", "none")
        if reason is None and proc.returncode == 0 and stage == "done":
            return {"status": "ok", **figures}
        if reason == "memory":
            detail = (f"the measurement grew to {seen_mb:.0f} MB, over its bound of {bound:.0f} "
                      "MB (the job's max_rss_mb, or 80% of the free RAM); it was killed")
        elif reason == "deadline":
            detail = ("the job's deadline came during the measurement"
                      + ("; figures so far are included" if stage not in ("none", "start")
                         else ", before the model was loaded: give the job more time"))
        elif reason == "busy":
            detail = "an install started; the measurement was stopped (installs have priority)"
        elif figures.get("error"):
            reason = "load" if stage == "start" else "error"
            detail = figures["error"]
        else:
            reason = "crash"
            tail = err.read_text(errors="replace").strip().splitlines()[-3:] if err.exists() \
                else []
            how = (f"was killed by signal {-proc.returncode}" if proc.returncode < 0
                   else f"exited with status {proc.returncode}")
            detail = f"the measurement process {how}" + (f": {' | '.join(tail)}" if tail else "")
        figures.pop("error", None)
        measured = stage not in ("none", "start")
        return {"status": "partial" if measured else "failed", "reason": reason,
                "detail": detail, **figures}


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model", "Hardware")):
                return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
