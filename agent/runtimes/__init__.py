"""Model runtimes behind one interface, loaded by name when a bundle needs one.

A runtime module (``onnx``, ``tflite``) exposes ``NAME``, ``FORMATS``, ``available()``,
``version()`` and ``load(path, threads=0, providers=()) -> Session``. A :class:`Session` has
``inputs``/``outputs`` (:class:`TensorSpec`) and ``run(feeds) -> list[np.ndarray]``. Nothing heavy
is imported until :func:`open_model` needs it.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from edgepack.agent.errors import InstallError

__all__ = [
    "TensorSpec",
    "Session",
    "RUNTIMES",
    "FORMAT_RUNTIME",
    "available_runtimes",
    "runtime_module",
    "runtime_version",
    "open_model",
    "resolve_threads",
]

# runtime name (as in manifest["runtime"]["name"]) -> module under edgepack.agent.runtimes
RUNTIMES = {"onnxruntime": "onnx", "litert": "tflite"}
FORMAT_RUNTIME = {"onnx": "onnxruntime", "tflite": "litert"}


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as the runtime sees it."""

    name: str
    dtype: str  # numpy dtype name, or "sequence"/"map"/... for non-tensor outputs
    shape: tuple[int | str | None, ...]
    scale: float = 0.0  # quantization (TFLite int8/uint8 I/O); 0 when not quantized
    zero_point: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                "quantization": {"scale": self.scale, "zero_point": self.zero_point}
                if self.scale else None}


class Session(Protocol):
    """A loaded model."""

    runtime: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def run(self, feeds: dict[str, Any]) -> list[Any]:
        """Outputs in model order for inputs by name."""
        ...


def runtime_module(name: str) -> Any:
    """The ``edgepack.agent.runtimes`` module for a runtime name (``onnxruntime``, ``litert``)."""
    if name not in RUNTIMES:
        raise InstallError(f"runtime {name!r} is not supported by the Python agent (it runs "
                           f"{', '.join(RUNTIMES)})")
    return importlib.import_module(f"edgepack.agent.runtimes.{RUNTIMES[name]}")


def available_runtimes() -> list[str]:
    """Runtime names importable here, without importing them (cheap: spec lookups only)."""
    return [name for name in RUNTIMES if runtime_module(name).available()]


def runtime_version(name: str) -> str | None:
    """Installed version of a runtime, or None when it is missing."""
    mod = runtime_module(name)
    return mod.version() if mod.available() else None


def resolve_threads(threads: int) -> int:
    """0 means one thread per core."""
    if threads > 0:
        return threads
    import os

    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else (os.cpu_count() or 1))


def open_model(path: str | Path, runtime: str, *, threads: int = 0,
               providers: tuple[str, ...] = ()) -> Session:
    """Load a model file with the named runtime."""
    mod = runtime_module(runtime)
    if not mod.available():
        raise InstallError(f"runtime {runtime!r} is not installed on this device; install it "
                           f"(pip install 'edgepack[agent]' brings onnxruntime; LiteRT is "
                           f"'pip install ai-edge-litert')")
    return mod.load(Path(path), threads=resolve_threads(threads), providers=providers)


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
