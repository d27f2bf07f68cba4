"""Quantize ONNX models: static int8 (calibrated), dynamic int8, fp16.

Thin, explicit wrappers over ``onnxruntime.quantization`` and ``onnxconverter_common.float16``:
the scheme (QDQ/QOperator, activation/weight types, per-channel, reduce_range) comes from the
target profile, because that choice — not the library's default — decides whether int8 is faster
than fp32 on a given CPU.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edgepack.agent.errors import DataError, ModelError
from edgepack.agent.profiles import QuantScheme
from edgepack.host.build.data import Dataset

__all__ = ["QuantResult", "quantize_static", "quantize_dynamic", "convert_fp16", "count_quantized",
           "drop_zero_points"]

_QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul",
              "MatMulInteger", "ConvInteger", "DynamicQuantizeLinear", "QGemm", "QLinearAdd",
              "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}


@dataclass(frozen=True)
class QuantResult:
    model_bytes: bytes
    mode: str
    scheme: QuantScheme | None
    quantized_ops: int  # ops computing in integer (0 → nothing was quantized)
    excluded_nodes: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


def count_quantized(model: Any) -> int:
    """Integer compute ops in a quantized graph (QDQ: nodes fed by DequantizeLinear)."""
    nodes = model.graph.node
    if any(n.op_type in _QUANT_OPS - {"QuantizeLinear", "DequantizeLinear"} for n in nodes):
        return sum(n.op_type in _QUANT_OPS - {"QuantizeLinear", "DequantizeLinear",
                                              "DynamicQuantizeLinear"} for n in nodes)
    dq_out = {o for n in nodes if n.op_type == "DequantizeLinear" for o in n.output}
    return sum(1 for n in nodes if n.op_type not in _QUANT_OPS and any(i in dq_out for i in n.input))


def _qtype(name: str) -> Any:
    from onnxruntime.quantization import QuantType

    return QuantType.QUInt8 if name == "uint8" else QuantType.QInt8


class _Reader:
    """CalibrationDataReader over a Dataset, one batch at a time (bounded memory)."""

    def __init__(self, data: Dataset, batch: int, tick: Callable[[int], None] | None) -> None:
        self._it = iter(data.batches(batch))
        self._tick = tick

    def get_next(self) -> dict | None:
        feed = next(self._it, None)
        if feed is not None and self._tick:
            self._tick(1)
        return feed

    def rewind(self) -> None:  # onnxruntime calls this for some calibrators
        pass


def quantize_static(model_bytes: bytes, calib: Dataset, scheme: QuantScheme, *,
                    method: str = "minmax", batch: int = 1,
                    nodes_to_exclude: Iterable[str] = (),
                    tick: Callable[[int], None] | None = None,
                    cache_dir: str | Path | None = None) -> QuantResult:
    """Calibrated int8 with ``scheme``; ``nodes_to_exclude`` stay in float.

    With ``cache_dir``, tensor ranges are calibrated once per (method, activation symmetry) and
    reused by every later call on the same model and data — variants and the gate's fallback only
    re-quantize. The caller owns the directory and must not share it across models or data.
    """
    if len(calib) == 0:
        raise DataError("int8 needs calibration samples; `calibration=` holds none",
                        field="calibration")
    # Memory stays bounded by the sample cap: MinMax keeps only per-tensor (ReduceMin, ReduceMax)
    # per sample. onnxruntime's CalibMaxIntermediateOutputs is deliberately not used: in 1.32 it
    # discards the collected batches instead of folding them into the ranges.
    extra = {
        "ActivationSymmetric": scheme.activation_type == "int8",
        "WeightSymmetric": True,
    }
    if method == "percentile":
        extra["CalibPercentile"] = 99.99
    excluded = tuple(nodes_to_exclude)
    if cache_dir is not None:
        sym = "sym" if extra["ActivationSymmetric"] else "asym"
        cache = Path(cache_dir) / f"ranges-{method}-{sym}.json"
        asym = Path(cache_dir) / f"ranges-{method}-asym.json"
        if method == "minmax" and sym == "sym" and not cache.exists() and asym.exists():
            _symmetric_ranges(asym, cache)
        extra["_cache"] = str(cache)
    try:
        return _static(model_bytes, calib, scheme, method, batch, excluded, extra, tick)
    except ModelError as exc:
        if not scheme.per_channel:
            raise
        # onnxruntime 1.32 fails per-channel on some Gemm+bias graphs (a scalar comparison of
        # per-channel scale arrays); per-tensor weights still quantize them.
        per_tensor = replace(scheme, per_channel=False)
        res = _static(model_bytes, calib, per_tensor, method, batch, excluded, extra, tick)
        return replace(res, notes=(f"per-channel int8 failed in onnxruntime ({exc.message}); "
                                   f"used per-tensor weights ({per_tensor.label})",))


def _symmetric_ranges(asym: Path, sym: Path) -> None:
    """Symmetric MinMax ranges from the asymmetric ones, without calibrating again.

    onnxruntime's MinMax calibrator makes a range symmetric as ±max(|min|, |max|) of the
    per-tensor min and max over all samples, which is exactly what is derived here.
    """
    import numpy as np
    from onnxruntime.quantization.calibrate import (
        TensorData,
        TensorsData,
        load_tensors_data,
        save_tensors_data,
    )

    ranges = load_tensors_data(asym)
    out = {}
    for name, td in ranges.data.items():
        lo, hi = td.range_value
        m = np.maximum(np.abs(lo), np.abs(hi)).astype(np.asarray(hi).dtype)
        out[name] = TensorData(lowest=-m, highest=m)
    save_tensors_data(TensorsData(ranges.calibration_method, out), sym)


def _static(model_bytes: bytes, calib: Dataset, scheme: QuantScheme, method: str, batch: int,
            excluded: tuple[str, ...], extra: dict, tick: Callable[[int], None] | None
            ) -> QuantResult:
    import onnx
    from onnxruntime import quantization as q

    methods = {"minmax": q.CalibrationMethod.MinMax, "entropy": q.CalibrationMethod.Entropy,
               "percentile": q.CalibrationMethod.Percentile}
    extra = dict(extra)
    cache = extra.pop("_cache", None)
    with tempfile.TemporaryDirectory(prefix="edgepack-q-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(model_bytes)
        if cache and Path(cache).exists() and tick:
            tick(len(calib))  # ranges come from the cache: nothing to run
        try:
            q.quantize_static(
                str(src), str(dst), _Reader(calib, batch, tick),
                quant_format=q.QuantFormat.QDQ if scheme.format == "QDQ" else
                q.QuantFormat.QOperator,
                per_channel=scheme.per_channel, reduce_range=scheme.reduce_range,
                activation_type=_qtype(scheme.activation_type),
                weight_type=_qtype(scheme.weight_type),
                nodes_to_exclude=list(excluded), calibrate_method=methods[method],
                extra_options=extra, calibration_cache_path=cache)
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"int8 quantization ({scheme.label}) failed: "
                             f"{str(exc).splitlines()[0][:300]}", stage="quantize") from None
        model = onnx.load(dst)
    if scheme.format == "QDQ":
        drop_zero_points(model)
    return QuantResult(model.SerializeToString(), "int8", scheme, count_quantized(model), excluded)


def drop_zero_points(model: Any) -> int:
    """Drop the all-zero zero points of weight and bias ``DequantizeLinear`` nodes.

    The quantizer writes one zero point per channel for every int8 weight and int32 bias,
    all zeros for symmetric weights; ONNX makes the input optional and 0 when absent, so the
    dequantized values are the same, and onnxruntime fuses the nodes into the same integer
    kernels. On MobileNetV2 (QDQ, per channel) that is 75 KB of a 3.9 MB model.
    """
    import onnx
    from onnx import numpy_helper

    g = model.graph
    init = {t.name: t for t in g.initializer}
    integer = (onnx.TensorProto.INT8, onnx.TensorProto.INT32)
    dropped = 0
    for n in g.node:
        if n.op_type != "DequantizeLinear" or n.domain not in ("", "ai.onnx") or \
                len(n.input) != 3 or n.input[0] not in init or n.input[2] not in init:
            continue
        if init[n.input[0]].data_type in integer and \
                not numpy_helper.to_array(init[n.input[2]]).any():
            del n.input[2]
            dropped += 1
    if dropped:
        used = {i for n in g.node for i in n.input}
        kept = [t for t in g.initializer if t.name in used]
        del g.initializer[:]
        g.initializer.extend(kept)
    return dropped


def quantize_dynamic(model_bytes: bytes, scheme: QuantScheme) -> QuantResult:
    """Weights int8 ahead of time, activations quantized per inference (no calibration)."""
    import onnx
    from onnxruntime import quantization as q

    with tempfile.TemporaryDirectory(prefix="edgepack-q-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "dyn.onnx"
        src.write_bytes(model_bytes)
        try:
            q.quantize_dynamic(str(src), str(dst), per_channel=scheme.per_channel,
                               reduce_range=scheme.reduce_range,
                               weight_type=_qtype(scheme.weight_type))
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"dynamic quantization failed: {str(exc).splitlines()[0][:300]}",
                             stage="quantize") from None
        model = onnx.load(dst)
    return QuantResult(model.SerializeToString(), "dynamic", scheme, count_quantized(model))


def convert_fp16(model_bytes: bytes, keep_io_types: bool = True) -> QuantResult:
    """Weights and compute in float16; float32 inputs/outputs unless ``keep_io_types`` is off."""
    import onnx
    from onnxconverter_common import float16

    model = onnx.load_from_string(model_bytes)
    try:
        half = float16.convert_float_to_float16(model, keep_io_types=keep_io_types,
                                                disable_shape_infer=False)
    except Exception as exc:
        raise ModelError(f"fp16 conversion failed: {str(exc).splitlines()[0][:300]}",
                         stage="quantize") from None
    return QuantResult(half.SerializeToString(), "fp16", None, 0)
