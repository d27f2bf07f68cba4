"""The one interface every format backend implements, and what passes between the stages."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from edgepack.host.build.data import GateData, TensorSpec
from edgepack.host.build.plan import BuildPlan
from edgepack.host.build.report import Progress
from edgepack.host.build.result import BuildReport
from edgepack.host.build.validate import Outputs

if TYPE_CHECKING:
    from edgepack.host.build.drift_reference import DriftSample

__all__ = ["Assembly", "Backend", "Baseline"]


@dataclass(frozen=True)
class Baseline:
    """A pre-flighted model, its gate data and the fp32 reference outputs on the eval set.

    Built once per build; every candidate (and, with device-in-the-loop choice, every candidate
    bundle) is optimized and gated against it. Backends subclass it with what they keep.
    """

    imported: Any  # importers.Imported (or anything with its attributes)
    work: Path  # scratch directory of this build
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    data: GateData
    reference: Outputs
    threads: int


@dataclass(frozen=True)
class Assembly:
    """A chosen candidate ready for the package stage."""

    manifest: dict[str, Any]
    model_bytes: bytes
    files: dict[str, bytes]
    golden: dict[str, np.ndarray]
    report: BuildReport
    # The build's data and the chosen model's outputs on it, for the drift reference
    # (None: the backend gives none, and the bundle has no drift.json).
    drift: DriftSample | None = None
    drift_skipped: str = "not profiled for this model format"


class Backend(Protocol):
    """A model format: pre-flight, optimize (candidates through the gate, the best chosen),
    assemble (the format's manifest and report entries)."""

    format: str

    def prepare(self, plan: BuildPlan, imported: Any, work: Path,
                progress: Progress) -> Baseline: ...

    def optimize(self, base: Any, plan: BuildPlan, progress: Progress) -> Any: ...

    def assemble(self, base: Any, optimized: Any, plan: BuildPlan,
                 progress: Progress) -> Assembly: ...

    def device_candidates(self, plan: BuildPlan) -> list[tuple[str, BuildPlan]]:
        """``(label, plan)`` of every candidate the devices measure (empty: not supported)."""
        ...
