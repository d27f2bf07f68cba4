"""Format backends behind one interface (:class:`Backend`): ONNX, TFLite, TFLite Micro."""

from __future__ import annotations

from edgepack.host.build.backends.base import Assembly, Backend, Baseline
from edgepack.host.build.plan import BuildPlan

__all__ = ["Assembly", "Backend", "Baseline", "backend_for"]


def backend_for(plan: BuildPlan) -> Backend:
    """The backend that builds ``plan.format``'s bundles (imported on use: TF stays unloaded)."""
    if plan.format == "tflm":
        from edgepack.host.build.backends.tflm import TflmBackend

        return TflmBackend()
    if plan.format == "tflite":
        from edgepack.host.build.backends.tflite import TfliteBackend

        return TfliteBackend()
    from edgepack.host.build.backends.onnx import OnnxBackend

    return OnnxBackend()
