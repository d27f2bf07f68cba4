"""What a build returns: the bundle written, its manifest and the build report."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["BuildReport", "BuildResult"]


@dataclass(frozen=True)
class BuildReport:
    """The build report: what every stage did. :meth:`to_dict` is the bundle's ``report.json``
    (plus ``bundle``, filled in once the bundle is written)."""

    model: dict[str, Any]
    optimization: dict[str, Any]
    metrics: dict[str, Any]
    warnings: list[str]
    timings_s: dict[str, float]
    variants: list[dict] | None = None
    pruning: dict[str, Any] | None = None
    tflm: dict[str, Any] | None = None
    edgetpu: dict[str, Any] | None = None
    device_profile: dict[str, Any] | None = None
    third_party_output: dict[str, Any] | None = None  # what the libraries printed (noise.py)
    bundle: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not None}


@dataclass(frozen=True)
class BuildResult:
    """A built bundle: where it is, its id (sha256 of the file), manifest and report."""

    path: Path
    bundle_id: str
    manifest: dict[str, Any]
    report: BuildReport
    model_bytes: bytes = field(repr=False, default=b"")
