"""The health gate: does the staged bundle load, answer correctly, fast enough, in budget?

The check runs in a child process (``python -m edgepack.agent.health SLOT_DIR``), so that

* a model that crashes the runtime (segfault, abort, out of memory) fails the gate instead of
  killing the agent;
* the peak RSS measured is that of a process holding only Python, numpy, the runtime and this
  model — not the agent's own memory — and the latency is not disturbed by the agent;
* a hang is bounded by ``health.timeout_s``: the child is killed.

Steps: load the model; feed every ``golden.npz`` sample and compare with the expected outputs
(float outputs: cosine >= ``min_cosine`` and ``allclose(atol, rtol)``, NaN — a missing
prediction — only where the golden output is NaN; integer and string outputs: the fraction equal
>= ``min_label_agreement``); warm up, then time ``runs`` inferences for p95; read
the peak RSS (``VmHWM``). Budgets come from ``manifest["budgets"]``: ``p95_ms`` and
``peak_rss_mb``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["HealthOptions", "HealthReport", "check_model", "compare_golden", "HealthCheck",
           "run_health_check", "main"]

DEFAULT_TOLERANCES = {"atol": 1e-3, "rtol": 1e-3, "min_cosine": 0.999,
                      "min_label_agreement": 0.99}


@dataclass(frozen=True)
class HealthOptions:
    """How hard to check."""

    threads: int = 0
    warmup: int = 3
    runs: int = 50
    max_timing_s: float = 10.0  # stop timing early on a slow model (p95 of what was measured)
    enforce_budgets: bool = True
    timeout_s: float = 120.0


@dataclass(frozen=True)
class HealthReport:
    """Outcome of one health check (JSON-friendly via :meth:`to_dict`)."""

    passed: bool
    failures: tuple[str, ...] = ()
    runtime: str = ""
    runtime_version: str = ""
    load_ms: float = 0.0
    samples: int = 0
    outputs: tuple[dict, ...] = ()
    latency_ms: dict = field(default_factory=dict)
    peak_rss_mb: float = 0.0
    baseline_rss_mb: float = 0.0
    model_rss_mb: float = 0.0
    budgets: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "failures": list(self.failures), "runtime": self.runtime,
                "runtime_version": self.runtime_version, "load_ms": round(self.load_ms, 2),
                "samples": self.samples, "outputs": list(self.outputs),
                "latency_ms": self.latency_ms, "peak_rss_mb": round(self.peak_rss_mb, 2),
                "baseline_rss_mb": round(self.baseline_rss_mb, 2),
                "model_rss_mb": round(self.model_rss_mb, 2), "budgets": self.budgets,
                "seconds": round(self.seconds, 3)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HealthReport:
        return cls(passed=bool(d.get("passed")), failures=tuple(d.get("failures", ())),
                   runtime=d.get("runtime", ""), runtime_version=d.get("runtime_version", ""),
                   load_ms=float(d.get("load_ms", 0.0)), samples=int(d.get("samples", 0)),
                   outputs=tuple(d.get("outputs", ())), latency_ms=dict(d.get("latency_ms", {})),
                   peak_rss_mb=float(d.get("peak_rss_mb", 0.0)),
                   baseline_rss_mb=float(d.get("baseline_rss_mb", 0.0)),
                   model_rss_mb=float(d.get("model_rss_mb", 0.0)),
                   budgets=dict(d.get("budgets", {})), seconds=float(d.get("seconds", 0.0)))

    def summary(self) -> str:
        lat = self.latency_ms.get("p95")
        head = "passed" if self.passed else "failed: " + "; ".join(self.failures)
        return (f"health check {head} (p95 {lat if lat is not None else '?'} ms, peak RSS "
                f"{self.peak_rss_mb:.1f} MB)")


def _rss_mb(field_name: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def compare_golden(results: list[list[Any]], golden: Any, out_specs: list[dict], n: int,
                   tol: dict[str, float], *, quantized_io: bool = False
                   ) -> tuple[list[dict], list[str]]:
    """Compare ``results`` (one list of outputs per golden sample) with ``output_{j}`` of
    ``golden``: one row per output that has golden values, and the failures."""
    import numpy as np

    rows: list[dict] = []
    failures: list[str] = []
    for j, spec in enumerate(out_specs):
        key = f"output_{j}"
        if key not in golden:
            continue  # non-tensor outputs (sequences, maps) have no golden values
        got = np.stack([np.asarray(r[j]) for r in results])
        expected = golden[key][:n]
        if quantized_io:
            # int8/uint8 model I/O: compare real values, not raw codes, so one rounding step
            # between CPUs is a tolerance question rather than a label mismatch.
            got, expected = _dequantize(got, spec), _dequantize(expected, spec)
        row = _compare(j, spec, got, expected, tol)
        rows.append(row)
        if not row["passed"]:
            failures.append(f"output {row['name']}: {row.get('detail', 'mismatch')}")
    return rows, failures


def _compare(j: int, spec: Mapping[str, Any], got: Any, expected: Any,
             tol: Mapping[str, float]) -> dict[str, Any]:
    import numpy as np

    name = spec.get("name", f"output_{j}")
    got = np.asarray(got)
    expected = np.asarray(expected)
    row: dict[str, Any] = {"name": name, "index": j}
    if got.shape != expected.shape:
        got_r = got.reshape(expected.shape) if got.size == expected.size else None
        if got_r is None:
            row.update(kind="shape", passed=False,
                       detail=f"shape {list(got.shape)} != expected {list(expected.shape)}")
            return row
        got = got_r
    strings = expected.dtype.kind in "USO" or got.dtype.kind in "USO"
    if strings or (expected.dtype.kind in "iub" and got.dtype.kind in "iub"):
        if strings:  # labels compare exactly, as text
            got, expected = got.astype(str), expected.astype(str)
        agreement = float(np.mean(got == expected)) if expected.size else 1.0
        ok = agreement >= tol["min_label_agreement"]
        row.update(kind="labels", agreement=round(agreement, 6), passed=ok)
        if not ok:
            row["detail"] = (f"label agreement {agreement:.4f} < "
                             f"{tol['min_label_agreement']}")
        return row
    a = got.astype(np.float64).ravel()
    b = expected.astype(np.float64).ravel()
    both_nan = np.isnan(a) & np.isnan(b)  # a missing prediction where the golden one is missing
    a0, b0 = np.where(both_nan, 0.0, a), np.where(both_nan, 0.0, b)
    na, nb = float(np.linalg.norm(a0)), float(np.linalg.norm(b0))
    cosine = 1.0 if na == 0 and nb == 0 else (float(a0 @ b0) / (na * nb) if na and nb else 0.0)
    max_err = float(np.max(np.abs(a0 - b0))) if a.size else 0.0
    close = bool(np.allclose(a0, b0, atol=tol["atol"], rtol=tol["rtol"]))
    finite = bool(np.all(np.isfinite(a) | both_nan))
    ok = cosine >= tol["min_cosine"] and close and finite
    row.update(kind="float", cosine=round(cosine, 8), max_abs_err=max_err, passed=ok)
    if not ok:
        row["detail"] = (f"cosine {cosine:.6f} (min {tol['min_cosine']}), max |error| "
                         f"{max_err:.3g} (atol {tol['atol']}, rtol {tol['rtol']})")
    return row


def _dequantize(arr: Any, spec: Mapping[str, Any]) -> Any:
    """``(q - zero_point) * scale`` for a quantized tensor; unchanged when not quantized."""
    import numpy as np

    q = spec.get("quantization") or {}
    scale, zp = q.get("scale"), q.get("zero_point")
    if scale is None or zp is None:
        return arr
    scale = np.asarray(scale, dtype=np.float64)
    zp = np.asarray(zp, dtype=np.float64)
    return (np.asarray(arr, dtype=np.float64) - zp) * scale


def check_model(slot_dir: str | os.PathLike, opts: HealthOptions = HealthOptions()
                ) -> HealthReport:
    """Run the health gate in this process (the agent runs it in a child: see module doc)."""
    import numpy as np

    from edgepack.agent.runtimes import FORMAT_RUNTIME, open_model, runtime_module

    t_start = time.perf_counter()
    slot = Path(slot_dir)
    manifest = json.loads((slot / "manifest.json").read_text())
    runtime = manifest.get("runtime", {}).get("name") or FORMAT_RUNTIME.get(
        manifest["model"]["format"], "")
    budgets = dict(manifest.get("budgets") or {})
    health = manifest.get("health") or {}
    tol = {k: float(health.get(k, v) if health.get(k) is not None else v)
           for k, v in DEFAULT_TOLERANCES.items()}
    failures: list[str] = []
    mod = runtime_module(runtime)
    mod.preload()
    baseline = _rss_mb("VmRSS")
    threads = opts.threads or int(manifest.get("runtime", {}).get("threads") or 0)
    t0 = time.perf_counter()
    session = open_model(slot / manifest["model"]["file"], runtime, threads=threads,
                         providers=tuple(manifest.get("runtime", {}).get("providers") or ()))
    load_ms = (time.perf_counter() - t0) * 1000.0

    in_specs = manifest["model"]["inputs"]
    out_specs = manifest["model"]["outputs"]
    with np.load(slot / health["golden"], allow_pickle=False) as z:
        golden = {k: z[k] for k in z.files}
    inputs = []
    for i, spec in enumerate(in_specs):
        key = f"input_{i}"
        if key not in golden:
            return HealthReport(passed=False, failures=(f"golden file has no {key}",),
                                runtime=runtime, budgets=budgets)
        arr = golden[key]
        dtype = spec.get("dtype")
        if dtype and dtype not in ("str", "string"):
            arr = arr.astype(dtype, copy=False)
        inputs.append(arr)
    n = min(len(a) for a in inputs) if inputs else 0
    n = min(n, int(health.get("samples") or n))
    if n == 0:
        failures.append("golden file holds no samples")
    feeds = [{spec["name"]: inputs[i][k] for i, spec in enumerate(in_specs)} for k in range(n)]
    results: list[list[Any]] = []
    try:
        for f in feeds:
            results.append(session.run(f))
    except Exception as exc:  # noqa: BLE001 - any runtime error fails the gate
        failures.append(f"inference on the golden inputs failed: {exc}")
    rows: list[dict] = []
    if len(results) == n and n:
        rows, wrong = compare_golden(results, golden, out_specs, n, tol,
                                     quantized_io=bool(health.get("quantized_io")))
        failures += wrong
        if not rows:
            failures.append("golden file holds no expected outputs to compare")

    latency: dict[str, float] = {}
    if feeds and not any(f.startswith("inference") for f in failures):
        for w in range(opts.warmup):
            session.run(feeds[w % len(feeds)])
        times = []
        deadline = time.perf_counter() + opts.max_timing_s
        for r in range(opts.runs):
            t = time.perf_counter()
            session.run(feeds[r % len(feeds)])
            times.append((time.perf_counter() - t) * 1000.0)
            if time.perf_counter() > deadline:
                break
        ts = np.asarray(times)
        latency = {"p50": round(float(np.percentile(ts, 50)), 4),
                   "p95": round(float(np.percentile(ts, 95)), 4),
                   "p99": round(float(np.percentile(ts, 99)), 4),
                   "max": round(float(ts.max()), 4), "runs": len(times)}
    peak = _rss_mb("VmHWM")
    if opts.enforce_budgets:
        p95_budget = budgets.get("p95_ms")
        if p95_budget and latency and latency["p95"] > float(p95_budget):
            failures.append(f"p95 latency {latency['p95']:.2f} ms is over the budget of "
                            f"{float(p95_budget):g} ms")
        rss_budget = budgets.get("peak_rss_mb")
        if rss_budget and peak > float(rss_budget):
            failures.append(f"peak RSS {peak:.1f} MB is over the budget of "
                            f"{float(rss_budget):g} MB")
    return HealthReport(passed=not failures, failures=tuple(failures), runtime=runtime,
                        runtime_version=mod.version(), load_ms=load_ms, samples=n,
                        outputs=tuple(rows), latency_ms=latency, peak_rss_mb=peak,
                        baseline_rss_mb=baseline, model_rss_mb=max(0.0, peak - baseline),
                        budgets=budgets, seconds=time.perf_counter() - t_start)


class HealthCheck:
    """A health check running in a child process; poll it from the agent loop."""

    def __init__(self, slot_dir: str | os.PathLike, opts: HealthOptions = HealthOptions()) -> None:
        self.opts = opts
        cmd = [sys.executable, "-I", "-m", "edgepack.agent.health", str(slot_dir),
               "--threads", str(opts.threads), "--warmup", str(opts.warmup),
               "--runs", str(opts.runs), "--max-timing-s", str(opts.max_timing_s)]
        if not opts.enforce_budgets:
            cmd.append("--no-budgets")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.report: HealthReport | None = None

    def poll(self) -> HealthReport | None:
        """The report once the child finished (or was killed for taking too long)."""
        if self.report is not None:
            return self.report
        if self.proc.poll() is None:
            if time.monotonic() - self.started < self.opts.timeout_s:
                return None
            self.kill()
            self.report = HealthReport(passed=False, failures=(
                f"health check did not finish within {self.opts.timeout_s:g}s "
                "(health.timeout_s): the model hangs or is far too slow",))
            return self.report
        out, err = self.proc.communicate()
        self.report = _parse_child(self.proc.returncode, out, err)
        return self.report

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _parse_child(rc: int, out: bytes, err: bytes) -> HealthReport:
    text = out.decode(errors="replace").strip().splitlines()
    if text:
        try:
            return HealthReport.from_dict(json.loads(text[-1]))
        except ValueError:
            pass
    tail = err.decode(errors="replace").strip().splitlines()[-3:]
    how = f"was killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
    return HealthReport(passed=False, failures=(
        f"the health check process {how} while loading or running the model"
        + (f": {' | '.join(tail)}" if tail else ""),))


def run_health_check(slot_dir: str | os.PathLike, opts: HealthOptions = HealthOptions()
                     ) -> HealthReport:
    """Blocking convenience: run the child and wait for its report."""
    check = HealthCheck(slot_dir, opts)
    while (report := check.poll()) is None:
        time.sleep(0.05)
    return report


def main(argv: list[str] | None = None) -> int:
    """Child entry point: print the report as one JSON line; exit 0 if passed, 3 if not."""
    p = argparse.ArgumentParser(prog="python -m edgepack.agent.health",
                                description="Run a bundle slot's health gate.")
    p.add_argument("slot_dir")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--max-timing-s", type=float, default=10.0)
    p.add_argument("--no-budgets", action="store_true")
    a = p.parse_args(argv)
    opts = HealthOptions(threads=a.threads, warmup=a.warmup, runs=a.runs,
                         max_timing_s=a.max_timing_s, enforce_budgets=not a.no_budgets)
    try:
        report = check_model(a.slot_dir, opts)
    except Exception as exc:  # noqa: BLE001 - reported to the parent as a failed gate
        report = HealthReport(passed=False, failures=(f"{type(exc).__name__}: {exc}",))
    sys.stdout.write(json.dumps(report.to_dict(), default=str) + "\n")
    sys.stdout.flush()
    return 0 if report.passed else 3


if __name__ == "__main__":
    sys.exit(main())
