"""What a stage is compared on: the operator's thresholds for halting a rollout on what the
new bundle does (latency, error rate, drift, confidence), with their documented defaults."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from edgepack.host.fleet.rollout.plan import RolloutError

__all__ = ["RolloutChecks", "parse_share", "parse_points"]

_NUM = r"(\d+(?:\.\d+)?)"


@dataclass(frozen=True)
class RolloutChecks:
    """Thresholds a stage's devices must stay within, compared with their own previous bundle
    and with a baseline group (``docs/rollouts.md``).

    ``max_latency_regression``: relative rise of the median per-device p95 latency (0.2 = 20 %).
    ``max_error_rate_rise``: rise of the error rate (failed / all inferences) in absolute
    points (0.01 = 1 point). ``max_drift_score``: drift score (1.0 = the drift alert threshold).
    ``max_confidence_drop``: fall of the mean top probability (0.05 = 5 points).
    ``min_reports``: telemetry windows with inferences a device needs on each side before its
    latency counts; ``min_inferences``: inferences each side needs before error rates are
    compared; ``min_rows``: sketched rows each side needs before confidence is compared.
    ``baseline_group``: the group compared with (default: the rollout group's devices the
    rollout has not reached). ``rollback_on_halt``: send the halted stage back to its previous
    bundle (default) or leave it on the new one.
    """

    max_latency_regression: float = 0.20
    max_error_rate_rise: float = 0.01
    max_drift_score: float = 1.0
    max_confidence_drop: float = 0.05
    min_reports: int = 5
    min_inferences: int = 1000
    min_rows: int = 300
    baseline_group: str | None = None
    rollback_on_halt: bool = True

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any] | None) -> RolloutChecks:
        """Read stored checks (unknown keys ignored; none stored: the defaults)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (doc or {}).items() if k in names})

    @classmethod
    def parse(cls, *, max_latency_regression: str | float | None = None,
              max_error_rate_rise: str | float | None = None,
              max_drift_score: str | float | None = None,
              max_confidence_drop: str | float | None = None,
              baseline_group: str | None = None, rollback_on_halt: bool = True,
              **counts: int) -> RolloutChecks:
        """Checks from the operator's spelling (``"20%"``, ``"1pt"``, ``"0.05"``); None keeps
        a default."""
        d = cls()
        return cls(
            max_latency_regression=d.max_latency_regression if max_latency_regression is None
            else parse_share(max_latency_regression, "max_latency_regression"),
            max_error_rate_rise=d.max_error_rate_rise if max_error_rate_rise is None
            else parse_points(max_error_rate_rise, "max_error_rate_rise"),
            max_drift_score=d.max_drift_score if max_drift_score is None
            else _positive(max_drift_score, "max_drift_score"),
            max_confidence_drop=d.max_confidence_drop if max_confidence_drop is None
            else parse_points(max_confidence_drop, "max_confidence_drop"),
            baseline_group=baseline_group or None, rollback_on_halt=bool(rollback_on_halt),
            **{k: int(_positive(v, k)) for k, v in counts.items() if v is not None})


def _positive(v: str | float, name: str) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        f = -1.0
    if not f > 0:
        raise RolloutError(f"`{name}=` {v!r} must be a positive number", field=name)
    return f


def parse_share(text: str | float, name: str = "max_latency_regression") -> float:
    """A relative change: ``"20%"`` or ``0.2`` -> 0.2."""
    s = str(text).strip()
    m = re.fullmatch(_NUM + r"\s*%", s)
    if m:
        return _positive(float(m.group(1)) / 100.0, name)
    if re.fullmatch(_NUM, s):
        return _positive(s, name)
    raise RolloutError(f"`{name}=` {text!r} must be a percentage (20%) or a fraction (0.2)",
                       field=name)


def parse_points(text: str | float, name: str = "max_error_rate_rise") -> float:
    """An absolute change of a rate or probability: ``"1pt"`` / ``"1%"`` (percentage points)
    or ``0.01`` -> 0.01."""
    s = str(text).strip()
    m = re.fullmatch(_NUM + r"\s*(pt|pts|%)", s)
    if m:
        return _positive(float(m.group(1)) / 100.0, name)
    if re.fullmatch(_NUM, s) and float(s) < 1:
        return _positive(s, name)
    raise RolloutError(f"`{name}=` {text!r} must be percentage points (1pt) or a fraction "
                       "below 1 (0.01)", field=name)
