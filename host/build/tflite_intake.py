"""TFLite intake: what a ``.tflite`` file really is, and whether TFLite Micro and LiteRT run it.

::

    inspect_tflite(path)              → TfliteInfo   read from the flatbuffer, no interpreter
    check_with_tflm(path, inputs)     → TflmCheck    TFLite Micro's host interpreter, arena bisected
    check_with_litert(path, inputs)   → LitertCheck  LiteRT's interpreter; a refusal is a reason

``inspect_tflite`` reads the flatbuffer with the TFLite schema (``ai_edge_litert``'s, else
TensorFlow's or TFLite Micro's copy), so a model an interpreter refuses is still described: tensor
dtypes, shapes and quantization parameters, which dtypes the weights are stored in, the
quantization kind and the file's true size.

``quantized`` is the integer scheme of the activations inside the graph (graph inputs and outputs
may be float, uint8 or int16 around QUANTIZE/DEQUANTIZE): ``"int8"`` (int8 activations and
weights), ``"16x8"`` (int16 activations, int8 weights), ``"uint8"`` (the old asymmetric scheme), or
``None``; a float graph with int8 weights (dynamic-range quantization) has ``quantized=None`` and
``weights_quantized=True``. A quantized model is packaged as it is: it needs no calibration.

The interpreters' C++ logs are captured into the results (``log``), never printed.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from edgepack.agent.errors import ModelError

__all__ = ["captured_output", "TensorInfo", "TfliteInfo", "TflmCheck", "LitertCheck",
           "TflmSession", "inspect_tflite", "check_with_tflm", "check_with_litert",
           "quantize_input", "dequantize_output", "signature_names", "tflm_available",
           "zero_inputs", "TFLM_MAX_ARENA"]

TFLM_MAX_ARENA = 64 << 20  # the largest arena the bisection tries (64 MiB)
_MEMORY = re.compile(r"allocate|resize buffer|missing:|too many buffers|arena", re.I)
_ALIGN = 16  # TFLM aligns arena buffers to 16 bytes: no point bisecting finer

_NUMPY = {"FLOAT32": "float32", "FLOAT16": "float16", "FLOAT64": "float64", "INT8": "int8",
          "UINT8": "uint8", "INT16": "int16", "UINT16": "uint16", "INT32": "int32",
          "UINT32": "uint32", "INT64": "int64", "UINT64": "uint64", "BOOL": "bool",
          "INT4": "int4", "STRING": "object", "COMPLEX64": "complex64"}


@dataclass(frozen=True)
class TensorInfo:
    """A graph input or output as the flatbuffer declares it."""

    name: str
    dtype: str  # numpy name: "float32", "int8", …
    shape: tuple[int, ...]  # -1 where the signature leaves a dimension open
    scale: tuple[float, ...] = ()  # empty when not quantized
    zero_point: tuple[int, ...] = ()
    quantized_dimension: int = 0

    @property
    def quantized(self) -> bool:
        return bool(self.scale)

    @property
    def fixed_shape(self) -> tuple[int, ...]:
        """The shape with open dimensions (-1) at 1: what one sample looks like."""
        return tuple(1 if d < 0 else d for d in self.shape)


@dataclass(frozen=True)
class TfliteInfo:
    """What a ``.tflite`` file holds."""

    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    weight_bytes: Mapping[str, int]  # dtype → bytes of constant tensors stored in it
    activation_dtypes: tuple[str, ...]  # dtypes of the non-constant tensors inside the graph
    quantized: str | None  # "int8" | "uint8" | "16x8" | None
    weights_quantized: bool  # int8/uint8 weights (also true for dynamic-range models)
    size_bytes: int  # the file's true size
    ops: tuple[str, ...]  # builtin op names ("CONV_2D", …), custom ops as "CUSTOM:name"
    subgraphs: int = 1
    description: str = ""

    @property
    def dtype(self) -> str:
        """One word for reports: the quantization kind, else the commonest weight dtype."""
        if self.quantized:
            return self.quantized
        if self.weights_quantized:
            return "dynamic-int8"
        return max(self.weight_bytes, key=self.weight_bytes.get) if self.weight_bytes else "float32"


@dataclass(frozen=True)
class TflmCheck:
    """The model run in TFLite Micro's host interpreter."""

    ok: bool
    outputs: tuple[np.ndarray, ...] = ()
    arena_bytes: int = 0  # the smallest arena (16-byte steps) that allocates and invokes
    reason: str = ""  # why TFLM refused the model, when ok is False
    log: tuple[str, ...] = ()  # TFLM's own messages, captured


@dataclass(frozen=True)
class LitertCheck:
    """The model run in LiteRT's interpreter."""

    ok: bool
    outputs: tuple[np.ndarray, ...] = ()
    reason: str = ""
    log: tuple[str, ...] = ()


def _schema() -> Any:
    with contextlib.suppress(ImportError):
        from ai_edge_litert import schema_py_generated

        return schema_py_generated
    with contextlib.suppress(ImportError):
        from tensorflow.lite.python import schema_py_generated

        return schema_py_generated
    try:
        from tflite_micro.tensorflow.lite.micro.python import schema_py_generated
    except ImportError:
        raise ModelError("reading a .tflite needs the TFLite schema: install ai-edge-litert "
                         "(pip install 'edgepack[host]')") from None
    return schema_py_generated


def _enum_names(enum: type) -> dict[int, str]:
    return {v: k for k, v in vars(enum).items() if not k.startswith("_") and isinstance(v, int)}


def _read(path: str | Path | bytes) -> bytes:
    if isinstance(path, (bytes, bytearray)):
        return bytes(path)
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"TFLite model {path} does not exist", field="model")
    return path.read_bytes()


def _model(data: bytes, name: str) -> Any:
    s = _schema()
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ModelError(f"{name} is not a TFLite flatbuffer (no TFL3 identifier)",
                         field="model")
    try:
        return s.ModelT.InitFromObj(s.Model.GetRootAsModel(data, 0))
    except Exception as e:  # noqa: BLE001 - flatbuffers raises struct/index errors on bad data
        raise ModelError(f"{name} is a damaged TFLite flatbuffer ({e})", field="model") from None


def _name(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw or "")


def _tensor_info(t: Any, types: dict[int, str]) -> TensorInfo:
    q = t.quantization
    scale = tuple(float(v) for v in (q.scale if q is not None and q.scale is not None else ()))
    zp = tuple(int(v) for v in (q.zeroPoint if q is not None and q.zeroPoint is not None
                                else ()))
    sig = t.shapeSignature if t.shapeSignature is not None and len(t.shapeSignature) else t.shape
    kind = types.get(t.type, str(t.type))
    return TensorInfo(_name(t.name), _NUMPY.get(kind, kind.lower()),
                      tuple(int(d) for d in (sig if sig is not None else ())),
                      scale, zp, int(q.quantizedDimension) if q is not None and scale else 0)


def _buffer_bytes(buf: Any) -> int:
    if buf is None:
        return 0
    if buf.data is not None and len(buf.data):
        return len(buf.data)
    return int(buf.size or 0) if (buf.offset or 0) > 1 else 0  # data stored after the flatbuffer


def _kind(acts: Counter, weights: Counter) -> tuple[str | None, bool]:
    weights_quantized = weights["int8"] + weights["uint8"] + weights["int4"] > 0
    if acts["int16"] and weights["int8"] and not acts["int8"]:
        return "16x8", weights_quantized
    if acts["int8"] and acts["int8"] >= acts["float32"]:
        return "int8", weights_quantized
    if acts["uint8"] and acts["uint8"] >= acts["float32"]:
        return "uint8", weights_quantized
    return None, weights_quantized


def _label(path: str | Path | bytes, name: str | None) -> str:
    return name or ("the TFLite model" if isinstance(path, (bytes, bytearray)) else Path(path).name)


def inspect_tflite(path: str | Path | bytes, *, name: str | None = None) -> TfliteInfo:
    """Describe a ``.tflite`` file (or its bytes) from its flatbuffer alone (no interpreter)."""
    s = _schema()
    data = _read(path)
    label = _label(path, name)
    model = _model(data, label)
    types = _enum_names(s.TensorType)
    ops_by_code = _enum_names(s.BuiltinOperator)
    if not model.subgraphs:
        raise ModelError(f"{label} has no subgraph to run", field="model")
    codes = []
    for c in model.operatorCodes or []:
        code = max(int(c.builtinCode), int(c.deprecatedBuiltinCode))
        name = ops_by_code.get(code, str(code))
        codes.append(f"CUSTOM:{_name(c.customCode)}" if name == "CUSTOM" else name)
    weights: Counter = Counter()
    acts: Counter = Counter()
    used_ops: list[str] = []
    for sub in model.subgraphs:
        io = set(sub.inputs if sub.inputs is not None else ()) | set(
            sub.outputs if sub.outputs is not None else ())
        for i, t in enumerate(sub.tensors or []):
            dtype = _NUMPY.get(types.get(t.type, ""), str(t.type))
            size = _buffer_bytes(model.buffers[t.buffer]) if model.buffers else 0
            if size:
                weights[dtype] += size
            elif i not in io and not t.isVariable:
                acts[dtype] += 1
        for op in sub.operators or []:
            name = codes[op.opcodeIndex] if op.opcodeIndex < len(codes) else "?"
            if name not in used_ops:
                used_ops.append(name)
    main = model.subgraphs[0]
    quantized, weights_quantized = _kind(acts, weights)
    return TfliteInfo(
        inputs=tuple(_tensor_info(main.tensors[i], types) for i in main.inputs),
        outputs=tuple(_tensor_info(main.tensors[i], types) for i in main.outputs),
        weight_bytes=MappingProxyType(dict(weights.most_common())),
        activation_dtypes=tuple(sorted(acts)),
        quantized=quantized, weights_quantized=weights_quantized, size_bytes=len(data),
        ops=tuple(used_ops), subgraphs=len(model.subgraphs),
        description=_name(model.description))


def quantize_input(x: np.ndarray, info: TensorInfo) -> np.ndarray:
    """``x`` in the tensor's dtype: float values are quantized with its scale and zero point."""
    x = np.asarray(x)
    dtype = np.dtype(info.dtype)
    if info.quantized and np.issubdtype(x.dtype, np.floating) and np.issubdtype(dtype,
                                                                                 np.integer):
        lim = np.iinfo(dtype)
        q = np.round(x / info.scale[0]) + info.zero_point[0]
        return np.clip(q, lim.min, lim.max).astype(dtype)
    return x.astype(dtype, copy=False)


def dequantize_output(y: np.ndarray, info: TensorInfo) -> np.ndarray:
    """Float values of an output tensor (unchanged when it is not quantized)."""
    if not info.quantized or not np.issubdtype(np.asarray(y).dtype, np.integer):
        return np.asarray(y)
    return (np.asarray(y, np.float32) - info.zero_point[0]) * np.float32(info.scale[0])


def _ordered(inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray],
             infos: tuple[TensorInfo, ...]) -> list[np.ndarray]:
    if isinstance(inputs, Mapping):
        missing = [i.name for i in infos if i.name not in inputs]
        if missing and len(inputs) == len(infos):  # names differ (signature vs tensor names)
            values = list(inputs.values())
        elif missing:
            from edgepack.agent.errors import DataError

            raise DataError(f"inputs lack {missing}: pass `inputs=` keyed by the model's input "
                            f"names {[i.name for i in infos]}", field="inputs")
        else:
            values = [inputs[i.name] for i in infos]
    else:
        values = list(inputs)
    return [quantize_input(v, info) for v, info in zip(values, infos, strict=False)]


@contextlib.contextmanager
def captured_output() -> Iterator[list[str]]:
    """Route the process's stdout/stderr (C++ logs) into a list of lines while inside."""
    lines: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = [os.dup(1), os.dup(2)]
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            lines.extend(ln for ln in sink.read().decode(errors="replace").splitlines()
                         if ln.strip())


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def tflm_available() -> bool:
    """Whether TFLite Micro's Python interpreter (``tflite-micro``) is installed."""
    try:
        from tflite_micro.python.tflite_micro import runtime  # noqa: F401
    except ImportError:
        return False
    return True


def zero_inputs(info: TfliteInfo) -> list[np.ndarray]:
    """One all-zero sample per input, in the inputs' own dtypes (a smoke run's feed)."""
    return [np.zeros(t.fixed_shape, t.dtype) for t in info.inputs]


def check_with_tflm(path: str | Path, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray],
                    *, max_arena: int = TFLM_MAX_ARENA) -> TflmCheck:
    """Run the model in TFLite Micro and find the smallest arena it runs in.

    ``inputs`` are keyed by input name (or in input order); float values for quantized inputs
    are quantized with the tensor's parameters. A model TFLM cannot run gives ``ok=False`` and
    the reason, never an exception.
    """
    if not tflm_available():
        return TflmCheck(False, reason="TFLite Micro is not installed (pip install tflite-micro)")
    data = _read(path)
    info = inspect_tflite(path)
    feeds = _ordered(inputs, info.inputs)
    good, reason, log, outputs = _search_in_children(data, feeds, len(info.outputs), max_arena)
    if not good:
        # TFLM says "failed to allocate" for any Prepare failure; its log says which op and why.
        why = [ln.strip() for ln in dict.fromkeys(log) if not _MEMORY.search(ln)][:2]
        detail = "; ".join(why) if why else f"{reason} (tried arenas up to {max_arena} bytes)"
        return TflmCheck(False, reason=f"TFLite Micro cannot run it: {detail}",
                         log=tuple(log[:20]))
    return TflmCheck(True, outputs=outputs, arena_bytes=good, log=tuple(log[:20]))


def _search_in_children(data: bytes, feeds: list[np.ndarray], n_out: int, max_arena: int,
                        ) -> tuple[int, str, list[str], tuple]:
    """The arena search of :mod:`edgepack.host.build.tflm_probe`, in child processes: a size at
    which TFLM crashed the child counts as too small, and a new child goes on from there."""
    import json
    import subprocess
    import sys

    good, bad, reason, log = 0, 0, "", []
    with tempfile.TemporaryDirectory(prefix="edgepack-tflm-") as tmp:
        d = Path(tmp)
        (d / "model.tflite").write_bytes(data)
        np.savez(d / "feeds.npz", *feeds)
        for _ in range(64):  # each crash narrows the search: this bound is never reached
            (d / "state.json").write_text(json.dumps({"good": good, "bad": bad,
                                                      "max_arena": max_arena, "n_out": n_out}))
            run = subprocess.run([sys.executable, "-I", "-m", "edgepack.host.build.tflm_probe",
                                  str(d)], capture_output=True, timeout=600, check=False)
            trying = None
            for line in (d / "progress").read_text().splitlines() if (d / "progress").exists() \
                    else []:
                verb, _, rest = line.partition(" ")
                size, _, why = rest.partition(" ")
                if verb == "try":
                    trying = int(size)
                elif verb == "ok":
                    good, trying = int(size), None
                elif verb == "bad":
                    bad, reason, trying = max(bad, int(size)), why, None
            (d / "progress").unlink(missing_ok=True)
            if (d / "done").exists():
                log = (d / "log").read_text().splitlines() if (d / "log").exists() else []
                if good and (d / "outputs.npz").exists():
                    with np.load(d / "outputs.npz") as z:
                        return good, reason, log, tuple(z[f"arr_{i}"] for i in range(n_out))
                return 0, reason, log, ()
            if trying is None:  # died outside a probe: report it rather than loop
                tail = run.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
                return 0, f"the TFLite Micro check failed: {tail[0][:300]}", log, ()
            bad = max(bad, trying)
            reason = f"TFLite Micro crashed allocating {trying} bytes"
            if good and good - bad <= _ALIGN:  # the search is over: outputs at ``good``
                bad = good - _ALIGN
    return 0, reason, log, ()


def check_with_litert(path: str | Path, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray],
                      ) -> LitertCheck:
    """Run the model in LiteRT; a model LiteRT refuses gives ``ok=False`` and the reason."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tensorflow.lite.python.interpreter import Interpreter
        except ImportError:
            return LitertCheck(False, reason="LiteRT is not installed (pip install "
                                             "ai-edge-litert)")
    data = _read(path)
    info = inspect_tflite(path)
    feeds = _ordered(inputs, info.inputs)
    with captured_output() as log:
        try:
            it = Interpreter(model_content=data)
            details = it.get_input_details()
            for d, x in zip(details, feeds, strict=False):
                if tuple(d["shape"]) != x.shape:
                    it.resize_tensor_input(d["index"], x.shape)
            it.allocate_tensors()
            for d, x in zip(details, feeds, strict=False):
                it.set_tensor(d["index"], x)
            it.invoke()
            outputs = tuple(np.array(it.get_tensor(d["index"]))
                            for d in it.get_output_details())
        except Exception as e:  # noqa: BLE001 - LiteRT raises RuntimeError/ValueError/…
            reason = _first_line(e)
    if "outputs" not in locals():
        detail = next((ln for ln in log if "failed" in ln.lower() or "error" in ln.lower()), "")
        why = f"{reason}" + (f" — {detail.strip()[:300]}" if detail and detail not in reason
                             else "")
        return LitertCheck(False, reason=f"LiteRT refuses it: {why}", log=tuple(log[:20]))
    return LitertCheck(True, outputs=outputs, log=tuple(log[:20]))


def signature_names(model: str | Path | bytes) -> tuple[dict[str, str], dict[str, str]]:
    """``(inputs, outputs)``: tensor name → signature name, from the first signature (empty
    when the model has none)."""
    m = _model(_read(model), "the TFLite model")
    if not m.signatureDefs or not m.subgraphs:
        return {}, {}
    sig, tensors = m.signatureDefs[0], m.subgraphs[0].tensors
    return tuple({_name(tensors[t.tensorIndex].name): _name(t.name) for t in (ios or [])}
                 for ios in (sig.inputs, sig.outputs))  # type: ignore[return-value]


class TflmSession:
    """A model in TFLite Micro's host interpreter, with the gate's session interface (that of
    ``convert_tflite.LiteRTSession``): ``run`` takes and returns float values (quantized I/O is
    quantized and dequantized with the tensors' parameters), ``run_raw`` the model's own dtypes.
    TFLM does not resize inputs: a batch is run one row at a time.
    """

    def __init__(self, model_bytes: bytes, arena_bytes: int, *, name: str | None = None) -> None:
        from tflite_micro.python.tflite_micro import runtime

        self.info = inspect_tflite(model_bytes, name=name)
        with captured_output():
            self._it = runtime.Interpreter.from_bytes(bytes(model_bytes),
                                                      arena_size=arena_bytes)
        self.input_names = [t.name for t in self.info.inputs]
        self.output_names = [t.name for t in self.info.outputs]
        self.signature_inputs, self.signature_outputs = signature_names(model_bytes)

    def _infos(self, which: str) -> tuple[TensorInfo, ...]:
        return self.info.inputs if which == "inputs" else self.info.outputs

    def tensor_specs(self, which: str = "inputs", *, raw: bool = False,
                     by_signature: bool = False) -> tuple[Any, ...]:
        """Specs of the inputs/outputs (batch 1); float dtypes for quantized I/O unless ``raw``."""
        from edgepack.host.build.data import TensorSpec

        names = self.signature_inputs if which == "inputs" else self.signature_outputs
        return tuple(TensorSpec(names.get(t.name, t.name) if by_signature else t.name,
                                "float32" if t.quantized and not raw else t.dtype,
                                t.fixed_shape)
                     for t in self._infos(which))

    def quantization(self, which: str = "inputs") -> list[dict | None]:
        return [{"scale": t.scale[0], "zero_point": t.zero_point[0]} if t.quantized else None
                for t in self._infos(which)]

    def quantize_inputs(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Float feed (tensor or signature names) → the model's input dtypes, by tensor name."""
        out = {}
        for t in self.info.inputs:
            key = t.name if t.name in feed else self.signature_inputs.get(t.name)
            if key not in feed:
                from edgepack.agent.errors import DataError

                raise DataError(f"no data for model input {t.name!r} (have {', '.join(feed)})",
                                field="eval")
            out[t.name] = quantize_input(feed[key], t)
        return out

    def run_raw(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        rows = len(next(iter(feed.values()))) if feed else 1
        outs: list[list[np.ndarray]] = [[] for _ in self.info.outputs]
        for r in range(rows):
            for i, t in enumerate(self.info.inputs):
                self._it.set_input(np.ascontiguousarray(feed[t.name][r:r + 1]), i)
            self._it.invoke()
            for j in range(len(outs)):
                outs[j].append(np.array(self._it.get_output(j)))
        return [np.concatenate(o) for o in outs]

    def run(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        raw = self.run_raw(self.quantize_inputs(feed))
        return [dequantize_output(y, t).astype(np.float32, copy=False)
                if t.quantized else y for y, t in zip(raw, self.info.outputs, strict=True)]
