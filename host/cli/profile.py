"""CLI: ``edgepack profile BUNDLE --device ID``: measure bundles on a real device."""

from __future__ import annotations

import sys
from typing import Any

import click

from edgepack.host.cli.agent import _broker_options  # the broker flags every command shares

__all__ = ["register", "render_profile", "render_choice"]


def _ms(v: Any, spec: str = ".3f") -> str:
    return "—" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)


def _top_ops(ops: dict | None, n: int = 3) -> str:
    if not ops:
        return "—"
    if not ops.get("available"):
        return "n/a" if ops.get("reason") == "not requested" else "n/a (runtime has no op profiler)"
    return ", ".join(f"{o['op']} {o['ms']:.3f} ({100 * o['share']:.0f}%)"
                     for o in (ops.get("ops") or [])[:n])


def _golden(res: dict) -> str:
    g = res.get("golden")
    if not g:
        return "—"
    if g.get("passed"):
        cos = [o.get("cosine") for o in g.get("outputs", []) if o.get("cosine") is not None]
        return f"pass ({g.get('samples')}, cos {min(cos):.5f})" if cos else \
            f"pass ({g.get('samples')})"
    return "FAIL"


def render_profile(report: dict) -> None:
    """Tables of :meth:`edgepack.host.fleet.profiling.ProfileReport.to_dict` for people."""
    from rich.console import Console
    from rich.table import Table

    c = Console()
    labels = {b["bundle_id"]: f"{b['name']} {b['version']} ({b['bundle_id'][:12]})"
              for b in report["bundles"]}
    for dev, run in report["devices"].items():
        rts = ", ".join(f"{k} {v}" for k, v in (run.get("runtimes") or {}).items() if v)
        head = (f"[bold]{dev}[/]: board {run.get('board') or '?'}"
                + (f", {run['cpu']}" if run.get("cpu") else "") + (f", {rts}" if rts else "")
                + f" — job {run.get('job_id') or '(none: cached)'} [bold]{run['status']}[/]"
                + (", signed by its enrolled key" if run.get("verified") else
                   ", [yellow]unverified[/] (not enrolled in a fleet database: `--db`)")
                + (f", {run['refused_reports']} forged message(s) dropped"
                   if run.get("refused_reports") else ""))
        t = Table(title=head, title_justify="left")
        for col, just in (("bundle", "left"), ("status", "left"), ("load ms", "right"),
                          ("first ms", "right"), ("p50 ms", "right"), ("p95 ms", "right"),
                          ("p99 ms", "right"), ("runs", "right"), ("peak RSS MB", "right"),
                          ("golden", "left"), ("top ops (ms/inference)", "left")):
            t.add_column(col, justify=just)  # type: ignore[arg-type]
        for res in run.get("results", []):
            lat = res.get("latency_ms") or {}
            status = res.get("status", "?")
            if res.get("cached"):
                status += " (cached)"
            elif res.get("measured_by") and res.get("measured_by") != dev:
                status += f" (on {res['measured_by']})"
            t.add_row(labels.get(res.get("bundle_id"), str(res.get("bundle_id"))[:12]), status,
                      _ms(res.get("load_ms"), ".1f"), _ms(res.get("first_ms")),
                      _ms(lat.get("p50")), _ms(lat.get("p95")), _ms(lat.get("p99")),
                      _ms(lat.get("runs"), "d"), _ms(res.get("peak_rss_mb"), ".1f"),
                      _golden(res), _top_ops(res.get("ops")))
        c.print(t)
        for res in run.get("results", []):
            if res.get("status") != "ok" and res.get("detail"):
                c.print(f"[yellow]{labels.get(res.get('bundle_id'), '?')}:[/] "
                        f"{res.get('reason')}: {res['detail']}")
        if run.get("message") and run["status"] not in ("complete", "cached"):
            c.print(f"[bold yellow]{run['message']}[/]")


def render_choice(choice: dict) -> None:
    """The candidates table of :meth:`DeviceChoice.to_dict` (``build --profile-on``)."""
    from rich.console import Console
    from rich.table import Table

    c = Console()
    t = Table(title=f"candidates measured on {', '.join(choice['devices'])} (gate: drop ≤ "
                    f"{choice['max_drop']:g} pt on {choice['eval_samples']} eval samples)")
    for col in ("candidate", "device", "p50 ms", "p95 ms", "peak RSS MB", "drop pt", "result"):
        t.add_column(col)
    for cand in choice["candidates"]:
        for i, (dev, f) in enumerate(cand["devices"].items()):
            by = f" (by {f['measured_by']})" if f.get("measured_by") not in (None, dev) else ""
            t.add_row(cand["label"] if i == 0 else "", dev + by + (" cached" if f.get("cached")
                                                                    else ""),
                      _ms(f.get("p50_ms")), _ms(f.get("p95_ms")), _ms(f.get("peak_rss_mb"), ".1f"),
                      _ms(f.get("drop_points"), ".2f"), cand["result"] if i == 0 else "")
    c.print(t)
    for m in choice.get("messages", []):
        c.print(f"[bold yellow]warning:[/] {m}")


def register(main: click.Group) -> None:
    """Add ``profile`` to the ``edgepack`` group."""

    @main.command("profile")
    @click.argument("bundles", nargs=-1, required=True,
                    type=click.Path(exists=True, dir_okay=False))
    @click.option("--device", "devices", multiple=True, required=True,
                  help="Device id to measure on; repeatable (devices with the same board and "
                       "runtime are measured once).")
    @_broker_options
    @click.option("--key", type=click.Path(exists=True, dir_okay=False),
                  help="Fleet private key: signs the job and the published chunk tables "
                       "(devices refuse unsigned jobs).")
    @click.option("--fleet", default="default", show_default=True)
    @click.option("--runs", type=click.IntRange(1, 100_000), default=50, show_default=True,
                  help="Timed inferences per bundle, after warm-up.")
    @click.option("--warmup", type=click.IntRange(0, 10_000), default=5, show_default=True)
    @click.option("--threads", type=click.IntRange(0, 1024), default=0, show_default=True,
                  help="Inference threads (0: as the device runs the bundle).")
    @click.option("--timeout", type=click.FloatRange(1), default=300.0, show_default=True,
                  help="Deadline of the job, seconds: the device stops and reports what it has.")
    @click.option("--max-rss-mb", type=click.IntRange(1), help="Kill a measurement above this.")
    @click.option("--no-ops", is_flag=True, help="Skip the per-operator breakdown.")
    @click.option("--cache", "cache_path", type=click.Path(dir_okay=False),
                  help="Result cache (default: ~/.cache/edgepack/profiles.json).")
    @click.option("--no-cache", is_flag=True, help="Measure again even if cached; store nothing.")
    @click.option("--db", "db_url", default=None, metavar="URL",
                  help="Fleet database with the enrolled device keys (`edgepack fleet enroll`): "
                       "results count only when the device's key signed them. Default: "
                       "./fleet.db when it exists; devices not enrolled are measured unverified.")
    @click.option("--json", "as_json", is_flag=True)
    def profile(bundles: tuple[str, ...], devices: tuple[str, ...], broker: str, ca: str | None,
                cert: str | None, client_key: str | None, username: str | None,
                password: str | None, key: str | None, fleet: str, runs: int, warmup: int,
                threads: int, timeout: float, max_rss_mb: int | None, no_ops: bool,
                cache_path: str | None, no_cache: bool, db_url: str | None,
                as_json: bool) -> None:
        """Measure BUNDLE(s) on a device: load, first inference, p50/p95/p99, peak RSS, golden
        outputs and the slowest operators."""
        from edgepack.agent.mqtt import parse_broker_url
        from edgepack.host.cli.main import emit
        from edgepack.host.fleet.profiling import ProfileCache
        from edgepack.host.fleet.profiling import profile as profile_bundles

        cfg = parse_broker_url(broker, ca=ca, cert=cert, key=client_key, username=username,
                               password=password)
        cache = ProfileCache(None) if no_cache else cache_path

        def progress(dev: str, msg: dict) -> None:
            if as_json:
                return
            kind = msg["kind"]
            what = {"accepted": "accepted the job", "refused": f"refused: {msg.get('detail')}",
                    "progress": f"{msg.get('stage')} {str(msg.get('bundle_id') or '')[:12]}",
                    "result": f"{str(msg.get('bundle_id'))[:12]}: {msg.get('status')}",
                    "done": f"done ({msg.get('status')})"}[kind]
            click.echo(f"{dev}: {what}", err=True)

        from edgepack.host.fleet.identity import inventory_keys

        keys = inventory_keys(db_url, fleet, devices)
        report = profile_bundles(bundles, device=devices, broker=cfg, key=key, fleet=fleet,
                                 runs=runs, warmup=warmup, threads=threads,
                                 op_profile=not no_ops, timeout=timeout, cache=cache,
                                 max_rss_mb=max_rss_mb, on_message=progress,
                                 device_keys=keys)
        emit(report.to_dict(), as_json, render_profile)
        if any(r.status in ("refused", "timeout") for r in report.devices.values()):
            sys.exit(1)
