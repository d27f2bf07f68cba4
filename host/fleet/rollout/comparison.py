"""Comparing a stage with its references: what the new bundle does on the stage's devices
during the soak, against (a) the same devices on their previous bundle before the switch and
(b) a baseline group over the same time — p95 latency, error rate, drift score, confidence.

Robust statistics (``docs/rollouts.md``): a device's p95 is the median of its windows' p95s and
counts only with ``min_reports`` windows; a side's latency is the median across its devices;
error rates pool errors / inferences and need ``min_inferences``; confidence pools the
sketched top probabilities and needs ``min_rows``; drift is the median of per-device scores
(each judged with the drift judge's own 300-row minimum). A metric whose stage side lacks
samples, or whose references all do, is ``insufficient`` and decides nothing. A metric is
beyond its threshold when the stage is beyond it against *every* reference that has enough
samples (the baseline rules out a fleet-wide change — load, weather —, the device's own history
rules out devices that were different to begin with), and halts the rollout when two
comparisons in a row find it so (:meth:`StageComparison.confirmed`).
"""

from __future__ import annotations

import hashlib
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from edgepack.agent.errors import EdgepackError
from edgepack.host.fleet.rollout.actions import Tick
from edgepack.host.fleet.rollout.checks import RolloutChecks
from edgepack.host.fleet.storage import Store

__all__ = ["MetricCheck", "StageComparison", "compare_stage", "baseline_devices", "HISTORY_S",
           "MAX_BASELINE", "MAX_BASELINE_DRIFT"]

# how far back a device's previous bundle is read (before its switch); how many baseline
# devices are read (an even sample, by the hash of their id) and have their drift judged
HISTORY_S = 3600.0
MAX_BASELINE = 200
MAX_BASELINE_DRIFT = 25
_WHERE = {"previous": "on the previous bundle", "baseline": "in the baseline"}


@dataclass(frozen=True)
class MetricCheck:
    """One metric of a stage comparison: the stage's ``value``, the references', the threshold and
    the verdict (``ok``; ``beyond`` the threshold once, ``halt`` when the comparison before
    found it beyond too; ``insufficient``); ``devices`` are the stage's devices
    beyond the threshold on their own (against their previous bundle, else the baseline)."""

    metric: str
    value: float | None
    previous: float | None
    baseline: float | None
    threshold: float
    verdict: str
    devices: tuple[str, ...] = ()
    samples: dict[str, int] | None = None
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["devices"] = list(self.devices)
        return out


@dataclass(frozen=True)
class StageComparison:
    """A stage's comparison at one moment (``stage`` counts from 1; ``compared_with`` names
    the baseline devices)."""

    stage: int
    at: float
    compared_with: str
    checks: tuple[MetricCheck, ...]

    @property
    def halt(self) -> MetricCheck | None:
        """The first metric that halts the rollout, if any."""
        return next((c for c in self.checks if c.verdict == "halt"), None)

    @property
    def unconfirmed(self) -> bool:
        """Some metric is beyond its threshold for the first time: the next comparison
        decides (the stage does not pass meanwhile)."""
        return any(c.verdict == "beyond" for c in self.checks)

    def confirmed(self, before: dict[str, Any] | None) -> StageComparison:
        """This comparison with ``beyond`` turned into ``halt`` where the comparison
        ``before`` (its JSON) of the same stage found the metric beyond the threshold too."""
        seen = set()
        if before and before.get("stage") == self.stage:
            seen = {c["metric"] for c in before.get("checks", ())
                    if c.get("verdict") in ("beyond", "halt")}
        return replace(self, checks=tuple(
            replace(c, verdict="halt") if c.verdict == "beyond" and c.metric in seen else c
            for c in self.checks))

    def summary(self) -> str:
        return "; ".join(c.message for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage, "at": self.at, "compared_with": self.compared_with,
                "checks": [c.to_json() for c in self.checks]}


# ------------------------------------------------------------------------------ sides

@dataclass
class _Side:
    """Per-device figures of one side: window p95s, ``[errors, inferences]``,
    ``[confidence sum, rows]`` and drift scores."""

    p95: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, list[float]] = field(default_factory=dict)
    conf: dict[str, list[float]] = field(default_factory=dict)
    drift: dict[str, float] = field(default_factory=dict)


def _add(into: dict[str, list[float]], device: str, part: float, whole: float) -> None:
    pair = into.setdefault(device, [0.0, 0.0])
    pair[0] += part
    pair[1] += whole


def _median(xs: Sequence[float]) -> float | None:
    return float(statistics.median(xs)) if xs else None


def _telemetry(store: Store, fleet: str, ids: Sequence[str], since: float, until: float,
               keep: Callable[[str, str | None, float], bool]) -> _Side:
    side = _Side()
    for t in store.telemetry.samples(fleet, ids, since=since, until=until):
        if not keep(t.device_id, t.bundle_id, t.ts) or not t.inferences:
            continue
        if t.p95 is not None and t.p95 > 0:
            side.p95.setdefault(t.device_id, []).append(t.p95)
        _add(side.errors, t.device_id, t.errors or 0, t.inferences)
    return side


def _confidence(store: Store, fleet: str, ids: Sequence[str], since: float, until: float,
                keep: Callable[[str, str | None, float], bool], side: _Side) -> None:
    from edgepack.host.fleet.drift import decode_window

    for w in store.drift.windows(fleet, device_ids=list(ids), since=since, until=until):
        if not keep(w.device_id, w.bundle_id, w.ts):
            continue
        try:
            win = decode_window(w.payload)
        except EdgepackError:
            continue
        keys = sorted(k for k in win.sums if k.endswith(".conf") and k in win.counts)
        if not keys:
            continue
        _add(side.conf, w.device_id, win.sums[keys[0]], sum(win.counts[keys[0]]))


def _drift(store: Store, fleet: str, device: str, bundle_id: str | None, since: float,
           until: float) -> float | None:
    from edgepack.host.fleet.drift_status import drift_status

    if not bundle_id:
        return None
    for s in drift_status(store, fleet, device=device, since=since, until=until):
        if s.bundle_id == bundle_id and s.score is not None:
            return s.score
    return None


# ------------------------------------------------------------------------------ comparison

def baseline_devices(store: Store, tick: Tick, checks: RolloutChecks) -> tuple[str, list[str]]:
    """Who the stage is compared with: the baseline group's devices, or the rollout group's
    devices the rollout has not reached (its later stages', and members beyond its last
    stage), never a device the rollout reached."""
    r = tick.rollout
    reached = {d.device_id for d in tick.devices if d.status != "waiting"}
    group = checks.baseline_group or r.group_name
    ids = [] if checks.baseline_group else \
        [d.device_id for d in tick.devices if d.status == "waiting"]
    ids += [d.device_id for d in store.devices.list(r.fleet)
            if group in d.groups and d.device_id not in reached and d.device_id not in ids]
    label = f"group {group}" if checks.baseline_group else \
        f"the {len(ids)} device(s) of group {group} the rollout has not reached"
    if len(ids) > MAX_BASELINE:
        ids = sorted(ids, key=lambda i: hashlib.sha256(i.encode()).digest())[:MAX_BASELINE]
        label += f" (a sample of {MAX_BASELINE})"
    return label, ids


def compare_stage(store: Store, tick: Tick, k: int, checks: RolloutChecks) -> StageComparison:
    """Compare the installed devices of stage ``k`` (on the new bundle since they installed)
    with their previous bundle and the baseline (see the module's docstring)."""
    r = tick.rollout
    now = tick.now
    stage = [d for d in tick.stage_devices(k) if d.status == "installed"]
    by_id = {d.device_id: d for d in stage}
    ids = list(by_id)
    start = min((d.installed_at or r.soak_started or now for d in stage), default=now)
    label, base_ids = baseline_devices(store, tick, checks)

    def on_new(dev: str, bundle: str | None, ts: float) -> bool:
        d = by_id[dev]
        return bundle == r.bundle_id and ts >= (d.installed_at or start)

    def before(dev: str, bundle: str | None, ts: float) -> bool:
        d = by_id[dev]
        prev = (d.previous or {}).get("bundle_id")
        return bool(prev) and bundle == prev and ts < (d.deployed_at or start)

    def other(_dev: str, bundle: str | None, _ts: float) -> bool:
        return bundle != r.bundle_id

    first_deploy = min((d.deployed_at or start for d in stage), default=start)
    last_deploy = max((d.deployed_at or start for d in stage), default=start)
    sides = {"stage": _telemetry(store, r.fleet, ids, start, now + 1, on_new),
             "previous": _telemetry(store, r.fleet, ids, first_deploy - HISTORY_S,
                                    last_deploy, before),
             "baseline": _telemetry(store, r.fleet, base_ids, start, now + 1, other)}
    _confidence(store, r.fleet, ids, start, now + 1, on_new, sides["stage"])
    if sides["stage"].conf:
        _confidence(store, r.fleet, ids, first_deploy - HISTORY_S, last_deploy, before,
                    sides["previous"])
        _confidence(store, r.fleet, base_ids, start, now + 1, other, sides["baseline"])
    ref = store.drift.reference(r.fleet, r.bundle_id)
    if ref is not None and ref.reference is not None:
        for d in stage:
            s = _drift(store, r.fleet, d.device_id, r.bundle_id, d.installed_at or start, now + 1)
            if s is not None:
                sides["stage"].drift[d.device_id] = s
            prev = (d.previous or {}).get("bundle_id")
            at = d.deployed_at or start
            s = _drift(store, r.fleet, d.device_id, prev, at - HISTORY_S, at)
            if s is not None:
                sides["previous"].drift[d.device_id] = s
        if sides["stage"].drift:
            running = {x.device_id: x.bundle_id for x in store.devices.list(
                r.fleet, ids=base_ids[:MAX_BASELINE_DRIFT])}
            for dev, bundle in running.items():
                s = _drift(store, r.fleet, dev, bundle, start, now + 1)
                if s is not None and bundle != r.bundle_id:
                    sides["baseline"].drift[dev] = s
    drift, confidence = _drift_check(sides, checks), _confidence_check(sides, checks)
    if ref is None or ref.reference is None:
        why = "the new bundle has no drift reference (drift.json)"
        drift = replace(drift, message=f"drift score: {why}")
        confidence = replace(confidence, message=f"confidence: {why}")
    checks_out = (_latency(sides, checks), _errors(sides, checks), drift, confidence)
    return StageComparison(stage=k + 1, at=now, compared_with=label, checks=checks_out)


# ------------------------------------------------------------------------------ metrics

def _decide(metric: str, values: dict[str, float | None], enough: dict[str, bool],
            worse: Callable[[float, float], bool], threshold: float,
            per_device: dict[str, tuple[float, float | None]], fmt: Callable[[float], str],
            allowed: str, samples: dict[str, int]) -> MetricCheck:
    """The verdict of one metric from its three sides (see the module's docstring)."""
    stage = values["stage"] if enough["stage"] else None
    refs = {k: values[k] for k in ("previous", "baseline") if enough[k] and values[k] is not None}
    shown = {k: (values[k] if enough[k] else None) for k in values}
    name = metric.replace("_", " ")
    if stage is None or (not refs and metric != "drift_score"):
        missing = "the stage" if stage is None else "its previous bundle and the baseline"
        return MetricCheck(metric, shown["stage"], shown["previous"], shown["baseline"],
                           threshold, "insufficient", samples=samples,
                           message=f"{name}: not enough samples yet for {missing}")
    bad = all(worse(stage, v) for v in refs.values()) if refs else worse(stage, 0.0)
    devices = tuple(sorted(dev for dev, (mine, against) in per_device.items()
                           if against is not None and worse(mine, against)))
    against = ", ".join(f"{fmt(v)} {_WHERE[k]}" for k, v in refs.items()) or "no reference"
    verdict = "beyond" if bad else "ok"
    message = (f"{name} {fmt(stage)} on the new bundle vs {against}: "
               + (f"beyond the {allowed} allowed" if bad else f"within the {allowed} allowed"))
    if bad and devices:
        message += f" (devices: {', '.join(devices[:10])}{' …' if len(devices) > 10 else ''})"
    return MetricCheck(metric, stage, shown["previous"], shown["baseline"], threshold, verdict,
                       devices, samples, message)


def _per_device(mine: dict[str, float], own: dict[str, float],
                base: float | None) -> dict[str, tuple[float, float | None]]:
    return {dev: (v, own.get(dev, base)) for dev, v in mine.items()}


def _latency(sides: dict[str, _Side], c: RolloutChecks) -> MetricCheck:
    per = {k: {dev: _median(xs) for dev, xs in s.p95.items() if len(xs) >= c.min_reports}
           for k, s in sides.items()}
    values = {k: _median([v for v in p.values() if v is not None]) for k, p in per.items()}
    enough = {k: bool(p) for k, p in per.items()}
    return _decide("p95_latency", values, enough,
                   lambda new, ref: new > ref * (1 + c.max_latency_regression),
                   c.max_latency_regression,
                   _per_device(per["stage"], per["previous"], values["baseline"]),  # type: ignore[arg-type]
                   lambda v: f"{v:.2f} ms", f"+{c.max_latency_regression:.0%}",
                   {k: sum(len(xs) for xs in s.p95.values()) for k, s in sides.items()})


def _ratio(metric: str, sides: dict[str, _Side], pick: Callable[[_Side], dict[str, list[float]]],
           minimum: int, worse: Callable[[float, float], bool], threshold: float,
           fmt: Callable[[float], str], allowed: str) -> MetricCheck:
    """A pooled ratio (errors / inferences, confidence sum / rows): a side counts with at
    least ``minimum`` in the denominator."""
    totals = {k: (sum(p for p, _ in pick(s).values()), sum(w for _, w in pick(s).values()))
              for k, s in sides.items()}
    values = {k: (p / w if w else None) for k, (p, w) in totals.items()}

    def per(k: str) -> dict[str, float]:
        return {dev: p / w for dev, (p, w) in pick(sides[k]).items() if w}

    return _decide(metric, values, {k: w >= minimum for k, (_, w) in totals.items()}, worse,
                   threshold, _per_device(per("stage"), per("previous"), values["baseline"]),
                   fmt, allowed, {k: int(w) for k, (_, w) in totals.items()})


def _errors(sides: dict[str, _Side], c: RolloutChecks) -> MetricCheck:
    return _ratio("error_rate", sides, lambda s: s.errors, c.min_inferences,
                  lambda new, ref: new - ref > c.max_error_rate_rise, c.max_error_rate_rise,
                  lambda v: f"{v:.2%}", f"+{c.max_error_rate_rise * 100:g}pt")


def _drift_check(sides: dict[str, _Side], c: RolloutChecks) -> MetricCheck:
    values = {k: _median(list(s.drift.values())) for k, s in sides.items()}
    t = c.max_drift_score
    return _decide("drift_score", values, {k: v is not None for k, v in values.items()},
                   lambda new, ref: new >= t and ref < t, t,
                   _per_device(sides["stage"].drift, sides["previous"].drift, 0.0),
                   lambda v: f"{v:.2f}", f"score below {t:g}",
                   {k: len(s.drift) for k, s in sides.items()})


def _confidence_check(sides: dict[str, _Side], c: RolloutChecks) -> MetricCheck:
    return _ratio("confidence", sides, lambda s: s.conf, c.min_rows,
                  lambda new, ref: ref - new > c.max_confidence_drop, c.max_confidence_drop,
                  lambda v: f"{v:.3f}", f"-{c.max_confidence_drop * 100:g}pt")
