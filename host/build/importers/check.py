"""Facts about a converted ONNX graph, and checking a conversion against its source model.

Converted models are run once in onnxruntime next to the source model on a few inputs, so a
conversion that changes the model's outputs fails here instead of silently becoming the
accuracy gate's float reference. Models whose ONNX graph has nothing with an int8 kernel (tree
ensembles above all) are float-only: the engine keeps them float and says so.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.agent.errors import ModelError
from edgepack.host.build.importers.base import first_line

__all__ = ["VERIFY_SAMPLES", "default_opset", "float_only", "load_onnx", "op_types",
           "random_feeds", "verify"]

# Relative difference (to the output's magnitude) above which a conversion counts as broken.
_VERIFY_TOL = 1e-3
VERIFY_SAMPLES = 16

# ONNX ops onnxruntime's quantizer gives int8 kernels; a graph with none of them gains nothing
# from quantization, so it stays float.
_INT8_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "Attention", "LSTM", "GRU",
                       "Gather", "EmbedLayerNormalization", "Einsum"})
_TREE_OPS = frozenset({"TreeEnsembleClassifier", "TreeEnsembleRegressor", "TreeEnsemble"})


def load_onnx(path: Path) -> Any:
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise ModelError(f"{path} is not a readable ONNX model ({type(exc).__name__}). Is it "
                         "truncated, or a different format? Export it again.",
                         stage="import") from None


def op_types(graph: Any) -> Iterator[str]:
    """Op types of a graph and of its subgraphs (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node.op_type
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from op_types(attr.g)
            for g in attr.graphs:
                yield from op_types(g)


def default_opset(model: Any) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def float_only(model: Any, what: str) -> str | None:
    """Why ``model`` must stay float, or None when it has int8-quantizable ops."""
    ops = set(op_types(model.graph))
    trees = sorted(ops & _TREE_OPS)
    if trees:
        return (f"{what}: tree ensemble (ONNX {', '.join(trees)}), kept float32 "
                "(no int8 kernels for tree ensembles)")
    if ops and not ops & _INT8_OPS:
        return (f"{what}: its ONNX ops ({', '.join(sorted(ops))}) have no int8 kernels, "
                "kept float32")
    return None


def verify(onnx_path: Path, reference: Callable[[dict[str, np.ndarray]], Sequence[Any]],
            feeds: dict[str, np.ndarray], what: str) -> str:
    """Run the ONNX model and the source model on ``feeds``; fail if their outputs disagree.

    ``reference`` returns the source model's outputs in ONNX output order; an entry of None is
    not compared (e.g. class labels, reported as an agreement rate instead).
    """
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        got = sess.run(None, feeds)
    except Exception as exc:
        raise ModelError(f"the ONNX model converted from {what} does not run in onnxruntime: "
                         f"{first_line(exc)}", stage="import") from None
    try:
        want = reference(feeds)
    except Exception as exc:  # e.g. a transformer that rejects random inputs, several outputs
        return f"conversion not checked against {what}: {first_line(exc)}"
    n = len(next(iter(feeds.values())))
    worst = 0.0
    parts = []
    for out, g, w in zip(sess.get_outputs(), got, want, strict=False):
        if w is None:
            continue
        g, w = np.asarray(g), np.asarray(w)
        if g.dtype.kind in "iuUSOb" or w.dtype.kind in "iuUSOb":
            agree = float(np.mean(g.reshape(-1) == w.reshape(-1).astype(g.dtype)))
            parts.append(f"{out.name} agree on {agree:.0%}")
            continue
        if g.size != w.size:
            raise ModelError(f"ONNX output '{out.name}' has shape {g.shape} but {what} gives "
                             f"{w.shape}: the conversion is broken", stage="import")
        diff = float(np.max(np.abs(g.reshape(-1).astype(np.float64) - w.reshape(-1))))
        scale = 1.0 + float(np.max(np.abs(w)))
        if diff > _VERIFY_TOL * scale:
            raise ModelError(f"the ONNX model does not reproduce {what}: output '{out.name}' "
                             f"differs by up to {diff:.3g} on {n} check inputs. The converter "
                             "mishandled this model; report it upstream, or export ONNX "
                             "yourself and build that.", stage="import")
        worst = max(worst, diff)
    detail = "; ".join([f"max |Δ| {worst:.2g}", *parts])
    return f"checked: ONNX matches {what} on {n} inputs ({detail})"


def random_feeds(onnx_path: Path, batch: int = VERIFY_SAMPLES) -> dict[str, np.ndarray]:
    """Random inputs shaped like the model's (dynamic dims → ``batch`` first, 1 elsewhere)."""
    from edgepack.host.build.convert_onnx import tensor_specs

    ins, _ = tensor_specs(load_onnx(onnx_path))
    rng = np.random.default_rng(0)
    feeds = {}
    for s in ins:
        shape = tuple((batch if i == 0 else 1) if d is None else d for i, d in enumerate(s.shape))
        dt = np.dtype(s.dtype)
        feeds[s.name] = (rng.random(shape).astype(dt) if dt.kind == "f"
                         else rng.integers(0, 2, shape).astype(dt))
    return feeds
