"""onnxruntime behind the agent's runtime interface."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgepack.agent.errors import InstallError
from edgepack.agent.runtimes import TensorSpec, _has

__all__ = ["NAME", "FORMATS", "available", "version", "preload", "load", "session_options",
           "OnnxSession"]

NAME = "onnxruntime"
FORMATS = ("onnx",)

_DTYPES = {
    "tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16",
    "tensor(uint16)": "uint16", "tensor(int32)": "int32", "tensor(uint32)": "uint32",
    "tensor(int64)": "int64", "tensor(uint64)": "uint64", "tensor(bool)": "bool",
    "tensor(string)": "string",
}


def available() -> bool:
    return _has("onnxruntime")


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _v

    for dist in ("onnxruntime", "onnxruntime-gpu", "onnxruntime-silicon"):
        try:
            return _v(dist)
        except PackageNotFoundError:
            continue
    import onnxruntime

    return onnxruntime.__version__


def preload() -> None:
    """Import onnxruntime now (so memory measured afterwards is the model's, not the library's)."""
    import onnxruntime  # noqa: F401


def _dtype(ort_type: str) -> str:
    if ort_type in _DTYPES:
        return _DTYPES[ort_type]
    if ort_type.startswith("seq("):
        return "sequence"
    if ort_type.startswith("map("):
        return "map"
    return ort_type


def _spec(arg: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else (d or None) for d in (arg.shape or ()))
    return TensorSpec(name=arg.name, dtype=_dtype(arg.type), shape=shape)


def session_options(threads: int) -> Any:
    """The agent's ``SessionOptions``: ``threads`` intra-op, sequential, all optimizations."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return opts


class OnnxSession:
    """An ``onnxruntime.InferenceSession`` with the agent's interface."""

    runtime = NAME

    def __init__(self, path: Path, threads: int, providers: tuple[str, ...]) -> None:
        import onnxruntime as ort

        opts = session_options(threads)
        have = set(ort.get_available_providers())
        chosen = [p for p in providers if p in have] or ["CPUExecutionProvider"]
        try:
            self._sess = ort.InferenceSession(str(path), sess_options=opts, providers=chosen)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise InstallError(f"onnxruntime cannot load {path.name}: {exc}") from None
        self.providers = tuple(self._sess.get_providers())
        self.inputs = [_spec(a) for a in self._sess.get_inputs()]
        self.outputs = [_spec(a) for a in self._sess.get_outputs()]
        self._out_names = [o.name for o in self.outputs]

    def run(self, feeds: dict[str, Any]) -> list[Any]:
        return self._sess.run(self._out_names, feeds)


def load(path: Path, threads: int = 1, providers: tuple[str, ...] = ()) -> OnnxSession:
    """Open an ONNX model."""
    return OnnxSession(Path(path), threads, providers)
