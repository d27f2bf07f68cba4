"""Human-readable output: progress bars while building, rich tables for reports."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgepack.host.build.noise import ThirdPartyOutput

__all__ = ["Progress", "render_build", "render_bundle"]


class Progress:
    """Stage timings always; a rich progress display only when ``enabled`` (a terminal).

    ``third_party`` (entered and left with the progress display) collects what the libraries
    print while the build runs; the package stage writes :meth:`third_party_output` into the
    report.
    """

    def __init__(self, enabled: bool = True, *,
                 third_party: ThirdPartyOutput | None = None) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.timings: dict[str, float] = {}
        self.third_party = third_party
        self._rich: Any = None

    def __enter__(self) -> Progress:
        if self.third_party is not None:
            self.third_party.__enter__()
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            term = self.third_party.terminal if self.third_party is not None else sys.stderr
            self._rich = RichProgress(TextColumn("{task.description}"), BarColumn(),
                                      MofNCompleteColumn(), TimeElapsedColumn(),
                                      console=Console(file=term), transient=True)
            self._rich.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)
        if self.third_party is not None:
            self.third_party.__exit__(*exc)

    def third_party_output(self) -> dict[str, Any] | None:
        """What the libraries printed so far (see :class:`ThirdPartyOutput`), if collected."""
        return self.third_party.summary() if self.third_party is not None else None

    @contextmanager
    def stage(self, name: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        """Time a stage; yields ``tick(n)`` for stages that count work (calibration samples)."""
        task = self._rich.add_task(name, total=total) if self._rich is not None else None
        t0 = time.perf_counter()

        def tick(n: int = 1) -> None:
            if task is not None:
                self._rich.advance(task, n)

        try:
            yield tick
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0
            if task is not None:
                self._rich.remove_task(task)


def _fmt(v: Any, spec: str = ".3f") -> str:
    if v is None:
        return "—"
    return format(v, spec) if isinstance(v, float) else str(v)


def render_build(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console()
    b = report["bundle"]
    c.print(f"[bold green]built[/] {b['path']}  ({b['bytes']:,} bytes, id {b['bundle_id'][:16]}, "
            f"{'signed by ' + b['signed_by'] if b['signed_by'] else '[yellow]unsigned[/]'})")
    opt = report["optimization"]
    m = report["metrics"]
    t = Table(title=f"{b['name']} {b['version']} for {b['target']}: {opt['summary']}")
    t.add_column("metric")
    t.add_column("fp32", justify="right")
    t.add_column("optimized", justify="right")
    t.add_column("", justify="right")
    size = m["size"]
    t.add_row("size (bytes)", f"{size['fp32_bytes']:,}", f"{size['optimized_bytes']:,}",
              f"{size['ratio']:.2f}x smaller")
    acc = m["accuracy"]
    if acc.get("accuracy_fp32") is not None:
        t.add_row("accuracy", f"{100 * acc['accuracy_fp32']:.2f}%",
                  f"{100 * acc['accuracy_optimized']:.2f}%", f"drop {acc['drop_points']:.2f} pt")
    if acc.get("top1_agreement") is not None:
        t.add_row("top-1 agreement", "", f"{100 * acc['top1_agreement']:.2f}%", "")
    t.add_row("min cosine", "", _fmt(acc.get("min_cosine"), ".5f"), "")
    t.add_row("max abs error", "", _fmt(acc.get("max_abs_error"), ".4g"), "")
    lat = m["latency"]
    note = "" if lat["representative"] else " (host CPU, not the target's)"
    t.add_row("p50 latency (ms)" + note, _fmt(lat["fp32"]["p50_ms"]),
              _fmt(lat["optimized"]["p50_ms"]), f"{lat['speedup_p50']:.2f}x")
    t.add_row("p95 latency (ms)", _fmt(lat["fp32"]["p95_ms"]), _fmt(lat["optimized"]["p95_ms"]),
              "")
    t.add_row("eval samples", "", str(acc["samples"]), acc.get("basis", ""))
    c.print(t)
    if report.get("variants"):
        v = Table(title="candidates measured on this host")
        for col in ("scheme", "bytes", "p50 ms", "drop pt", "gate", "result"):
            v.add_column(col)
        for row in report["variants"]:
            v.add_row(row["scheme"], f"{row['bytes']:,}", _fmt(row["latency"]["p50_ms"]),
                      _fmt(row["drop_points"], ".2f"), "pass" if row["passed"] else "FAIL",
                      f"chosen: {row['why']}" if row["result"] == "chosen" and row.get("why")
                      else row["result"])
        c.print(v)
        for note in opt.get("search_notes", []):
            c.print(f"[dim]{note}[/]")
    pr = report.get("pruning")
    if pr:
        rep = pr.get("report", {})
        line = f"pruned to {100 * pr.get('sparsity', 0):.1f}% sparsity"
        if rep.get("compressed_ratio"):
            line += (f"; compressed (deflate) model {rep['compressed_bytes']:,} B, "
                     f"{rep['compressed_ratio']:.2f}x smaller than unpruned")
        c.print(line)
        c.print("[dim]unstructured sparsity does not speed up onnxruntime or TFLite CPU kernels: "
                "the gain is transfer and storage size[/]")
    if opt.get("nodes_in_float"):
        c.print(f"kept in float to pass the gate: {', '.join(opt['nodes_in_float'])}")
    for name, why in acc.get("not_compared", {}).items():
        c.print(f"[dim]{name}: {why}[/]")
    for w in report.get("warnings", []):
        c.print(f"[bold yellow]warning:[/] {w}")


def render_bundle(d: dict, console: Any) -> None:
    from rich.table import Table

    m = d["manifest"]
    t = Table(title=f"{m['name']} {m['version']} for {m['target']}", show_header=False)
    t.add_row("bundle id", d["bundle_id"])
    t.add_row("bytes", f"{d['bytes']:,}")
    t.add_row("signed by", d["signed_by"] or "unsigned")
    t.add_row("created", m.get("created", ""))
    t.add_row("model", f"{m['model']['file']} ({m['model']['format']}, {m['model']['bytes']:,} B)")
    for io in ("inputs", "outputs"):
        for s in m["model"][io]:
            t.add_row(io[:-1], f"{s['name']} {s['dtype']} {s['shape']}")
    t.add_row("runtime", f"{m['runtime']['name']} >= {m['runtime'].get('min_version', '?')}")
    opt = m.get("optimization", {})
    t.add_row("optimization", opt.get("summary", opt.get("mode", "")))
    met = m.get("metrics", {})
    if met:
        t.add_row("size ratio", f"{met.get('size_ratio', 0):.2f}x")
        if met.get("accuracy_optimized") is not None:
            t.add_row("accuracy", f"{100 * met['accuracy_fp32']:.2f}% → "
                      f"{100 * met['accuracy_optimized']:.2f}%")
        if met.get("top1_agreement") is not None:
            t.add_row("top-1 agreement", f"{100 * met['top1_agreement']:.2f}%")
    b = m.get("budgets", {})
    t.add_row("budgets", f"p95 {b.get('p95_ms')} ms, RSS {b.get('peak_rss_mb')} MB, "
              f"model {b.get('model_mb')} MB")
    console.print(t)
    for w in opt.get("warnings", []):
        console.print(f"[bold yellow]warning:[/] {w}")
