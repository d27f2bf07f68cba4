"""The choose stage with devices in the loop (``profile_on=``): the candidates already built
are packaged, the named devices measure and gate them, the fastest that passes ships.

The model is imported, pre-flighted and its fp32 reference computed once; each candidate is
only optimized, gated on the host and packaged (a candidate failing the host gate is not sent).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from edgepack.agent.errors import BudgetError, GateError
from edgepack.host.build.backends import Backend, Baseline
from edgepack.host.build.package import bundle_path
from edgepack.host.build.plan import BuildPlan
from edgepack.host.build.report import Progress
from edgepack.host.build.result import BuildResult

__all__ = ["choose_on_devices"]


def choose_on_devices(backend: Backend, base: Baseline, plan: BuildPlan, work: Path,
                      progress: Progress) -> BuildResult:
    """Package every candidate of ``plan``, let ``plan.profile_on.devices`` measure and gate
    them, ship the winner (with the device figures in its manifest)."""
    from edgepack.agent.bundle import read_bundle, sha256_file
    from edgepack.host.build.engine import finish
    from edgepack.host.fleet.profiling import ProfileCache
    from edgepack.host.fleet.profiling_choice import Candidate, choose_on_devices, stamp_bundle

    on = plan.profile_on
    built: dict[str, BuildResult] = {}
    skipped: dict[str, str] = {}
    for label, cand in backend.device_candidates(plan):
        cand = replace(cand.with_quantize(variants=False),
                       package=replace(cand.package, out_dir=str(work / "candidates" / label)))
        with progress.stage(f"candidate {label}"):
            try:
                built[label] = finish(backend, base, cand, progress)
            except (GateError, BudgetError) as exc:  # fails on the host already: not sent
                skipped[label] = f"failed the gate on the host: {exc.message}"
    with progress.stage(f"profiling {len(built)} candidates on {', '.join(on.devices)}"):
        choice = choose_on_devices(
            [Candidate(label, r.path) for label, r in built.items()],
            devices=on.devices, broker=on.broker, key_path=plan.package.key, fleet=on.fleet,
            input_specs=base.inputs, output_specs=base.outputs, evalset=base.data.evalset,
            reference=base.reference, batch=plan.data.batch, max_drop=plan.max_drop,
            rss_budget_mb=plan.profile.budgets.rss_mb, p95_budget_ms=plan.profile.budgets.p95_ms,
            runs=on.runs, timeout=on.timeout,
            cache=ProfileCache(on.cache) if on.cache else ProfileCache.default())
    winner = choice.require()
    chosen = built[winner.label]
    out = bundle_path(plan)
    stamp_bundle(winner.bundle, out, choice.manifest_entry(), key_path=plan.package.key,
                 report_extra={"device_profile": choice.to_dict()})
    bid = sha256_file(out)
    report = replace(chosen.report,
                     device_profile={**choice.to_dict(), "skipped_on_host": skipped},
                     bundle={**(chosen.report.bundle or {}), "path": str(out), "bundle_id": bid,
                             "bytes": out.stat().st_size})
    return BuildResult(path=out, bundle_id=bid, manifest=read_bundle(out).manifest,
                       report=report, model_bytes=chosen.model_bytes)
