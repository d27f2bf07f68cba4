"""ONNX models: read, described, passed through (pre-flight happens in ``convert_onnx``)."""

from __future__ import annotations

from pathlib import Path

from edgepack.host.build.importers.base import Imported
from edgepack.host.build.importers.check import default_opset, float_only, load_onnx

__all__ = ["load"]


def load(src: Path, *, workdir: Path, opset: int, sample_input: str | None) -> Imported:
    """An ONNX file as it is."""
    model = load_onnx(src)
    notes = [f"ONNX model, opset {default_opset(model)}"]
    reason = float_only(model, src.name)
    if reason:
        notes.append(reason)
    return Imported("onnx", src, src, None, None, reason is not None, tuple(notes))
