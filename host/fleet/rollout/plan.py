"""Planning a rollout: the arithmetic of stages, failure limits and durations, and the order
in which a group's devices get the bundle."""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections.abc import Sequence

from edgepack.agent.errors import EdgepackError
from edgepack.host.fleet.storage import DeviceRecord, RolloutDeviceRecord

__all__ = [
    "RolloutError",
    "parse_stages",
    "parse_max_failures",
    "parse_duration",
    "allowed_failures",
    "stage_sizes",
    "bundle_budgets",
    "plan_devices",
    "ACTIVE_STATES",
    "FINAL_STATES",
    "DEVICE_STATUSES",
    "EVENT_STATUS",
]

ACTIVE_STATES = ("running", "halting", "rolling_back", "abort_requested", "aborting")
FINAL_STATES = ("completed", "halted", "aborted")
DEVICE_STATUSES = ("waiting", "pending", "downloading", "installing", "installed", "failed",
                   "rolling_back", "rolled_back")
# how far an install got, by the kind of event that says so
EVENT_STATUS = {"download_started": "downloading", "download_progress": "downloading",
                "downloaded": "installing", "verified": "installing", "staged": "installing",
                "health_checking": "installing", "installed": "installed"}
_DUR = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


class RolloutError(EdgepackError):
    """A rollout cannot be planned, found or changed."""


def parse_stages(text: str | Sequence[float | str]) -> list[float]:
    """``"1,10,50,100"`` -> ``[1.0, 10.0, 50.0, 100.0]``: increasing percentages in (0, 100]."""
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        stages = [float(str(s).strip().rstrip("%")) for s in items if str(s).strip()]
    except ValueError:
        raise RolloutError(f"`stages=` {text!r} must be comma-separated percentages, e.g. "
                           "1,10,50,100", field="stages") from None
    if not stages:
        raise RolloutError("`stages=` needs at least one percentage, e.g. 1,10,50,100",
                           field="stages")
    if any(not 0 < s <= 100 for s in stages) or \
            any(b <= a for a, b in zip(stages, stages[1:], strict=False)):
        raise RolloutError(f"`stages=` {text!r} must be increasing percentages between 0 and "
                           "100, e.g. 1,10,50,100", field="stages")
    return stages


def parse_max_failures(text: str | int) -> str:
    """``"5%"`` (of the devices deployed so far) or ``"3"`` (devices); returned normalised."""
    s = str(text).strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", s)
    if m and 0 <= float(m.group(1)) <= 100:
        return f"{float(m.group(1)):g}%"
    if s.isdigit():
        return str(int(s))
    raise RolloutError(f"`max_failures=` {text!r} must be a device count (3) or a percentage "
                       "of the devices deployed so far (5%)", field="max_failures")


def parse_duration(text: str | float | int, *, name: str = "duration") -> float:
    """``"10m"``, ``"30s"``, ``"1h"``, ``"250ms"`` or plain seconds -> seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    m = _DUR.match(text)
    if not m:
        raise RolloutError(f"`{name}=` {text!r} must look like 30s, 10m, 1h or 2d", field=name)
    return float(m.group(1)) * {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600,
                                "d": 86400}[m.group(2)]


def allowed_failures(max_failures: str, deployed: int) -> int:
    """How many failed devices a rollout tolerates among ``deployed`` devices."""
    if max_failures.endswith("%"):
        return math.floor(float(max_failures[:-1]) / 100.0 * deployed + 1e-9)
    return int(max_failures)


def stage_sizes(stages: Sequence[float], n: int) -> list[int]:
    """Cumulative device counts per stage: each stage adds at least one device while any are
    left, and a 100 % stage takes them all."""
    out: list[int] = []
    prev = 0
    for p in stages:
        k = n if p >= 100 else min(n, max(prev + 1, math.ceil(p / 100.0 * n - 1e-9)))
        out.append(k)
        prev = k
    return out


def bundle_budgets(manifest: dict | None) -> dict[str, float]:
    """p95 latency and peak RSS budgets a bundle's manifest sets (positive numbers only)."""
    b = (manifest or {}).get("budgets") or {}
    out = {}
    p95 = b.get("p95_ms", b.get("p95_latency_ms"))
    rss = b.get("peak_rss_mb", b.get("rss_mb"))
    if isinstance(p95, (int, float)) and p95 > 0:
        out["p95_ms"] = float(p95)
    if isinstance(rss, (int, float)) and rss > 0:
        out["peak_rss_mb"] = float(rss)
    return out


def plan_devices(rollout_id: str, members: Sequence[DeviceRecord],
                 stages: Sequence[float]) -> tuple[list[RolloutDeviceRecord], list[int]]:
    """Cut ``members`` into cumulative stages: online devices first, in an order drawn from the
    rollout id (so canaries differ between rollouts). Returns the devices, each with the bundle
    it runs now (to roll back to), and the cumulative stage sizes."""
    ordered = sorted(members, key=lambda d: (d.online is not True, hashlib.sha256(
        f"{rollout_id}/{d.device_id}".encode()).hexdigest()))
    sizes = stage_sizes(stages, len(ordered))
    plan: list[RolloutDeviceRecord] = []
    prev = 0
    now = time.time()
    for k, upto in enumerate(sizes):
        for d in ordered[prev:upto]:
            active = None
            if d.bundle_id:
                active = {"bundle_id": d.bundle_id, "name": d.bundle_name,
                          "version": d.bundle_version}
            plan.append(RolloutDeviceRecord(
                rollout_id=rollout_id, device_id=d.device_id, stage=k,
                deployment_id=f"{rollout_id}-s{k + 1}", status="waiting", previous=active,
                updated=now))
        prev = upto
    return plan, sizes
