"""Compatibility checks of a bundle's manifest against the device, before and after download.

Before the download the manifest comes from the published message, which ``table_sig`` does
not cover: any field may have any type, and garbage is refused (``rejected``/``malformed``),
never a crash. Shared by the agent and the fleet simulator.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from edgepack.agent.bundle import parse_version
from edgepack.agent.errors import BundleError
from edgepack.agent.protocol import DesiredState
from edgepack.agent.runtimes import FORMAT_RUNTIME
from edgepack.agent.transfer import Rejected

__all__ = ["DeviceFacts", "check_compat"]

log = logging.getLogger("edgepack.agent")
_MB = 1024 * 1024


@dataclass(frozen=True)
class DeviceFacts:
    """What a bundle is checked against."""

    target: str
    compatible_targets: tuple[str, ...] = ()
    runtimes: Mapping[str, str] = field(default_factory=dict)  # name -> version
    ram_mb: float | None = None  # None: not checked

    def accepts_target(self, target: str) -> bool:
        return target == self.target or target in self.compatible_targets


def check_compat(manifest: dict, desired: DesiredState, device: DeviceFacts,
                 active: tuple[str, str] | None = None) -> None:
    """Raise :class:`Rejected` unless the bundle can run here; ``active``: the (name, version)
    of the active bundle, for the downgrade check."""
    try:
        _check(manifest, desired, device, active)
    except (AttributeError, TypeError, ValueError, OverflowError) as exc:
        raise Rejected(f"the bundle's manifest has a field of the wrong type or value "
                       f"({type(exc).__name__}: {exc})", reason="malformed",
                       bundle_id=desired.bundle_id) from None


def _check(manifest: dict, desired: DesiredState, device: DeviceFacts,
           active: tuple[str, str] | None) -> None:
    bid = desired.bundle_id
    target = manifest.get("target")
    if not isinstance(target, str) or not device.accepts_target(target):
        extra = (f" or {', '.join(device.compatible_targets)}" if device.compatible_targets
                 else "")
        raise Rejected(f"bundle is built for target {target!r}; this device runs "
                       f"{device.target!r}{extra}. Build for {device.target} (edgepack build "
                       f"--target {device.target}) or list the target in compatible_targets.",
                       reason="target", bundle_id=bid)
    model = manifest.get("model") or {}
    fmt = model.get("format")
    runtime = (manifest.get("runtime") or {}).get("name") or FORMAT_RUNTIME.get(fmt or "")
    if fmt == "tflm" or runtime not in FORMAT_RUNTIME.values():
        raise Rejected(f"bundle needs runtime {runtime!r} (format {fmt!r}), which the Python "
                       "agent does not run", reason="runtime", bundle_id=bid)
    if runtime not in device.runtimes:
        raise Rejected(f"bundle needs runtime {runtime!r}, not installed on this device "
                       f"(available: {', '.join(device.runtimes) or 'none'})",
                       reason="runtime", bundle_id=bid)
    need = (manifest.get("runtime") or {}).get("min_version")
    have = device.runtimes.get(runtime)
    if need and have and _vtuple(have) < _vtuple(str(need)):
        raise Rejected(f"bundle needs {runtime} >= {need}; this device has {have}",
                       reason="runtime", bundle_id=bid)
    budgets = manifest.get("budgets") or {}
    model_mb = budgets.get("model_mb")
    if model_mb and isinstance(model.get("bytes"), int) \
            and model["bytes"] > float(model_mb) * _MB:
        raise Rejected(f"model is {model['bytes'] / _MB:.1f} MB, over its budget of "
                       f"{model_mb} MB", reason="budget", bundle_id=bid)
    rss = budgets.get("peak_rss_mb")
    if rss and device.ram_mb is not None and float(rss) > device.ram_mb:
        raise Rejected(f"bundle budgets {rss} MB of RSS; this device has "
                       f"{device.ram_mb:.0f} MB of RAM", reason="budget", bundle_id=bid)
    name, version = manifest.get("name"), manifest.get("version")
    if active is not None and name == active[0] and isinstance(version, str):
        try:
            older = parse_version(version) < parse_version(active[1])
        except BundleError:
            older = False
        if older and not desired.allow_downgrade:
            raise Rejected(f"{name} {version} is older than the active {active[1]}: a "
                           "downgrade. Deploy with allow_downgrade (edgepack deploy "
                           "--allow-downgrade) if you mean it.", reason="downgrade",
                           bundle_id=bid)
    if (name, version) != (desired.name, desired.version):
        log.warning("desired state names %s %s but the bundle is %s %s", desired.name,
                    desired.version, name, version)


def _vtuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.replace("-", ".").replace("+", ".").split("."):
        if not part.isdigit():
            break
        out.append(int(part))
    return tuple(out)
