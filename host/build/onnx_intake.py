"""ONNX intake: take an ONNX model as a user has it and hand the engine a clean, portable graph.

::

    prepare_onnx(model_or_path, target_opset=…, log=…)  → IntakeResult
    save_onnx(model, path)                                 writes external data above ~1.8 GB

What it does, in this order (each step that changes something is listed in ``IntakeResult.steps``):

1. load: a path loads its external data from the model's folder; a ``ModelProto`` whose tensors
   point at external files it cannot find is refused with what to pass instead;
2. check the opset: any default-domain opset onnxruntime runs (7 and up) is accepted;
3. drop initializers also listed as graph inputs (IR < 4 exporters wrote them that way; they block
   constant folding and quantization) and raise the IR version to 4 so the graph stays valid;
4. repair what converters get wrong: tf2onnx writes exact GELU with ``Erfc`` (no such ONNX op),
   replaced by ``1 - Erf(x)``;
5. fold constant subgraphs (weights made by ``ConstantOfShape``, ``Transpose`` of a weight, …):
   every standard-domain node whose inputs are all constant is evaluated once (onnxruntime without
   graph optimizations, the onnx reference evaluator as fallback) and replaced by an initializer.
   Only those values change: no fused or runtime-specific ops enter the graph;
6. convert the opset with ``onnx.version_converter`` only when ``target_opset`` is above the
   model's, to exactly ``target_opset``. Large tensors are detached while converting so models
   over the 2 GB protobuf limit convert too.

float16 models stay float16 (noted); ``com.microsoft`` and other custom-domain ops are kept as they
are (noted; they are never folded or converted). A failure raises :class:`ModelError` naming the
node and the steps already taken.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.agent.errors import ModelError

__all__ = ["EXTERNAL_DATA_THRESHOLD", "MIN_OPSET", "IntakeResult", "prepare_onnx", "save_onnx"]

MIN_OPSET = 7  # the lowest default-domain opset onnxruntime runs
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes of tensor data above which save_onnx goes external

_DEFAULT_DOMAINS = ("", "ai.onnx")
_STANDARD_DOMAINS = (*_DEFAULT_DOMAINS, "ai.onnx.ml", "ai.onnx.preview.training")
# Ops whose value is not a function of their inputs, or that do not produce plain tensors.
_NEVER_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
               "Multinomial", "Bernoulli", "Optional", "OptionalGetElement",
               "OptionalHasElement", "SplitToSequence", "ConcatFromSequence"}
_DETACH_BYTES = 1 << 20  # tensors above 1 MiB leave the proto while the opset converter runs

Log = Callable[[str], None]


@dataclass(frozen=True)
class IntakeResult:
    """The cleaned model and what intake did to it."""

    model: Any  # onnx.ModelProto, tensors loaded in memory
    steps: tuple[str, ...]  # what changed, in order
    opset_before: int  # default-domain opset as loaded
    opset_after: int
    notes: tuple[str, ...] = ()  # what was seen and kept (fp16, custom domains, …)
    float_dtype: str = "float32"  # the dtype of the model's float inputs and weights
    custom_ops: tuple[str, ...] = ()  # "domain:op_type" kept as they are


def _quiet(_: str) -> None:
    pass


def _opset(model: Any) -> int:
    for o in model.opset_import:
        if o.domain in _DEFAULT_DOMAINS:
            return int(o.version)
    return 1  # an opset_import without the default domain means opset 1


def _nodes(graph: Any):
    """Every node, including those in If/Loop/Scan bodies."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g.node:
                yield from _nodes(attr.g)
            for g in attr.graphs:
                yield from _nodes(g)


def _has_subgraph(node: Any) -> bool:
    return any(a.g.node or a.graphs for a in node.attribute)


def _tensor_bytes(t: Any) -> int:
    """Bytes of a TensorProto's data, without materializing it."""
    from onnx import helper

    if t.raw_data:
        return len(t.raw_data)
    n = 1
    for d in t.dims:
        n *= d
    try:
        itemsize = helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        itemsize = 4
    return n * itemsize


def _load(model_or_path: Any) -> tuple[Any, str]:
    """(ModelProto with every tensor in memory, where it came from)."""
    import onnx
    from google.protobuf.message import DecodeError

    if isinstance(model_or_path, onnx.ModelProto):
        external = [t.name for t in model_or_path.graph.initializer
                    if t.data_location == onnx.TensorProto.EXTERNAL]
        if external:
            raise ModelError(
                f"the model's tensors {external[:3]} live in external files that an in-memory "
                "model cannot locate: pass the .onnx file's path as `model_or_path=` (its "
                "external data files next to it)", field="model_or_path")
        model = onnx.ModelProto()
        model.CopyFrom(model_or_path)
        return model, "the in-memory model"
    path = Path(model_or_path)
    if not path.is_file():
        raise ModelError(f"ONNX model {path} does not exist", field="model_or_path")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except (FileNotFoundError, OSError) as e:
        raise ModelError(f"{path.name} refers to external tensor data that cannot be read "
                         f"({e}): keep the data files in {path.parent} with the names the "
                         "model records", field="model_or_path") from None
    except (DecodeError, RuntimeError, ValueError) as e:
        raise ModelError(f"{path} is not a readable ONNX model ({e})",
                         field="model_or_path") from None
    return model, path.name


def _float_dtype(model: Any) -> str:
    """The commonest float dtype among weights and graph inputs ("float32", "float16", …)."""
    from onnx import TensorProto, helper

    floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)
    kinds = Counter(t.data_type for t in model.graph.initializer if t.data_type in floats)
    kinds.update(vi.type.tensor_type.elem_type for vi in model.graph.input
                 if vi.type.tensor_type.elem_type in floats)
    if not kinds:
        return "float32"
    code = kinds.most_common(1)[0][0]
    return "bfloat16" if code == TensorProto.BFLOAT16 else str(
        helper.tensor_dtype_to_np_dtype(code))


def _drop_initializer_inputs(model: Any) -> str | None:
    inits = {t.name for t in model.graph.initializer}
    keep = [vi for vi in model.graph.input if vi.name not in inits]
    dropped = len(model.graph.input) - len(keep)
    if not dropped:
        return None
    del model.graph.input[:]
    model.graph.input.extend(keep)
    note = ""
    if model.ir_version < 4:  # IR 3 requires every initializer to be an input
        note = f"; IR version {model.ir_version} → 4"
        model.ir_version = 4
    return f"removed {dropped} initializers also listed as graph inputs{note}"


def _elem_type(model: Any, name: str) -> int:
    """The element type of tensor ``name`` (float when nothing declares it)."""
    from onnx import TensorProto

    for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        if vi.name == name and vi.type.tensor_type.elem_type:
            return vi.type.tensor_type.elem_type
    for t in model.graph.initializer:
        if t.name == name:
            return t.data_type
    return TensorProto.FLOAT


def _repair_erfc(model: Any) -> str | None:
    """tf2onnx writes exact GELU with ``Erfc``, which is no ONNX op: use ``1 - Erf(x)``."""
    from onnx import helper

    bad = {k for k, n in enumerate(model.graph.node)
           if n.op_type == "Erfc" and n.domain in _DEFAULT_DOMAINS}
    if not bad:
        return None
    if len(model.graph.node) < 50_000:  # types for the constant 1 (cheap on such graphs)
        import onnx

        with_types = onnx.shape_inference.infer_shapes(model)
        del model.graph.value_info[:]
        model.graph.value_info.extend(with_types.graph.value_info)
    nodes = []
    for k, n in enumerate(model.graph.node):
        if k not in bad:
            nodes.append(n)
            continue
        one, erf = f"{n.output[0]}__one", f"{n.output[0]}__erf"
        model.graph.initializer.append(helper.make_tensor(
            one, _elem_type(model, n.input[0]), [], [1]))
        nodes += [helper.make_node("Erf", [n.input[0]], [erf], name=f"{n.name}__erf"),
                  helper.make_node("Sub", [one, erf], list(n.output), name=n.name)]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return f"replaced {len(bad)} Erfc nodes (not an ONNX op; tf2onnx writes them for exact " \
           "GELU) by 1 - Erf(x)"


def _constant_nodes(model: Any) -> list[int]:
    """Indices of the top-level nodes computable from initializers alone (the graph is
    topologically sorted, as ONNX requires)."""
    const = {t.name for t in model.graph.initializer}
    picked = []
    for k, node in enumerate(model.graph.node):
        if (node.domain not in _DEFAULT_DOMAINS or node.op_type in _NEVER_FOLD
                or node.op_type.startswith("Sequence") or _has_subgraph(node)):
            continue
        if all(i in const for i in node.input if i):
            picked.append(k)
            const.update(o for o in node.output if o)
    # A lone Constant feeding live nodes is already as constant as it gets: leave it.
    nodes = model.graph.node
    fed = {i for k in picked for i in nodes[k].input}
    return [k for k in picked
            if nodes[k].op_type != "Constant" or any(o in fed for o in nodes[k].output)]


def _consumed(graph: Any) -> set[str]:
    names = {i for n in _nodes(graph) for i in n.input if i}
    return names | {o.name for o in graph.output}


def _evaluate(model: Any, nodes: list[Any], wanted: list[str]) -> tuple[dict[str, Any], str]:
    """(values of ``wanted`` computed by ``nodes`` from the model's initializers, evaluator)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    made = {o for n in nodes for o in n.output}
    needed = {i for n in nodes for i in n.input if i and i not in made}
    inits = [t for t in model.graph.initializer if t.name in needed]
    # Initializers go in as feeds, so the sub-model stays small whatever the weights weigh.
    feeds = {t.name: numpy_helper.to_array(t) for t in inits}
    graph = helper.make_graph(
        list(nodes), "constants",
        [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits],
        [onnx.ValueInfoProto(name=w) for w in wanted])
    sub = helper.make_model(graph, opset_imports=list(model.opset_import))
    sub.ir_version = max(model.ir_version, 4)
    errors = []
    try:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.log_severity_level = 3
        sess = ort.InferenceSession(sub.SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
        return dict(zip(wanted, sess.run(wanted, feeds), strict=True)), "onnxruntime"
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        errors.append(f"onnxruntime: {e}")
    try:
        from onnx.reference import ReferenceEvaluator

        outs = ReferenceEvaluator(sub).run(wanted, feeds)
        values = {w: np.asarray(v) for w, v in zip(wanted, outs, strict=True)}
        return values, "the onnx reference evaluator"
    except Exception as e:  # noqa: BLE001 - the reference evaluator raises anything
        errors.append(f"onnx reference evaluator: {e}")
    node = _blame(nodes, " ".join(errors))
    raise _FoldError(node, "; ".join(errors))


class _FoldError(Exception):
    def __init__(self, node: Any, detail: str) -> None:
        super().__init__(detail)
        self.node = node
        self.detail = detail


def _blame(nodes: Any, message: str) -> Any:
    """The node an error message talks about: by name, then by a tensor it touches."""
    nodes = list(nodes)
    for n in nodes:
        if n.name and re.search(rf"(?<![\w/.:-]){re.escape(n.name)}(?![\w/.:-])", message):
            return n
    for n in nodes:
        if any(t and re.search(rf"(?<![\w/.:-]){re.escape(t)}(?![\w/.:-])", message)
               for t in [*n.output, *n.input]):
            return n
    for n in nodes:
        if re.search(rf"\b{re.escape(n.op_type)}\b", message):
            return n
    return nodes[0] if nodes else None


def _fold(model: Any) -> str | None:
    from onnx import numpy_helper

    folded = set(_constant_nodes(model))
    if not folded:
        return None
    nodes = [n for k, n in enumerate(model.graph.node) if k in folded]
    live = [n for k, n in enumerate(model.graph.node) if k not in folded]
    live_inputs = {i for n in live for i in n.input} | _consumed_subgraphs(live)
    live_inputs |= {o.name for o in model.graph.output}
    wanted = sorted({o for n in nodes for o in n.output if o in live_inputs})
    values, evaluator = _evaluate(model, nodes, wanted)
    del model.graph.node[:]
    model.graph.node.extend(live)
    model.graph.initializer.extend(numpy_helper.from_array(v, w) for w, v in values.items())
    used = _consumed(model.graph)
    inits = model.graph.initializer
    # Deleted in place: re-adding kept tensors would copy them (and fail above 2 GB).
    unused = [k for k, t in enumerate(inits) if t.name not in used]
    for k in reversed(unused):
        del inits[k]
    kinds = Counter(n.op_type for n in nodes)
    what = ", ".join(f"{k} x{c}" for k, c in kinds.most_common(4))
    more = "" if len(kinds) <= 4 else f", +{len(kinds) - 4} more kinds"
    return (f"folded {len(nodes)} constant nodes ({what}{more}) into {len(values)} "
            f"initializers with {evaluator}; dropped {len(unused)} initializers only they used")


def _consumed_subgraphs(nodes: list[Any]) -> set[str]:
    names: set[str] = set()
    for n in nodes:
        for a in n.attribute:
            for g in (a.g, *a.graphs):  # a.g is empty for non-graph attributes
                names |= _consumed(g)
    return names


def _detach(model: Any) -> dict[str, bytes]:
    """Move large raw tensors out of the proto (the converter serializes it: 2 GB limit)."""
    kept = {}
    for t in model.graph.initializer:
        if t.raw_data and len(t.raw_data) > _DETACH_BYTES:
            kept[t.name] = t.raw_data
            t.ClearField("raw_data")  # dims stay: shape inference still sees the shape
    return kept


def _attach(model: Any, kept: dict[str, bytes]) -> None:
    for t in model.graph.initializer:
        if t.name in kept:
            t.raw_data = kept.pop(t.name)


def _convert(model: Any, target: int) -> Any:
    from onnx import version_converter

    kept = _detach(model)
    try:
        converted = version_converter.convert_version(model, target)
    except Exception:
        _attach(model, kept)  # the caller still names nodes from it
        raise
    _attach(converted, kept)
    if kept:  # the converter renamed or rebuilt them: do not ship empty weights
        raise RuntimeError(f"the converter rebuilt tensors {sorted(kept)[:3]}")
    return converted


def _fail(what: str, node: Any, detail: str, steps: list[str], source: str,
          todo: str) -> ModelError:
    where = (f" at node '{node.name or '(unnamed)'}' ({node.op_type})" if node is not None
             else "")
    tried = "; ".join(steps) if steps else "nothing changed yet"
    detail = detail.strip().splitlines()[0][:400].rstrip(". ") if detail.strip() else "no detail"
    return ModelError(f"{source}: {what}{where}: {detail}. Steps done before: {tried}. {todo}",
                      stage="onnx-intake", node=getattr(node, "name", None),
                      op_type=getattr(node, "op_type", None))


def prepare_onnx(model_or_path: Any, *, target_opset: int | None = None,
                 log: Log | None = None) -> IntakeResult:
    """Load, clean, fold and (only when ``target_opset`` is higher) convert an ONNX model.

    ``target_opset`` is the lowest default-domain opset the chosen optimization needs; a model at
    or above it keeps its opset. ``log`` receives one line per step.
    """
    import onnx

    log = log or _quiet
    model, source = _load(model_or_path)
    before = _opset(model)
    if before < MIN_OPSET:
        raise ModelError(f"{source} uses ONNX opset {before}; onnxruntime runs opset "
                         f"{MIN_OPSET} and newer, and no converter reaches it from below",
                         stage="onnx-intake")
    steps: list[str] = []
    notes: list[str] = []
    custom = Counter(f"{n.domain}:{n.op_type}" for n in _nodes(model.graph)
                     if n.domain not in _STANDARD_DOMAINS)
    if custom:
        notes.append("custom-domain ops kept as they are (never folded or converted): "
                     + ", ".join(f"{k} x{c}" for k, c in sorted(custom.items())))
    dtype = _float_dtype(model)
    if dtype != "float32":
        notes.append(f"{dtype} model: weights and inputs stay {dtype}")
    external = sum(_tensor_bytes(t) for t in model.graph.initializer)
    if external > EXTERNAL_DATA_THRESHOLD:
        notes.append(f"{external / 1e9:.2f} GB of tensors: save with save_onnx (external data)")

    def step(text: str | None) -> None:
        if text:
            steps.append(text)
            log(text)

    step(_drop_initializer_inputs(model))
    step(_repair_erfc(model))
    try:
        step(_fold(model))
    except _FoldError as e:
        raise _fail("cannot fold the constant subgraph", e.node, e.detail, steps, source,
                    "Neither onnxruntime nor the onnx reference evaluator computes that node "
                    "from its constant inputs: check its inputs' shapes and dtypes") from None
    after = before
    if target_opset is not None and target_opset > before:
        try:
            model = _convert(model, target_opset)
        except Exception as e:  # noqa: BLE001 - the converter raises RuntimeError/ValueError/...
            node = _blame(_nodes(model.graph), str(e))
            raise _fail(f"cannot convert opset {before} → {target_opset}", node, str(e),
                        steps, source, f"The model runs as it is at opset {before}: choose an "
                        f"optimization that does not need opset {target_opset} (`target_opset=`"
                        " None keeps the opset), or fix the node named") from None
        after = target_opset
        step(f"converted opset {before} → {after}")
    if external <= EXTERNAL_DATA_THRESHOLD:
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as e:
            node = _blame(_nodes(model.graph), str(e))
            raise _fail("the cleaned graph is not valid ONNX", node, str(e), steps,
                        source, "Fix the node named in the source model") from None
    return IntakeResult(model=model, steps=tuple(steps), opset_before=before,
                        opset_after=after, notes=tuple(notes), float_dtype=dtype,
                        custom_ops=tuple(sorted(custom)))


def save_onnx(model: Any, path: str | Path, *, external: bool | None = None) -> Path:
    """Write ``model`` to ``path``; tensor data goes to ``<name>.data`` beside it when the
    tensors weigh more than :data:`EXTERNAL_DATA_THRESHOLD` (or ``external=True``).

    The caller's proto is left untouched (its tensors stay in memory).
    """
    import onnx

    path = Path(path)
    size = sum(_tensor_bytes(t) for t in model.graph.initializer)
    if external is None:
        external = size > EXTERNAL_DATA_THRESHOLD
    if not external:
        onnx.save_model(model, str(path))
        return path
    location = f"{path.name}.data"
    (path.parent / location).unlink(missing_ok=True)  # onnx appends to an existing file
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=1024)
    return path
