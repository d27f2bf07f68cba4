"""Pre-flight for ONNX models: load, upgrade opset, fold constants, infer shapes, fix the batch.

Everything here runs before any long work, so a model the target cannot run fails in seconds
with the offending ops named. Older graphs (low opsets, initializers also listed as graph inputs,
weights computed by constant subgraphs such as ConstantOfShape) break quantization unless they are
upgraded and folded first.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepack.agent.errors import ModelError
from edgepack.host.build.data import TensorSpec

__all__ = ["PreparedModel", "prepare_onnx", "tensor_specs", "onnx_dtype_name"]

_ORT_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"}


@dataclass(frozen=True)
class PreparedModel:
    """An fp32 ONNX model ready for optimization, and what pre-flight did to it."""

    model_bytes: bytes
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset: int
    source_opset: int
    steps: tuple[str, ...] = field(default=())
    op_counts: dict[str, int] = field(default_factory=dict)


def onnx_dtype_name(elem_type: int) -> str:
    """A numpy dtype name, or ``string`` for string tensors (numpy calls them ``object``)."""
    import onnx

    if elem_type == onnx.TensorProto.STRING:
        return "string"
    try:
        return str(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, ValueError):
        return onnx.TensorProto.DataType.Name(elem_type).lower()


def _spec(vi: Any) -> TensorSpec:
    t = vi.type
    kind = t.WhichOneof("value")
    if kind != "tensor_type":
        return TensorSpec(vi.name, {"sequence_type": "sequence", "map_type": "map"}.get(
            kind, kind or "unknown"), ())
    dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                 for d in t.tensor_type.shape.dim)
    return TensorSpec(vi.name, onnx_dtype_name(t.tensor_type.elem_type), dims)


def tensor_specs(model: Any) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Real inputs (initializers excluded) and outputs of an ONNX model."""
    inits = {i.name for i in model.graph.initializer}
    ins = tuple(_spec(v) for v in model.graph.input if v.name not in inits)
    return ins, tuple(_spec(v) for v in model.graph.output)


def _load(path: Path) -> Any:
    import onnx

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror}") from None
    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise ModelError(f"{path} is not a readable ONNX model ({type(exc).__name__}). Is it "
                         "truncated, or a different format? Export it again.") from None
    if not model.graph.node:
        raise ModelError(f"{path} has no graph nodes: not an ONNX model, or an empty one")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0][:300]
        raise ModelError(f"{path} is not a valid ONNX model: {first}") from None
    return model


def _default_opset(model: Any) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def _check_ops(model: Any, target: str, runtime: str) -> Counter:
    import onnx

    counts: Counter = Counter()
    unknown: Counter = Counter()
    for node in model.graph.node:
        key = f"{node.domain + ':' if node.domain else ''}{node.op_type}"
        counts[key] += 1
        if node.domain not in _ORT_DOMAINS or (
                node.domain in ("", "ai.onnx", "ai.onnx.ml")
                and not onnx.defs.has(node.op_type, node.domain)):
            unknown[key] += 1
    if unknown:
        ops = ", ".join(f"{k} (x{v})" for k, v in sorted(unknown.items()))
        raise ModelError(f"the model uses ops that {runtime} on {target} cannot run: {ops}. "
                         "Replace them in the exporter (standard ONNX ops only) or register a "
                         "custom-op library on the device.", target=target, stage="preflight")
    return counts


def _fix_batch(model: Any, batch: int) -> list[str]:
    inits = {i.name for i in model.graph.initializer}
    fixed = []
    for vi in list(model.graph.input) + list(model.graph.output):
        if vi.name in inits or vi.type.WhichOneof("value") != "tensor_type":
            continue
        dims = vi.type.tensor_type.shape.dim
        if dims and not (dims[0].HasField("dim_value") and dims[0].dim_value > 0):
            dims[0].Clear()
            dims[0].dim_value = batch
            fixed.append(vi.name)
    return fixed


def prepare_onnx(path: str | Path, *, opset: int, batch: int = 1, target: str = "",
                 runtime: str = "onnxruntime") -> PreparedModel:
    """Load and normalize an ONNX model for ``target`` (see module docstring)."""
    import onnx
    from onnx import version_converter

    from edgepack.host.build.onnx_fuse import fuse_standard
    from edgepack.host.build.onnx_intake import prepare_onnx as intake

    path = Path(path)
    _load(path)  # a readable, valid ONNX file (or a ModelError saying what it is instead)
    # Old exporters' graphs (initializers listed as inputs, weights computed by constant
    # subgraphs, low opsets) are cleaned and folded before any opset conversion.
    taken = intake(path, target_opset=opset)
    model = taken.model
    steps: list[str] = list(taken.steps)
    src_opset = taken.opset_before
    _check_ops(model, target, runtime)
    if _default_opset(model) > opset:
        try:
            model = version_converter.convert_version(model, opset)
        except Exception as exc:
            raise ModelError(f"cannot convert the model from opset {_default_opset(model)} down "
                             f"to {opset} (the opset {target} runs): "
                             f"{str(exc).splitlines()[0][:200]}", target=target,
                             stage="preflight") from None
        steps.append(f"opset {src_opset} → {opset}")

    fixed = _fix_batch(model, batch)
    if fixed:
        steps.append(f"dynamic batch fixed to {batch} for {', '.join(fixed)}")
    fused = fuse_standard(model)  # LayerNorm/GELU as exported by tf2onnx → standard fused forms
    if fused:
        steps.append(fused)

    ins, _ = tensor_specs(model)
    for spec in ins:
        if any(d is None for d in spec.shape):
            raise ModelError(f"input '{spec.name}' has dynamic dimensions besides the batch "
                             f"({spec.shape}); edge runtimes need fixed shapes. Export the model "
                             "with static input shapes.", target=target, stage="preflight")

    # Constant folding + symbolic and ONNX shape inference, the graph preparation
    # onnxruntime's quantizer expects (quant_pre_process).
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="edgepack-pre-") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save(model, src)
        before = len(model.graph.node)
        cwd = os.getcwd()
        # onnxruntime's symbolic shape inference drops a debug file into the working directory
        # when it gives up; keep that inside our temporary directory.
        os.chdir(tmp)
        try:
            try:
                quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
            except Exception:
                # Symbolic shape inference fails on some graphs; ONNX inference is enough then.
                quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
        except Exception as exc:
            raise ModelError(f"graph preparation (constant folding, shape inference) failed: "
                             f"{str(exc).splitlines()[0][:300]}", target=target,
                             stage="preflight") from None
        finally:
            os.chdir(cwd)
        prepared = onnx.load(dst)
    steps.append(f"constants folded and shapes inferred ({before} → "
                 f"{len(prepared.graph.node)} nodes)")
    counts = _check_ops(prepared, target, runtime)
    _smoke_session(prepared, target)
    ins, outs = tensor_specs(prepared)
    return PreparedModel(model_bytes=prepared.SerializeToString(), inputs=ins, outputs=outs,
                         opset=_default_opset(prepared), source_opset=src_opset,
                         steps=tuple(steps), op_counts=dict(counts))


def _smoke_session(model: Any, target: str) -> None:
    import onnxruntime as ort

    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:
        msg = str(exc).split(":", 3)[-1].strip()[:300]
        raise ModelError(f"onnxruntime cannot load the prepared model: {msg}", target=target,
                         stage="preflight") from None
