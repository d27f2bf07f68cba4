"""SavedModel → TFLite (int8 / dynamic / fp16 / float), the LiteRT session the gate runs, op checks.

::

    to_tflite(saved_model_dir, mode, calib=, io_type=, integer_only=)  → TFLiteResult
    LiteRTSession(model_bytes, threads)   .run(feed) → float outputs (I/O (de)quantized)
    tflite_ops / non_int8_ops                                what a .tflite holds, per layer
    quantize_keeping_float(float_bytes, calib, layers)      selective int8 (ai-edge-quantizer)
    quantize_tflite(float_bytes, mode, calib=)              a float .tflite to int8 / dynamic
    rank_sensitive_layers(float_bytes, int8_bytes, data)    which layers hurt int8 most
    onnx_to_saved_model(path, workdir)                      through onnx2tf, when installed

The batch dimension is fixed (1 by default) when converting: TFLM and the Edge TPU need static
shapes, and a fixed shape lets LiteRT plan memory once.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.agent.errors import DataError, GateError, ModelError
from edgepack.host.build.data import Dataset, TensorSpec
from edgepack.host.build.tflite_intake import _enum_names, _schema  # one copy of the schema lookup

__all__ = [
    "MODES",
    "LayerOp",
    "TFLiteResult",
    "LiteRTSession",
    "to_tflite",
    "tflite_ops",
    "layer_ops",
    "non_int8_ops",
    "quantize_keeping_float",
    "quantize_tflite",
    "rank_sensitive_layers",
    "onnx_to_saved_model",
    "read_model",
]

MODES = ("int8", "dynamic", "fp16", "none")
IO_TYPES = ("float32", "int8", "uint8")

_FLOAT_TYPES = {"FLOAT32", "FLOAT16", "FLOAT64", "BFLOAT16"}


@dataclass(frozen=True)
class TFLiteResult:
    """A converted model and what the conversion did."""

    model_bytes: bytes
    mode: str  # int8 | dynamic | fp16 | none: what was applied
    notes: tuple[str, ...] = ()
    io_type: str = "float32"
    float_layers: tuple[str, ...] = ()  # layers deliberately kept in float (selective int8)
    tool: str = "tf.lite.TFLiteConverter"

    @property
    def bytes(self) -> bytes:  # noqa: A003 - the name the pipeline's callers use
        return self.model_bytes


@dataclass(frozen=True)
class LayerOp:
    """One operator of a .tflite graph, named for the user by the layer it came from."""

    index: int
    op: str
    layer: str
    float_io: bool = False


# ---------------------------------------------------------------------------------------------
# flatbuffer access


def read_model(model_bytes: bytes) -> Any:
    """The model as the schema's object API (``ModelT``); ModelError if it is not a .tflite."""
    s = _schema()
    if len(model_bytes) < 8 or model_bytes[4:8] != b"TFL3":
        raise ModelError("not a TFLite flatbuffer (no 'TFL3' identifier)")
    try:
        return s.ModelT.InitFromPackedBuf(bytearray(model_bytes), 0)
    except Exception as exc:  # a truncated buffer raises anything from struct to IndexError
        raise ModelError(f"cannot parse the TFLite flatbuffer: {exc}") from None


def op_name(model: Any, op: Any) -> str:
    s = _schema()
    code = model.operatorCodes[op.opcodeIndex]
    num = max(code.builtinCode, code.deprecatedBuiltinCode)
    name = _enum_names(s.BuiltinOperator).get(num, f"OP_{num}")
    if name == "CUSTOM":
        custom = code.customCode.decode() if isinstance(code.customCode, bytes) else code.customCode
        return f"CUSTOM:{custom}"
    return name


def tensor_name(t: Any) -> str:
    return t.name.decode(errors="replace") if isinstance(t.name, bytes) else str(t.name)


def _layer(model: Any, sg: Any, op: Any) -> str:
    """A readable layer name: the converter names tensors by the TF ops fused into them."""
    def clean(name: str) -> str:
        first = name.split(";")[0]
        parts = first.split("/")
        return "/".join(parts[:-1]) if len(parts) > 1 else first

    for i in op.outputs:
        if i >= 0:
            name = tensor_name(sg.tensors[i])
            if not name.startswith(("StatefulPartitionedCall", "Identity")):
                return clean(name)
    for i in op.inputs:  # a graph output: name it by its weights instead
        if i >= 0 and sg.tensors[i].buffer and has_data(model, sg.tensors[i]):
            return clean(tensor_name(sg.tensors[i]))
    return clean(tensor_name(sg.tensors[op.outputs[0]])) if len(op.outputs) else "?"


def has_data(model: Any, t: Any) -> bool:
    b = model.buffers[t.buffer] if t.buffer < len(model.buffers) else None
    return b is not None and (b.data is not None and len(b.data) > 0 or bool(b.size))


def layer_ops(model_bytes: bytes) -> list[LayerOp]:
    """Every operator of the main subgraph in execution order."""
    s = _schema()
    model = read_model(model_bytes)
    types = _enum_names(s.TensorType)
    sg = model.subgraphs[0]
    out = []
    for k, op in enumerate(sg.operators or []):
        idx = [i for i in list(op.inputs if op.inputs is not None else []) +
               list(op.outputs if op.outputs is not None else []) if i >= 0]
        float_io = any(types.get(sg.tensors[i].type, "") in _FLOAT_TYPES for i in idx)
        out.append(LayerOp(k, op_name(model, op), _layer(model, sg, op), float_io))
    return out


def tflite_ops(model_bytes: bytes) -> list[tuple[str, int]]:
    """``(op name, count)`` in order of first appearance."""
    return list(Counter(o.op for o in layer_ops(model_bytes)).items())


def non_int8_ops(model_bytes: bytes) -> list[LayerOp]:
    """Operators with a float input or output: what an integer-only device cannot run."""
    return [o for o in layer_ops(model_bytes) if o.float_io]


# ---------------------------------------------------------------------------------------------
# LiteRT session for the gate


def _interpreter_class() -> type:
    from edgepack.agent.runtimes.tflite import interpreter_class

    return interpreter_class()[0]


class LiteRTSession:
    """A LiteRT interpreter with the gate's session interface: ``.run(feed)`` → ``list`` of arrays.

    Feeds are keyed by tensor name or by signature input name, and are float values: for int8 /
    uint8 model I/O they are quantized with the tensor's scale and zero point, and outputs are
    dequantized, so the gate compares float values whatever the I/O type. ``run_raw`` feeds and
    returns the model's own dtypes (what a device sees).
    """

    def __init__(self, model_bytes: bytes, threads: int = 1) -> None:
        cls = _interpreter_class()
        try:
            self._it = cls(model_content=bytes(model_bytes), num_threads=max(1, threads))
            self._it.allocate_tensors()
        except Exception as exc:  # the interpreter raises ValueError/RuntimeError freely
            raise ModelError(f"LiteRT cannot load the model: {str(exc)[:300]}") from None
        self._in = self._it.get_input_details()
        self._out = self._it.get_output_details()
        self.input_names = [d["name"] for d in self._in]
        self.output_names = [d["name"] for d in self._out]
        self._alias: dict[str, str] = {}
        self.signature_inputs: dict[str, str] = {}  # tensor name → signature name
        self.signature_outputs: dict[str, str] = {}
        with contextlib.suppress(Exception):
            sigs = self._it.get_signature_list()
            if sigs:
                runner = self._it.get_signature_runner(next(iter(sigs)))
                by_index = {d["index"]: d["name"] for d in self._in}
                for sig_name, d in runner.get_input_details().items():
                    if d["index"] in by_index:
                        self._alias[sig_name] = by_index[d["index"]]
                        self.signature_inputs[by_index[d["index"]]] = sig_name
                out_by_index = {d["index"]: d["name"] for d in self._out}
                for sig_name, d in runner.get_output_details().items():
                    if d["index"] in out_by_index:
                        self.signature_outputs[out_by_index[d["index"]]] = sig_name
        self._shapes = {d["name"]: tuple(int(x) for x in d["shape"]) for d in self._in}

    @staticmethod
    def _q(d: dict) -> tuple[float, int]:
        scale, zp = d.get("quantization", (0.0, 0))
        return float(scale), int(zp)

    def tensor_specs(self, which: str = "inputs", *, raw: bool = False,
                     by_signature: bool = False) -> tuple[TensorSpec, ...]:
        """Specs of the inputs/outputs; float dtypes for quantized I/O unless ``raw``."""
        details = self._in if which == "inputs" else self._out
        names = self.signature_inputs if which == "inputs" else self.signature_outputs
        out = []
        for d in details:
            dt = np.dtype(d["dtype"])
            if not raw and dt.kind in "iu" and self._q(d)[0]:
                dt = np.dtype(np.float32)
            name = names.get(d["name"], d["name"]) if by_signature else d["name"]
            out.append(TensorSpec(name, dt.name, tuple(int(x) for x in d["shape"])))
        return tuple(out)

    def quantization(self, which: str = "inputs") -> list[dict | None]:
        """``{scale, zero_point}`` per tensor for quantized I/O, else None."""
        details = self._in if which == "inputs" else self._out
        res = []
        for d in details:
            scale, zp = self._q(d)
            res.append({"scale": scale, "zero_point": zp}
                       if scale and np.dtype(d["dtype"]).kind in "iu" else None)
        return res

    def quantize_inputs(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Float feed → the model's input dtypes (tensor names as keys)."""
        out = {}
        for d in self._in:
            name = d["name"]
            key = name if name in feed else next(
                (a for a, t in self._alias.items() if t == name and a in feed), None)
            if key is None:
                raise DataError(f"no data for model input {name!r} (have {', '.join(feed)})")
            x = np.asarray(feed[key])
            dt = np.dtype(d["dtype"])
            scale, zp = self._q(d)
            if dt.kind in "iu" and scale and x.dtype.kind == "f":
                info = np.iinfo(dt)
                x = np.clip(np.round(x / scale) + zp, info.min, info.max)
            out[name] = x.astype(dt)
        return out

    def run_raw(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        it = self._it
        resized = False
        for d in self._in:
            x = feed[d["name"]]
            if tuple(x.shape) != self._shapes[d["name"]]:
                it.resize_tensor_input(d["index"], x.shape)
                self._shapes[d["name"]] = tuple(x.shape)
                resized = True
        if resized:
            it.allocate_tensors()
        for d in self._in:
            it.set_tensor(d["index"], feed[d["name"]])
        it.invoke()
        return [it.get_tensor(d["index"]).copy() for d in self._out]

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        outs = self.run_raw(self.quantize_inputs(feed))
        res = []
        for d, y in zip(self._out, outs, strict=True):
            scale, zp = self._q(d)
            if y.dtype.kind in "iu" and scale:
                y = ((y.astype(np.float32) - zp) * scale).astype(np.float32)
            res.append(y)
        return res


# ---------------------------------------------------------------------------------------------
# conversion


def _quiet_tf() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    return tf


def _load_signature(saved_model_dir: str | Path) -> tuple[Any, Any, list[str], dict]:
    tf = _quiet_tf()
    try:
        loaded = tf.saved_model.load(str(saved_model_dir))
    except Exception as exc:
        raise ModelError(f"cannot load the SavedModel at {saved_model_dir}: "
                         f"{str(exc)[:300]}") from None
    sigs = dict(getattr(loaded, "signatures", {}) or {})
    if not sigs:
        raise ModelError(f"the SavedModel at {saved_model_dir} has no signatures; export it "
                         "with model.export(dir, format='tf_saved_model')")
    sig = sigs.get("serving_default") or next(iter(sigs.values()))
    _, kw = sig.structured_input_signature
    return loaded, sig, list(kw), kw


def _converter(saved_model_dir: str | Path, batch: int) -> tuple[Any, list[str]]:
    """A converter over the serving signature with the batch dimension fixed."""
    tf = _quiet_tf()
    loaded, sig, names, kw = _load_signature(saved_model_dir)
    specs = []
    for n in names:
        shape = list(kw[n].shape)
        if shape and shape[0] is None:
            shape[0] = batch
        if any(d is None for d in shape):
            raise ModelError(f"input {n!r} has dynamic dimensions {kw[n].shape} besides the "
                             "batch; export the model with a fixed input shape for TFLite")
        specs.append(tf.TensorSpec(shape, kw[n].dtype, name=n))

    @tf.function
    def serve(*args: Any) -> Any:
        return sig(**dict(zip(names, args, strict=True)))

    concrete = serve.get_concrete_function(*specs)
    return tf.lite.TFLiteConverter.from_concrete_functions([concrete], loaded), names


def _representative(calib: Dataset, names: list[str], batch: int) -> Any:
    def gen() -> Any:
        for feed in calib.batches(batch):
            yield [feed[n].astype(np.float32) if feed[n].dtype.kind == "f" else feed[n]
                   for n in names]
    return gen


def _convert(conv: Any) -> tuple[bytes | None, str]:
    """Run the converter with its C++ logging captured; ``(bytes, "")`` or ``(None, error)``."""
    try:
        return bytes(conv.convert()), ""
    except Exception as exc:  # ConverterError carries the MLIR diagnostics in its message
        return None, str(exc)


def _layers_from_error(msg: str) -> list[str]:
    ops = re.findall(r"'tf\.(\w+)' op|op: (\w+)|\btfl\.(\w+)'", msg)
    found = [next(x for x in m if x) for m in ops]
    locs = re.findall(r'loc\(\s*(?:fused\[)?"([^"]+)"', msg)
    return list(dict.fromkeys(found + locs))[:10]


def to_tflite(saved_model_dir: str | Path, mode: str, *, calib: Dataset | None = None,
              io_type: str = "float32", integer_only: bool = False,
              batch: int = 1) -> TFLiteResult:
    """Convert a SavedModel's serving signature to TFLite.

    ``int8``: full integer quantization calibrated on ``calib`` (keyed by signature input name);
    with ``integer_only`` only int8 builtins are allowed, and a model that cannot be fully
    quantized raises :class:`GateError` naming the layers that stay float. ``io_type`` sets the
    model's input/output type (int8/uint8 need full integer quantization). ``dynamic``: int8
    weights, float activations. ``fp16``: fp16 weights (dequantized at load on CPUs). ``none``:
    float32.
    """
    if mode not in MODES:
        raise ModelError(f"unknown TFLite mode {mode!r} (one of {', '.join(MODES)})")
    if io_type not in IO_TYPES:
        raise ModelError(f"unknown TFLite I/O type {io_type!r} (one of {', '.join(IO_TYPES)})")
    if mode != "int8" and (integer_only or io_type != "float32"):
        raise ModelError(f"{mode} TFLite keeps float ops and float I/O; integer-only targets and "
                         "int8/uint8 model I/O need `quantize=` int8 with `calibration=` data")
    tf = _quiet_tf()
    conv, names = _converter(saved_model_dir, batch)
    notes: list[str] = []
    if mode == "dynamic":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        notes.append("int8 weights, float activations (dynamic-range: activations are "
                     "quantized on the fly by kernels that support it)")
    elif mode == "fp16":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
        notes.append("fp16 weights; CPUs dequantize them to fp32 at load, GPU delegates run fp16")
    elif mode == "int8":
        if calib is None or len(calib) == 0:
            raise DataError("full-int8 TFLite needs calibration data (pass `calibration=`)",
                            field="calibration")
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = _representative(calib, names, batch)
        if integer_only:
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if io_type != "float32":
            conv.inference_input_type = tf.int8 if io_type == "int8" else tf.uint8
            conv.inference_output_type = conv.inference_input_type
    model, err = _convert(conv)
    if model is None and mode == "int8" and integer_only:
        # Find what stays float by converting again with float fallback allowed.
        conv2, _ = _converter(saved_model_dir, batch)
        conv2.optimizations = [tf.lite.Optimize.DEFAULT]
        conv2.representative_dataset = _representative(calib, names, batch)
        fallback, _ = _convert(conv2)
        layers = ([f"{o.layer} ({o.op})" for o in non_int8_ops(fallback)
                   if o.op not in ("QUANTIZE", "DEQUANTIZE")] if fallback else [])
        layers = layers or _layers_from_error(err)
        raise GateError(
            "the model cannot be fully int8-quantized for an integer-only target; these layers "
            f"have no int8 kernel and would stay float: {', '.join(layers) or 'unknown'}. "
            "Replace them with int8-capable layers (e.g. ReLU instead of exotic activations) or "
            f"pick a CPU target. Converter said: {err.strip().splitlines()[0][:200] if err else ''}",
            stage="convert")
    if model is None:
        raise ModelError(f"TFLite conversion ({mode}) failed: {err[:600]}", stage="convert")
    if mode == "int8" and integer_only:
        # The converter keeps some ops float (with dequantize/quantize around them) even when
        # only int8 builtins are allowed; an integer-only device cannot run those.
        left = [o for o in non_int8_ops(model) if o.op not in ("QUANTIZE", "DEQUANTIZE")]
        if left:
            raise GateError(
                "the model cannot be fully int8-quantized for an integer-only target; these "
                "layers have no int8 kernel and stay float: "
                + ", ".join(f"{o.layer} ({o.op})" for o in left[:10])
                + ". Replace them with int8-capable layers or pick a CPU target.",
                stage="convert")
    if mode == "int8":
        notes.append("full int8 (TFLite int8 spec: per-channel symmetric weights, asymmetric "
                     f"activations) calibrated on {len(calib)} samples, {io_type} model I/O")
        left = [o for o in non_int8_ops(model) if o.op not in ("QUANTIZE", "DEQUANTIZE")]
        if left:
            notes.append(f"{len(left)} op(s) have no int8 kernel and run in float: "
                         + ", ".join(f"{o.layer} ({o.op})" for o in left[:8]))
    return TFLiteResult(model, mode, tuple(notes), io_type=io_type)


# ---------------------------------------------------------------------------------------------
# selective int8 (layers kept in float) through ai-edge-quantizer


def _aeq() -> Any | None:
    try:
        from ai_edge_quantizer import quantizer  # noqa: F401
    except Exception:  # not installed, or built against another LiteRT
        return None
    import ai_edge_quantizer

    return ai_edge_quantizer


def _calib_feeds(float_bytes: bytes, data: Dataset) -> dict[str, list[dict]]:
    sess = LiteRTSession(float_bytes)
    sig = next(iter(sess._it.get_signature_list() or {"serving_default": None}))
    by_tensor = {t: s for t, s in sess.signature_inputs.items()}
    feeds = []
    for feed in data.batches(1):
        q = sess.quantize_inputs(feed)
        feeds.append({by_tensor.get(k, k): v for k, v in q.items()})
    return {sig: feeds}


def rank_sensitive_layers(float_bytes: bytes, calib: Dataset, data: Dataset
                          ) -> list[tuple[str, float]]:
    """Op outputs of the float model ordered by the SNR they lose under int8 (ai-edge-quantizer).

    The model is quantized with ai-edge-quantizer's static int8 recipe and compared tensor by
    tensor with the float model on ``data``; for each op, loss = (worst SNR among its activation
    inputs) − (SNR of its output), the per-node ranking the ONNX path uses. Empty when
    ai-edge-quantizer is not installed.
    """
    if _aeq() is None:
        return []
    from ai_edge_quantizer import quantizer, recipe
    from ai_edge_quantizer.utils.validation_utils import ValidationErrorMetric

    q = quantizer.Quantizer(bytearray(float_bytes))
    q.load_quantization_recipe(recipe.static_wi8_ai8())
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        # The quantizer's calibrator keeps every tensor, which LiteRT warns about.
        warnings.simplefilter("ignore", UserWarning)
        cal = q.calibrate(_calib_feeds(float_bytes, calib), num_threads=2)
        q.quantize(calibration_result=cal, enable_progress_report=False)
        res = q.validate(_calib_feeds(float_bytes, data),
                         error_metrics=[ValidationErrorMetric.SNR], num_threads=2)
    # ai-edge-quantizer reports SNR as a power ratio; rank in dB, capped (exact tensors: inf).
    cap = 200.0
    snr = {k: float(10 * np.log10(max(float(v.get("snr", 0.0)), 1e-12)))
           for k, v in res.get_all_tensor_results().items()}
    model = read_model(float_bytes)
    sg = model.subgraphs[0]
    losses = []
    for op in sg.operators:
        names = [tensor_name(sg.tensors[i]) for i in op.outputs]
        outs = [min(snr[n], cap) for n in names if n in snr]
        if not outs:
            continue
        ins = [min(snr[tensor_name(sg.tensors[i])], cap) for i in op.inputs
               if i >= 0 and not has_data(model, sg.tensors[i]) and tensor_name(sg.tensors[i]) in snr]
        losses.append((names[0], (min(ins) if ins else cap) - min(outs)))
    losses.sort(key=lambda x: -x[1])
    return losses


def _aeq_quantize(float_bytes: bytes, recipe_name: str, calib: Dataset | None,
                  float_tensors: list[str] = ()) -> bytes:
    """``float_bytes`` quantized by ai-edge-quantizer's ``recipe_name`` recipe, the ops producing
    ``float_tensors`` kept in float; ``calib`` calibrates static recipes."""
    from ai_edge_quantizer import qtyping, quantizer, recipe
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    q = quantizer.Quantizer(bytearray(float_bytes))
    q.load_quantization_recipe(getattr(recipe, recipe_name)())
    for name in float_tensors:
        # ai-edge-quantizer matches against the op's scope: its output names joined by ";"
        # with a trailing ";".
        q.update_quantization_recipe(regex="^" + re.escape(name) + ";",
                                     operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
                                     algorithm_key=AlgorithmName.NO_QUANTIZE)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        cal = (q.calibrate(_calib_feeds(float_bytes, calib), num_threads=2)
               if calib is not None else None)
        res = q.quantize(calibration_result=cal, enable_progress_report=False)
    return bytes(res.quantized_model)


def _need_aeq(what: str) -> None:
    if _aeq() is None:
        raise ModelError(f"{what} needs ai-edge-quantizer (pip install 'edgepack[host]')")


def quantize_keeping_float(float_bytes: bytes, calib: Dataset, float_tensors: list[str]
                           ) -> TFLiteResult:
    """Static int8 (int8 weights and activations, float model I/O) with the ops producing
    ``float_tensors`` kept in float, through ai-edge-quantizer's selective recipe."""
    _need_aeq("selective int8")
    model = _aeq_quantize(float_bytes, "static_wi8_ai8", calib, float_tensors)
    layers = tuple(dict.fromkeys(n.split(";")[0].rsplit("/", 1)[0] for n in float_tensors))
    return TFLiteResult(model, "int8",
                        (f"int8 with {len(float_tensors)} layer(s) kept in float "
                         f"(ai-edge-quantizer selective recipe): {', '.join(layers)}",),
                        io_type="float32", float_layers=layers, tool="ai-edge-quantizer")


def quantize_tflite(float_bytes: bytes, mode: str, *, calib: Dataset | None = None
                    ) -> TFLiteResult:
    """A float ``.tflite`` (no SavedModel behind it) quantized by ai-edge-quantizer: ``int8``
    (static, int8 weights and activations, float model I/O around QUANTIZE/DEQUANTIZE,
    calibrated on ``calib``) or ``dynamic`` (int8 weights, float activations)."""
    if mode not in ("int8", "dynamic"):
        raise ModelError(f"a float .tflite quantizes to int8 or dynamic here, not {mode}: give "
                         "the source model (Keras, SavedModel or ONNX) for other modes",
                         field="quantize")
    _need_aeq(f"{mode} quantization of a .tflite")
    if mode == "int8":
        if calib is None or len(calib) == 0:
            raise DataError("full-int8 TFLite needs calibration data (pass `calibration=`)",
                            field="calibration")
        model = _aeq_quantize(float_bytes, "static_wi8_ai8", calib)
        io_type = LiteRTSession(model).tensor_specs("inputs", raw=True)[0].dtype
        note = (f"full int8 by ai-edge-quantizer (static_wi8_ai8) calibrated on {len(calib)} "
                f"samples, {io_type} model I/O")
    else:
        model, io_type = _aeq_quantize(float_bytes, "dynamic_wi8_afp32", None), "float32"
        note = "int8 weights, float activations (ai-edge-quantizer dynamic_wi8_afp32)"
    return TFLiteResult(model, mode, (note,), io_type=io_type, tool="ai-edge-quantizer")


# ---------------------------------------------------------------------------------------------
# ONNX input


def onnx_to_saved_model(onnx_path: str | Path, workdir: str | Path, target: str = "") -> Path:
    """ONNX → TF SavedModel through onnx2tf, or ModelError saying why it is not possible."""
    try:
        import onnx2tf  # type: ignore[import-not-found]
    except ImportError:
        raise ModelError(
            f"{Path(onnx_path).name} is ONNX, and {target or 'a TFLite target'} (TFLite/TFLM) "
            "needs it converted through "
            "onnx2tf, which is not installed here (its current releases pin older tensorflow, "
            "numpy and onnx than edgepack's). Export the original model as Keras or a "
            "SavedModel and build from that, or pick a target that runs ONNX (edgepack "
            "targets list).") from None
    out = Path(workdir) / "onnx2tf"
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            onnx2tf.convert(input_onnx_file_path=str(onnx_path), output_folder_path=str(out),
                            non_verbose=True)
    except Exception as exc:
        raise ModelError(f"onnx2tf could not convert {Path(onnx_path).name}: "
                         f"{str(exc)[:300]}") from None
    return out
