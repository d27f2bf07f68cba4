"""TFLite Micro output: the C sources a firmware build compiles, and the memory a model needs.

::

    plan_arena(model_bytes)        → ArenaPlan: tensor arena estimate (TFLM's greedy planner)
    resolver_ops(model_bytes)      → MicroMutableOpResolver Add*() calls; ModelError for ops TFLM lacks
    write_sources(model_bytes, …)  → {"model_data.cc", "model_data.h", "model_config.h": bytes}
    check_budgets(model_bytes, plan, profile)   BudgetError naming the figures

The arena estimate replays what TFLM does at ``AllocateTensors()``: every non-constant tensor gets
a lifetime (first op that writes it, last op that reads it; graph inputs live from op 0, outputs to
the last op), kernels' scratch buffers live for their op, sizes are rounded up to 16 bytes, and
buffers are placed largest first at the lowest offset that does not overlap, in time and space,
any buffer placed before (``GreedyMemoryPlanner``). On top of that "head" come TFLM's persistent
structures in the arena's tail, estimated for a 32-bit MCU (see :data:`ASSUMPTIONS`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgepack.agent.errors import BudgetError, ModelError
from edgepack.host.build.convert_tflite import _enum_names, _schema, has_data, op_name, read_model

__all__ = ["ASSUMPTIONS", "TFLM_RESOLVER", "ArenaPlan", "plan_arena", "resolver_ops",
           "write_sources", "check_budgets", "ARENA_MARGIN"]

ALIGN = 16  # MicroArenaBufferAlignment()
ARENA_MARGIN = 1.10  # kTensorArenaSize = estimate x margin, rounded up to 1 KiB

# Persistent (tail) allocations on a 32-bit MCU, in bytes.
_EVAL_TENSOR = 12  # TfLiteEvalTensor: data pointer, dims pointer, type
_NODE = 40  # NodeAndRegistration: TfLiteNode + registration pointer
_IO_TENSOR = 64 + 16  # persistent TfLiteTensor for each graph input/output + quantization
_OP_DATA = 48  # a kernel's OpData struct
_PER_CHANNEL = 8  # per-channel output multiplier + shift (int32 each)
_FIXED = 1024  # MicroAllocator, SubgraphAllocations, MicroInterpreter bookkeeping

ASSUMPTIONS = (
    "activations planned like TFLM's GreedyMemoryPlanner (largest first, lowest free offset, "
    "lifetimes from op order), each buffer rounded up to 16 bytes",
    "constant tensors (weights) stay in flash and take no arena",
    "kernel scratch buffers as CMSIS-NN requests them on DSP cores (conv: 2*Cin*Kh*Kw int16 for "
    "non-1x1 kernels; depthwise: Cin*Kh*Kw int16; average pool: Cin int32); ESP-NN's are similar",
    f"persistent structures for a 32-bit MCU: {_EVAL_TENSOR} B per tensor, {_NODE} B per op, "
    f"{_OP_DATA} B op data per op plus {_PER_CHANNEL} B per output channel of conv/depthwise/"
    f"fully-connected, {_IO_TENSOR} B per graph input/output, {_FIXED} B fixed",
    f"kTensorArenaSize adds {round((ARENA_MARGIN - 1) * 100)}% margin, rounded up to 1 KiB: "
    "check MicroInterpreter::arena_used_bytes() on the board and trim",
)

# TFLite builtin → TFLM MicroMutableOpResolver method (tensorflow/lite/micro/
# micro_mutable_op_resolver.h). An op missing here has no TFLM kernel.
TFLM_RESOLVER = {
    "ABS": "AddAbs", "ADD": "AddAdd", "ADD_N": "AddAddN", "ARG_MAX": "AddArgMax",
    "ARG_MIN": "AddArgMin", "ASSIGN_VARIABLE": "AddAssignVariable",
    "AVERAGE_POOL_2D": "AddAveragePool2D", "BATCH_MATMUL": "AddBatchMatMul",
    "BATCH_TO_SPACE_ND": "AddBatchToSpaceNd", "BROADCAST_ARGS": "AddBroadcastArgs",
    "BROADCAST_TO": "AddBroadcastTo", "CALL_ONCE": "AddCallOnce", "CAST": "AddCast",
    "CEIL": "AddCeil", "CONCATENATION": "AddConcatenation", "CONV_2D": "AddConv2D",
    "COS": "AddCos", "CUMSUM": "AddCumSum", "DEPTH_TO_SPACE": "AddDepthToSpace",
    "DEPTHWISE_CONV_2D": "AddDepthwiseConv2D", "DEQUANTIZE": "AddDequantize", "DIV": "AddDiv",
    "EMBEDDING_LOOKUP": "AddEmbeddingLookup", "ELU": "AddElu", "EQUAL": "AddEqual",
    "EXP": "AddExp", "EXPAND_DIMS": "AddExpandDims", "FILL": "AddFill", "FLOOR": "AddFloor",
    "FLOOR_DIV": "AddFloorDiv", "FLOOR_MOD": "AddFloorMod",
    "FULLY_CONNECTED": "AddFullyConnected", "GATHER": "AddGather", "GATHER_ND": "AddGatherNd",
    "GREATER": "AddGreater", "GREATER_EQUAL": "AddGreaterEqual", "HARD_SWISH": "AddHardSwish",
    "IF": "AddIf", "L2_NORMALIZATION": "AddL2Normalization", "L2_POOL_2D": "AddL2Pool2D",
    "LEAKY_RELU": "AddLeakyRelu", "LESS": "AddLess", "LESS_EQUAL": "AddLessEqual",
    "LOG": "AddLog", "LOGICAL_AND": "AddLogicalAnd", "LOGICAL_NOT": "AddLogicalNot",
    "LOGICAL_OR": "AddLogicalOr", "LOGISTIC": "AddLogistic", "LOG_SOFTMAX": "AddLogSoftmax",
    "MAXIMUM": "AddMaximum", "MAX_POOL_2D": "AddMaxPool2D", "MIRROR_PAD": "AddMirrorPad",
    "MEAN": "AddMean", "MINIMUM": "AddMinimum", "MUL": "AddMul", "NEG": "AddNeg",
    "NOT_EQUAL": "AddNotEqual", "PACK": "AddPack", "PAD": "AddPad", "PADV2": "AddPadV2",
    "PRELU": "AddPrelu", "QUANTIZE": "AddQuantize", "READ_VARIABLE": "AddReadVariable",
    "REDUCE_MAX": "AddReduceMax", "REDUCE_MIN": "AddReduceMin", "RELU": "AddRelu",
    "RELU6": "AddRelu6", "RESHAPE": "AddReshape", "RESIZE_BILINEAR": "AddResizeBilinear",
    "RESIZE_NEAREST_NEIGHBOR": "AddResizeNearestNeighbor", "REVERSE_V2": "AddReverseV2",
    "ROUND": "AddRound", "RSQRT": "AddRsqrt", "SELECT_V2": "AddSelectV2", "SHAPE": "AddShape",
    "SIN": "AddSin", "SLICE": "AddSlice", "SOFTMAX": "AddSoftmax",
    "SPACE_TO_BATCH_ND": "AddSpaceToBatchNd", "SPACE_TO_DEPTH": "AddSpaceToDepth",
    "SPLIT": "AddSplit", "SPLIT_V": "AddSplitV", "SQUEEZE": "AddSqueeze", "SQRT": "AddSqrt",
    "SQUARE": "AddSquare", "SQUARED_DIFFERENCE": "AddSquaredDifference",
    "STRIDED_SLICE": "AddStridedSlice", "SUB": "AddSub", "SUM": "AddSum", "SVDF": "AddSvdf",
    "TANH": "AddTanh", "TRANSPOSE_CONV": "AddTransposeConv", "TRANSPOSE": "AddTranspose",
    "UNPACK": "AddUnpack", "UNIDIRECTIONAL_SEQUENCE_LSTM": "AddUnidirectionalSequenceLSTM",
    "VAR_HANDLE": "AddVarHandle", "WHILE": "AddWhile", "ZEROS_LIKE": "AddZerosLike",
}

_DTYPE_BYTES = {"FLOAT32": 4, "FLOAT16": 2, "FLOAT64": 8, "INT32": 4, "UINT32": 4, "INT64": 8,
                "UINT64": 8, "INT16": 2, "UINT16": 2, "INT8": 1, "UINT8": 1, "BOOL": 1,
                "INT4": 1, "COMPLEX64": 8}


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class Buffer:
    """One planned arena buffer (a tensor or a kernel's scratch)."""

    name: str
    size: int  # aligned bytes
    first: int
    last: int
    offset: int = -1


@dataclass(frozen=True)
class ArenaPlan:
    """What the tensor arena must hold, in bytes."""

    activation_bytes: int  # planned head: activations + scratch, overlapped by lifetime
    scratch_bytes: int  # of which kernel scratch (un-overlapped total)
    persistent_bytes: int  # tail: TFLM's structures
    arena_bytes: int  # activation + persistent
    recommended_bytes: int  # kTensorArenaSize
    largest_tensor_bytes: int
    sum_tensor_bytes: int  # all activations side by side, i.e. with no planning
    tensors: int
    ops: int
    kernels: str
    buffers: tuple[Buffer, ...] = field(repr=False, default=())
    assumptions: tuple[str, ...] = ASSUMPTIONS

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in (
            "activation_bytes", "scratch_bytes", "persistent_bytes", "arena_bytes",
            "recommended_bytes", "largest_tensor_bytes", "sum_tensor_bytes", "tensors", "ops",
            "kernels")} | {"assumptions": list(self.assumptions)}


def _nbytes(t: Any, types: dict[int, str]) -> int:
    shape = list(t.shape if t.shape is not None else [])
    return int(np.prod(shape, dtype=np.int64)) * _DTYPE_BYTES.get(types.get(t.type, ""), 4) \
        if shape else _DTYPE_BYTES.get(types.get(t.type, ""), 4)


def _scratch(name: str, op: Any, sg: Any) -> int:
    """CMSIS-NN scratch for one op on a DSP core (arm_*_get_buffer_size)."""
    def shape(i: int) -> list[int]:
        return list(sg.tensors[op.inputs[i]].shape) if len(op.inputs) > i and op.inputs[i] >= 0 \
            else []

    if name == "CONV_2D":
        x, w = shape(0), shape(1)  # NHWC input; filter [Cout, Kh, Kw, Cin]
        if len(x) == 4 and len(w) == 4 and (w[1], w[2]) != (1, 1):
            return 2 * x[3] * w[1] * w[2] * 2
    elif name == "DEPTHWISE_CONV_2D":
        x, w = shape(0), shape(1)  # filter [1, Kh, Kw, Cout]
        if len(x) == 4 and len(w) == 4:
            return x[3] * w[1] * w[2] * 2
    elif name == "AVERAGE_POOL_2D":
        x = shape(0)
        if len(x) == 4:
            return x[3] * 4
    return 0


def _greedy(buffers: list[Buffer]) -> tuple[list[Buffer], int]:
    """Place buffers like TFLM's GreedyMemoryPlanner; return them with offsets and the head size."""
    order = sorted(range(len(buffers)), key=lambda i: (-buffers[i].size, i))
    placed: list[Buffer] = []
    for i in order:
        b = buffers[i]
        live = sorted((p for p in placed if p.first <= b.last and b.first <= p.last),
                      key=lambda p: p.offset)
        offset = 0
        for p in live:
            if p.offset - offset >= b.size:
                break
            offset = max(offset, p.offset + p.size)
        placed.append(Buffer(b.name, b.size, b.first, b.last, offset))
    head = max((p.offset + p.size for p in placed), default=0)
    return placed, head


def plan_arena(model_bytes: bytes, *, kernels: str = "cmsis-nn") -> ArenaPlan:
    """Estimate the tensor arena; ``kernels="reference"`` plans without kernel scratch."""
    s = _schema()
    types = _enum_names(s.TensorType)
    model = read_model(model_bytes)
    sg = model.subgraphs[0]
    ops = list(sg.operators or [])
    n_ops = len(ops)
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for i in list(sg.inputs if sg.inputs is not None else []):
        first[i] = 0
        last[i] = max(last.get(i, 0), 0)
    for k, op in enumerate(ops):
        for i in op.inputs if op.inputs is not None else []:
            if i >= 0:
                last[i] = max(last.get(i, k), k)
                first.setdefault(i, k)
        for i in op.outputs if op.outputs is not None else []:
            first[i] = min(first.get(i, k), k)
            last[i] = max(last.get(i, k), k)
    for i in list(sg.outputs if sg.outputs is not None else []):
        last[i] = max(n_ops - 1, 0)
        first.setdefault(i, 0)
    buffers: list[Buffer] = []
    raw_sizes = []
    variable = 0
    for i, t in enumerate(sg.tensors):
        if i not in first or has_data(model, t):
            continue
        size = _nbytes(t, types)
        if t.isVariable:
            variable += _align(size)  # variables are persistent, not planned
            continue
        raw_sizes.append(size)
        buffers.append(Buffer(t.name.decode(errors="replace") if isinstance(t.name, bytes)
                              else str(t.name), _align(size), first[i], last[i]))
    scratch_total = 0
    persistent = _FIXED + int(variable) + len(sg.tensors) * _EVAL_TENSOR + n_ops * (_NODE + _OP_DATA)
    for k, op in enumerate(ops):
        name = op_name(model, op)
        sc = _scratch(name, op, sg) if kernels == "cmsis-nn" else 0
        if sc:
            scratch_total += _align(sc)
            buffers.append(Buffer(f"scratch:{name}#{k}", _align(sc), k, k))
        if name in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV") and \
                len(op.outputs):
            out_shape = list(sg.tensors[op.outputs[0]].shape)
            persistent += _align(_PER_CHANNEL * int(out_shape[-1] if out_shape else 1))
    io = len(list(sg.inputs if sg.inputs is not None else [])) + \
        len(list(sg.outputs if sg.outputs is not None else []))
    persistent += io * _IO_TENSOR
    placed, head = _greedy(buffers)
    total = head + persistent
    return ArenaPlan(
        activation_bytes=head, scratch_bytes=scratch_total, persistent_bytes=persistent,
        arena_bytes=total,
        recommended_bytes=int(math.ceil(total * ARENA_MARGIN / 1024.0) * 1024),
        largest_tensor_bytes=max(raw_sizes, default=0), sum_tensor_bytes=sum(raw_sizes),
        tensors=len(raw_sizes), ops=n_ops, kernels=kernels, buffers=tuple(placed))


def resolver_ops(model_bytes: bytes) -> list[tuple[str, str, int]]:
    """``(TFLite op, resolver method, uses)`` per distinct op; ModelError for ops TFLM lacks."""
    model = read_model(model_bytes)
    seen: dict[str, int] = {}
    for op in model.subgraphs[0].operators or []:
        name = op_name(model, op)
        seen[name] = seen.get(name, 0) + 1
    missing = [n for n in seen if n not in TFLM_RESOLVER]
    if missing:
        raise ModelError(f"TFLite Micro has no kernel for {', '.join(missing)}: the model cannot "
                         "run on a microcontroller. Replace those layers.")
    return [(n, TFLM_RESOLVER[n], c) for n, c in seen.items()]


def _c_array(data: bytes, per_line: int = 12) -> str:
    lines = []
    for i in range(0, len(data), per_line):
        lines.append("    " + ", ".join(f"0x{b:02x}" for b in data[i:i + per_line]) + ",")
    return "\n".join(lines)


def _io_consts(session_info: list[dict], prefix: str) -> str:
    out = []
    for j, t in enumerate(session_info):
        q = t.get("quantization") or {"scale": 0.0, "zero_point": 0}
        dims = ", ".join(str(int(d)) for d in t["shape"])
        n = int(np.prod(t["shape"])) if t["shape"] else 1
        sfx = "" if j == 0 else str(j)
        out += [f"// {prefix.lower()} {j}: {t['name']} {t['dtype']}{list(t['shape'])}",
                f"constexpr int k{prefix}Dims{sfx}[] = {{{dims}}};",
                f"constexpr int k{prefix}Elements{sfx} = {n};",
                f"constexpr float k{prefix}Scale{sfx} = {float(q['scale']):.9e}f;",
                f"constexpr int k{prefix}ZeroPoint{sfx} = {int(q['zero_point'])};"]
    return "\n".join(out)


def write_sources(model_bytes: bytes, plan: ArenaPlan, *, inputs: list[dict],
                  outputs: list[dict], name: str = "model", target: str = "") -> dict[str, bytes]:
    """``model_data.cc``/``.h`` (the flatbuffer as an aligned const array, i.e. in flash) and
    ``model_config.h`` (op resolver, arena size, I/O shapes and quantization)."""
    ops = resolver_ops(model_bytes)
    guard = "EDGEPACK_MODEL_DATA_H_"
    header = (
        f"// Generated by edgepack for {name} ({target}). Do not edit.\n"
        f"#ifndef {guard}\n#define {guard}\n\n"
        "// The TFLite flatbuffer. TFLM reads it in place, so it must stay 16-byte aligned.\n"
        "extern const unsigned char g_model_data[];\n"
        "extern const unsigned int g_model_data_len;\n\n"
        f"#endif  // {guard}\n")
    source = (
        f"// Generated by edgepack for {name} ({target}): {len(model_bytes)} bytes. Do not edit.\n"
        '#include "model_data.h"\n\n'
        "// const: the linker places it in flash (.rodata); TFLM never copies it to RAM.\n"
        "alignas(16) const unsigned char g_model_data[] = {\n"
        f"{_c_array(model_bytes)}\n}};\n"
        f"const unsigned int g_model_data_len = {len(model_bytes)};\n")
    adds = "\n".join(f"  if (resolver.{m}() != kTfLiteOk) return kTfLiteError;  // {op} x{c}"
                     for op, m, c in ops)
    assumptions = "\n".join(f"//   - {a}" for a in plan.assumptions)
    config = f"""// Generated by edgepack for {name} ({target}). Do not edit.
#ifndef EDGEPACK_MODEL_CONFIG_H_
#define EDGEPACK_MODEL_CONFIG_H_

#include <cstddef>

#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"

namespace edgepack_model {{

// Ops the model uses: register exactly these, so the linker drops every other kernel.
constexpr unsigned int kOpCount = {len(ops)};
using OpResolver = tflite::MicroMutableOpResolver<kOpCount>;

inline TfLiteStatus RegisterOps(OpResolver& resolver) {{
{adds}
  return kTfLiteOk;
}}

// Tensor arena. Estimate = planned activations {plan.activation_bytes} B (of which scratch
// up to {plan.scratch_bytes} B) + persistent runtime structures {plan.persistent_bytes} B =
// {plan.arena_bytes} B; unplanned, the activations alone would need {plan.sum_tensor_bytes} B.
// Assumptions:
{assumptions}
constexpr size_t kArenaEstimateBytes = {plan.arena_bytes};
constexpr size_t kTensorArenaSize = {plan.recommended_bytes};

{_io_consts(inputs, "Input")}
{_io_consts(outputs, "Output")}

}}  // namespace edgepack_model

#endif  // EDGEPACK_MODEL_CONFIG_H_
"""
    return {"model_data.h": header.encode(), "model_data.cc": source.encode(),
            "model_config.h": config.encode()}


def check_budgets(model_bytes: bytes, plan: ArenaPlan, profile: Any) -> list[str]:
    """BudgetError when the model misses flash or the arena misses RAM; notes otherwise."""
    kib = 1024.0
    model_kb = len(model_bytes) / kib
    hw, b = profile.hardware, profile.budgets
    flash_kb = (b.model_mb or hw.flash_mb or hw.storage_mb) * 1024
    if hw.flash_mb and model_kb > hw.flash_mb * 1024:
        raise BudgetError(f"the int8 model is {model_kb:.1f} KiB, more than {profile.name}'s "
                          f"whole flash ({hw.flash_mb:g} MiB)", target=profile.name)
    if model_kb > flash_kb:
        raise BudgetError(f"the int8 model is {model_kb:.1f} KiB, over {profile.name}'s "
                          f"{flash_kb:.0f} KiB model partition in flash (budgets.model_mb). Use "
                          "a smaller model (fewer/narrower layers, edgepack distill).",
                          target=profile.name)
    ram_kb = hw.ram_mb * 1024
    arena_kb = plan.recommended_bytes / kib
    if ram_kb and plan.arena_bytes / kib > ram_kb:
        raise BudgetError(f"the tensor arena needs ~{plan.arena_bytes / kib:.1f} KiB "
                          f"(activations {plan.activation_bytes / kib:.1f} KiB, largest tensor "
                          f"{plan.largest_tensor_bytes / kib:.1f} KiB), more than "
                          f"{profile.name}'s {ram_kb:.0f} KiB of RAM"
                          + (f" (arena budget {b.arena_kb:g} KiB)" if b.arena_kb else "")
                          + ". Shrink the activations "
                          "(smaller input, fewer channels, earlier pooling).",
                          target=profile.name)
    if b.arena_kb and arena_kb > b.arena_kb:
        raise BudgetError(f"the tensor arena needs {arena_kb:.0f} KiB (estimate "
                          f"{plan.arena_bytes / kib:.1f} KiB + {round((ARENA_MARGIN - 1) * 100)}% "
                          f"margin; largest tensor {plan.largest_tensor_bytes / kib:.1f} KiB), "
                          f"over {profile.name}'s {b.arena_kb:g} KiB arena budget "
                          f"(budgets.arena_kb, of {ram_kb:.0f} KiB RAM). Shrink the activations "
                          "(smaller input, fewer channels, earlier pooling).", target=profile.name)
    return [f"model {model_kb:.1f} KiB of a {flash_kb:.0f} KiB flash partition; tensor arena "
            f"{arena_kb:.0f} KiB of a {b.arena_kb or ram_kb:g} KiB budget"]
