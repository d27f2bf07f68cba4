"""TFLite flatbuffers: read with the TFLite schema (what they are: int8, 16x8, float16, …), then
packaged as they are by the TFLite backend.

The importer does not require LiteRT to run the model: a model LiteRT refuses may still run in
TFLite Micro (microcontroller targets validate there); the backend runs it in the interpreter the
target uses.
"""

from __future__ import annotations

from pathlib import Path

from edgepack.agent.errors import ModelError
from edgepack.host.build.importers.base import TFLITE_ID, Imported

__all__ = ["load"]


def load(src: Path, *, workdir: Path, opset: int, sample_input: str | None) -> Imported:
    """A ``.tflite`` file, described from its flatbuffer."""
    from edgepack.host.build.tflite_intake import (
        check_with_litert,
        check_with_tflm,
        inspect_tflite,
        zero_inputs,
    )

    try:
        data = src.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read {src}: {exc.strerror}", stage="import") from None
    if len(data) < 8 or data[4:8] != TFLITE_ID:
        raise ModelError(f"{src} is not a TFLite model (no 'TFL3' flatbuffer identifier at "
                         "bytes 4-8). Is it truncated, or another format? Convert it again "
                         "with tf.lite.TFLiteConverter.", stage="import")
    corrupt = f"{src} has a TFLite header but does not load in LiteRT: {{}}. Is it truncated or " \
        "corrupt?"
    try:
        info = inspect_tflite(data, name=src.name)
    except ModelError as exc:
        raise ModelError(corrupt.format(exc.message), stage="import") from None
    ins = ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in info.inputs)
    notes = [f"TFLite flatbuffer ({info.size_bytes:,} bytes, {info.dtype}), packaged as is"
             + ("" if info.dtype != "float32" else " unless `quantize=` asks for int8 or dynamic")]
    zeros = zero_inputs(info)
    lite = check_with_litert(data, zeros)
    if lite.ok:
        notes.append(f"loads in LiteRT; inputs: {ins}")
    else:
        micro = check_with_tflm(data, zeros)
        if not micro.ok:
            raise ModelError(corrupt.format(lite.reason), stage="import")
        notes.append(f"{lite.reason}; TFLite Micro runs it (microcontroller targets); "
                     f"inputs: {ins}")
    details = {"tflite": {"dtype": info.dtype, "quantized": info.quantized,
                          "weights_quantized": info.weights_quantized,
                          "bytes": info.size_bytes, "ops": list(info.ops)}}
    return Imported("tflite", src, None, None, data, False, tuple(notes), details=details)
