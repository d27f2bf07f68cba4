"""TFLite flatbuffers: checked (they must load in LiteRT), then packaged as they are."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgepack.agent.errors import ModelError
from edgepack.host.build.importers.base import TFLITE_ID, Imported, first_line
from edgepack.host.build.importers.savedmodel import import_tf

__all__ = ["load"]


def load(src: Path, *, workdir: Path, opset: int, sample_input: str | None) -> Imported:
    """A ``.tflite`` file, packaged as is."""
    try:
        data = src.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read {src}: {exc.strerror}", stage="import") from None
    if len(data) < 8 or data[4:8] != TFLITE_ID:
        raise ModelError(f"{src} is not a TFLite model (no 'TFL3' flatbuffer identifier at "
                         "bytes 4-8). Is it truncated, or another format? Convert it again "
                         "with tf.lite.TFLiteConverter.", stage="import")
    interp = _tflite_interpreter(data, src)
    notes = [f"TFLite flatbuffer ({len(data):,} bytes), packaged as is"]
    if interp is not None:
        ins = ", ".join(f"{d['name']} {d['dtype'].__name__}{list(d['shape'])}"
                        for d in interp.get_input_details())
        notes.append(f"loads in LiteRT; inputs: {ins}")
    return Imported("tflite", src, None, None, data, False, tuple(notes))


def _tflite_interpreter(data: bytes, src: Path) -> Any:
    """Load the model in LiteRT (or tf.lite) so a corrupt body fails here; None if neither."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            Interpreter = import_tf().lite.Interpreter  # noqa: N806
        except ImportError:
            return None
    try:
        interp = Interpreter(model_content=data)
        interp.allocate_tensors()
    except Exception as exc:
        raise ModelError(f"{src} has a TFLite header but does not load in LiteRT: "
                         f"{first_line(exc)}. Is it truncated or corrupt?",
                         stage="import") from None
    return interp
