"""The Edge TPU: which TFLite ops it maps, shape limits, and its compiler when on PATH."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from edgepack.agent.errors import ModelError
from edgepack.host.build.convert_tflite import (
    LayerOp,
    has_data,
    layer_ops,
    read_model,
    tensor_name,
)

__all__ = ["EDGETPU_OPS", "EdgeTpuCompile", "compile_edgetpu", "edgetpu_shape_warnings",
           "edgetpu_unsupported_ops"]

# Ops the Edge TPU compiler maps to the TPU (Coral's "supported operations" table), as TFLite
# builtin operator names; tests check every name exists in the schema's BuiltinOperator enum.
# LSTM is mapped in its unidirectional-sequence form too (the compiler takes both).
EDGETPU_OPS = frozenset({
    "ADD", "AVERAGE_POOL_2D", "CONCATENATION", "CONV_2D", "DEPTHWISE_CONV_2D", "EXPAND_DIMS",
    "FULLY_CONNECTED", "L2_NORMALIZATION", "LOGISTIC", "LSTM", "UNIDIRECTIONAL_SEQUENCE_LSTM",
    "MAXIMUM", "MAX_POOL_2D", "MEAN", "MINIMUM", "MUL", "PACK", "PAD", "PRELU", "QUANTIZE",
    "REDUCE_MAX", "REDUCE_MIN", "RELU", "RELU6", "RELU_N1_TO_1", "RESHAPE", "RESIZE_BILINEAR",
    "RESIZE_NEAREST_NEIGHBOR", "RSQRT", "SLICE", "SOFTMAX", "SPACE_TO_DEPTH", "SPLIT", "SQUEEZE",
    "STRIDED_SLICE", "SUB", "SUM", "TANH", "TRANSPOSE", "TRANSPOSE_CONV",
})


def edgetpu_unsupported_ops(model_bytes: bytes) -> list[LayerOp]:
    """Operators the Edge TPU compiler leaves on the CPU (and everything after the first one)."""
    return [o for o in layer_ops(model_bytes) if o.op not in EDGETPU_OPS or o.float_io]


def edgetpu_shape_warnings(model_bytes: bytes) -> list[str]:
    """Edge TPU tensors may have at most 3 dimensions larger than 1 (the innermost ones)."""
    model = read_model(model_bytes)
    sg = model.subgraphs[0]
    bad = []
    for t in sg.tensors:
        shape = [int(d) for d in (t.shape if t.shape is not None else [])]
        if has_data(model, t):  # weights: the compiler lays them out itself
            continue
        if len(shape) > 3 and any(d > 1 for d in shape[:-3]):
            bad.append(f"{tensor_name(t)} {shape}")
    return [f"{len(bad)} tensor(s) have more than 3 non-1 dimensions, which the Edge TPU does "
            f"not map (e.g. {bad[0]})"] if bad else []


@dataclass(frozen=True)
class EdgeTpuCompile:
    model_bytes: bytes | None
    log: str
    compiler: str | None
    tpu_ops: int | None = None
    cpu_ops: int | None = None
    notes: list[str] = field(default_factory=list)


def compile_edgetpu(model_bytes: bytes, workdir: str | Path | None = None) -> EdgeTpuCompile:
    """Run ``edgetpu_compiler`` if it is on PATH; otherwise say the bundle still needs it."""
    exe = shutil.which("edgetpu_compiler")
    if exe is None:
        return EdgeTpuCompile(None, "", None, notes=[
            "edgetpu_compiler is not on this host's PATH (it ships for x86-64 Debian/Ubuntu "
            "only): the bundle holds the CPU int8 model; run 'edgetpu_compiler model.tflite' "
            "before the Edge TPU can execute it"])
    with tempfile.TemporaryDirectory(prefix="edgepack-etpu-", dir=workdir) as tmp:
        src = Path(tmp) / "model.tflite"
        src.write_bytes(model_bytes)
        r = subprocess.run([exe, "-s", "-o", tmp, str(src)], capture_output=True, text=True,
                           timeout=600)
        out = Path(tmp) / "model_edgetpu.tflite"
        log = (r.stdout + r.stderr)[-4000:]
        if r.returncode != 0 or not out.exists():
            raise ModelError(f"edgetpu_compiler failed (exit {r.returncode}): {log[-600:]}",
                             stage="edgetpu_compiler")
        data = out.read_bytes()
    m_tpu = re.search(r"Number of operations that will run on Edge TPU:\s*(\d+)", log)
    m_cpu = re.search(r"Number of operations that will run on CPU:\s*(\d+)", log)
    return EdgeTpuCompile(data, log, exe, int(m_tpu.group(1)) if m_tpu else None,
                          int(m_cpu.group(1)) if m_cpu else None)
