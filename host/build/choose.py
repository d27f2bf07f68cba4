"""The choose stage: which measured candidate ships.

On the host (:func:`choose_on_host`, pure): when this host can time the target's CPU family the
backend measures fp32, dynamic int8 and the profile's static int8 schemes on the same samples;
the fastest that passes the gate ships, the smaller at equal speed — speeds within
:data:`EQUAL_SPEED` (10 %) of each other are equal (closer than that is timing noise on a shared
machine), sizes within :data:`EQUAL_SIZE` (2 %) too, and among equals the profile's default
scheme stays (reproducible builds). A quantized candidate measured slower than fp32 never ships
unless the user forced its mode (``quantize=`` int8), and then the report says so.

With devices in the loop (``profile_on=``, :func:`choose_on_devices`): the candidates are
packaged, the named devices measure and gate them, the fastest that passes ships. The model is
imported, pre-flighted and its fp32 reference computed once; each candidate is only optimized,
gated on the host and packaged (a candidate failing the host gate is not sent).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from edgepack.agent.errors import BudgetError, GateError
from edgepack.host.build.backends import Backend, Baseline
from edgepack.host.build.package import bundle_path
from edgepack.host.build.plan import BuildPlan
from edgepack.host.build.report import Progress
from edgepack.host.build.result import BuildResult

__all__ = ["EQUAL_SIZE", "EQUAL_SPEED", "HostChoice", "Variant", "choose_on_host",
           "choose_on_devices"]

EQUAL_SPEED = 1.10  # p50 ratios under this are timing noise: equal speed
EQUAL_SIZE = 1.02  # byte ratios under this: equal size


@dataclass(frozen=True)
class Variant:
    """One candidate as measured on this host."""

    label: str  # "fp32", "dynamic S8 pc", "QDQ-U8S8-pc", …
    mode: str  # none | fp16 | dynamic | int8
    bytes: int
    p50_ms: float  # math.inf when not timed (failed the gate)
    drop_points: float
    passed: bool
    default: bool = False  # the profile's default scheme (kept among equals)
    gated: bool = True  # False: timed but not gated (it could not win), never eligible


@dataclass(frozen=True)
class HostChoice:
    """The winner (an index into the variants), why it won, and why each other one lost."""

    winner: int
    why: str
    results: tuple[str, ...]  # per variant: "chosen", "gate: …", "slower: …", "p50 …"
    slower_than_fp32: bool  # the winner is quantized and measured slower than fp32 (forced)


def choose_on_host(variants: Sequence[Variant], *, forced: bool = False) -> HostChoice | None:
    """The variant to ship (see the module docstring), or None when none passes the gate.

    ``forced``: the user asked for this mode, so quantized variants slower than fp32 stay
    eligible (fp32, if measured, is then a reference and never chosen).
    """
    fp32 = next((v for v in variants if v.mode == "none"), None)

    def slower(v: Variant) -> bool:
        return fp32 is not None and v is not fp32 and v.p50_ms > fp32.p50_ms

    eligible = [v for v in variants if v.passed and not (forced and v is fp32)
                and (forced or not slower(v))]
    if not eligible:
        return None
    fastest = min(eligible, key=lambda v: v.p50_ms)
    near = [v for v in eligible if v.p50_ms <= fastest.p50_ms * EQUAL_SPEED]
    smallest = min(near, key=lambda v: v.bytes)
    compact = [v for v in near if v.bytes <= smallest.bytes * EQUAL_SIZE]
    winner = next((v for v in compact if v.default), None) or \
        min(compact, key=lambda v: v.p50_ms)
    if winner is fastest:
        why = f"fastest that passes the gate (p50 {winner.p50_ms:.3f} ms)"
    elif winner.default:
        why = (f"the profile's default, within {EQUAL_SPEED:.2f}x of the fastest "
               f"({fastest.label}) and {EQUAL_SIZE:.2f}x of the smallest: equal, default kept")
    else:
        why = (f"smallest ({winner.bytes:,} B) within {EQUAL_SPEED:.2f}x of the fastest "
               f"({fastest.label}, p50 {fastest.p50_ms:.3f} ms): equal speed, the smaller ships")
    if fp32 is not None and winner is not fp32:
        why += f"; {fp32.p50_ms / winner.p50_ms:.2f}x fp32 speed"
    results = []
    for v in variants:
        if v is winner:
            results.append("chosen")
            continue
        if v.gated and not v.passed:
            results.append(f"gate: drop {v.drop_points:.2f} pt, over the allowed")
            continue
        ratio = v.p50_ms / winner.p50_ms
        if not v.gated:
            why_not = (f"{fp32.p50_ms / v.p50_ms:.2f}x of fp32 speed" if slower(v)
                       else f"p50 {ratio:.2f}x of chosen")
            results.append(f"slower: {why_not}; not gated (it could not win)")
        elif slower(v) and not forced:
            results.append(f"slower than fp32 ({fp32.p50_ms / v.p50_ms:.2f}x of its speed): "
                           "never shipped over fp32")
        elif v is fp32 and forced:
            results.append(f"fp32 reference (p50 {ratio:.2f}x of chosen): int8 was forced")
        elif ratio >= 1.0:
            results.append(f"slower: p50 {ratio:.2f}x of chosen")
        elif any(v is c for c in compact):
            results.append(f"p50 {ratio:.2f}x of chosen: under {EQUAL_SPEED:.2f}x is noise, "
                           "default kept")
        else:
            results.append(f"p50 {ratio:.2f}x of chosen at {v.bytes / winner.bytes:.2f}x its "
                           f"size: equal speed (under {EQUAL_SPEED:.2f}x), the smaller ships")
    index = next(i for i, v in enumerate(variants) if v is winner)
    return HostChoice(index, why, tuple(results),
                      slower_than_fp32=forced and slower(winner))


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
    from edgepack.host.fleet.identity import inventory_keys

    keys = inventory_keys(on.db, on.fleet, on.devices)
    with progress.stage(f"profiling {len(built)} candidates on {', '.join(on.devices)}"):
        choice = choose_on_devices(
            [Candidate(label, r.path) for label, r in built.items()],
            devices=on.devices, broker=on.broker, key_path=plan.package.key, fleet=on.fleet,
            input_specs=base.inputs, output_specs=base.outputs, evalset=base.data.evalset,
            reference=base.reference, batch=plan.data.batch, max_drop=plan.max_drop,
            rss_budget_mb=plan.profile.budgets.rss_mb, p95_budget_ms=plan.profile.budgets.p95_ms,
            runs=on.runs, timeout=on.timeout, device_keys=keys,
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
