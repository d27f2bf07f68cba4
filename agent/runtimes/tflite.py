"""LiteRT (TensorFlow Lite) behind the agent's runtime interface.

The interpreter comes from ``ai_edge_litert`` (the current package), then ``tflite_runtime``
(its predecessor, numpy 1.x builds only), then ``tensorflow.lite`` (a full TensorFlow install).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgepack.agent.errors import InstallError
from edgepack.agent.runtimes import TensorSpec, _has

__all__ = ["NAME", "FORMATS", "available", "version", "preload", "load", "interpreter_class",
           "TfliteSession"]

NAME = "litert"
FORMATS = ("tflite",)
_SOURCES = (
    ("ai_edge_litert", "ai_edge_litert.interpreter", "ai-edge-litert"),
    ("tflite_runtime", "tflite_runtime.interpreter", "tflite-runtime"),
    ("tensorflow", "tensorflow.lite", "tensorflow"),
)


def available() -> bool:
    return any(_has(top) for top, _, _ in _SOURCES)


# ai-edge-litert numbers its releases from 1.0, the first built from TensorFlow 2.18's TFLite;
# tflite-runtime and tensorflow use TensorFlow's numbers, which bundles' runtime.min_version uses.
_LITERT_LINEAGE = "2.18"


def version() -> str:
    """The TFLite runtime version in TensorFlow's numbering (what ``runtime.min_version`` of a
    bundle compares with); ai-edge-litert's own version follows as ``2.18+ai-edge-litert-X``."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _v

    for top, _, dist in _SOURCES:
        if not _has(top):
            continue
        for d in (dist, f"{dist}-cpu" if dist == "tensorflow" else dist):
            try:
                v = _v(d)
            except PackageNotFoundError:
                continue
            return f"{_LITERT_LINEAGE}+{dist}-{v}" if dist == "ai-edge-litert" else v
    return "unknown"


def interpreter_class() -> tuple[type, str]:
    """``(Interpreter, module name)`` from the first LiteRT provider that imports."""
    errors = []
    for top, module, _ in _SOURCES:
        if not _has(top):
            continue
        try:
            if module == "tensorflow.lite":
                import tensorflow as tf

                return tf.lite.Interpreter, module
            mod = __import__(module, fromlist=["Interpreter"])
            return mod.Interpreter, module
        except Exception as exc:  # a broken install (e.g. tflite_runtime built for numpy 1.x)
            errors.append(f"{module}: {exc}")
    raise InstallError("no LiteRT interpreter could be imported (" + "; ".join(errors or [
        "none installed"]) + "). Install it with 'pip install ai-edge-litert'.")


def preload() -> None:
    """Import the interpreter now (memory measured afterwards is the model's)."""
    interpreter_class()


def _spec(d: dict) -> TensorSpec:
    scale, zp = d.get("quantization", (0.0, 0))
    return TensorSpec(name=d["name"], dtype=np.dtype(d["dtype"]).name,
                      shape=tuple(int(s) for s in d["shape"]), scale=float(scale),
                      zero_point=int(zp))


class TfliteSession:
    """A LiteRT interpreter with the agent's interface."""

    runtime = NAME

    def __init__(self, path: Path, threads: int) -> None:
        cls, self.module = interpreter_class()
        try:
            self._interp = cls(model_path=str(path), num_threads=threads)
            self._interp.allocate_tensors()
        except Exception as exc:  # the interpreter raises ValueError/RuntimeError freely
            raise InstallError(f"LiteRT cannot load {path.name}: {exc}") from None
        self._in = self._interp.get_input_details()
        self._out = self._interp.get_output_details()
        self.inputs = [_spec(d) for d in self._in]
        self.outputs = [_spec(d) for d in self._out]
        self._shapes = {d["name"]: tuple(d["shape"]) for d in self._in}

    def run(self, feeds: dict[str, Any]) -> list[Any]:
        interp = self._interp
        xs = []
        resized = False
        for d in self._in:
            x = np.asarray(feeds[d["name"]], dtype=d["dtype"])
            if x.shape != self._shapes[d["name"]]:
                interp.resize_tensor_input(d["index"], x.shape)
                self._shapes[d["name"]] = x.shape
                resized = True
            xs.append(x)
        if resized:
            interp.allocate_tensors()
        for d, x in zip(self._in, xs, strict=True):
            interp.set_tensor(d["index"], x)
        interp.invoke()
        return [interp.get_tensor(d["index"]) for d in self._out]


def load(path: Path, threads: int = 1, providers: tuple[str, ...] = ()) -> TfliteSession:
    """Open a ``.tflite`` model (``providers`` is accepted for symmetry; delegates are not used)."""
    return TfliteSession(Path(path), threads)
