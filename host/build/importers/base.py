"""What every importer returns, and the one helper they all use for messages."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["HDF5_MAGIC", "TFLITE_ID", "Imported", "first_line"]

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
TFLITE_ID = b"TFL3"  # flatbuffer file identifier, bytes 4-8


@dataclass(frozen=True)
class Imported:
    """A model read from any supported format, in the form the build pipeline consumes."""

    kind: str  # one of importers.KINDS
    source: Path
    onnx_path: Path | None  # always set for onnx / keras / saved_model / sklearn / pmml
    saved_model_dir: Path | None  # keras / saved_model: the TFLite converter's input
    tflite_bytes: bytes | None  # tflite: packaged as is
    float_only: bool  # nothing in the model has int8 kernels: keep it float and say so
    notes: tuple[str, ...]  # what the importer did, for the build report
    domain: Any = None  # data.InputDomain: missing values, rows to use without data (PMML)
    details: dict[str, Any] = field(default_factory=dict)  # extra entries of report.model


def first_line(exc: object) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
