"""Magnitude pruning: zero the smallest weights of Conv / Gemm / MatMul layers.

Two entry points:

* :func:`prune_onnx` prunes an ONNX model's weight initializers in one shot, no fine-tuning; the
  build's accuracy gate decides whether the result is kept.
* :func:`prune_keras` fine-tunes a Keras 3 model while a polynomial-decay schedule raises the
  sparsity from 0 to the target (a callback recomputes the masks every few steps and re-applies
  them after every batch), then returns the plain model with the pruned weights at zero.

:func:`sparsity_report` measures what pruning bought. Be clear about where the gain is: the
sparsity here is *unstructured*, and neither onnxruntime's nor TFLite's CPU kernels skip zeros,
so latency and RAM do not change. Zeros compress, so the deflated bundle — what is sent over
the air and stored on the device — shrinks. Removing whole channels (structured pruning) would
also cut compute; it is not implemented.
"""

from __future__ import annotations

import math
import os
import tempfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.agent.errors import DataError, ModelError

__all__ = ["PruneResult", "SparsityReport", "prune_onnx", "prune_keras", "sparsity_report",
           "polynomial_sparsity"]

PRUNABLE_OPS = ("Conv", "Gemm", "MatMul")
# Same deflate level as the bundle writer's ZIP_DEFLATED (zlib's default).
_DEFLATE_LEVEL = 6
# Fraction of the fine-tuning steps over which the sparsity ramps up; the rest recover at the
# final sparsity (reaching the target on the very last step would leave no time to recover).
_RAMP_FRACTION = 0.7
_SCHEDULE_POWER = 3  # the cubic ramp of Zhu & Gupta (2017), as in TF-MOT's PolynomialDecay
_KERAS_KERNELS = ("kernel", "depthwise_kernel", "pointwise_kernel")
_UNSTRUCTURED_NOTE = (
    "unstructured sparsity: onnxruntime and TFLite CPU kernels compute dense, so latency and RAM "
    "are unchanged; the gain is the compressed size (OTA transfer, storage on the device) — "
    "structured/channel pruning, which would also cut compute, is not implemented")

# op type -> (weight input index, weight zero-point input index or None). The quantized forms
# are only read (sparsity_report on a quantized bundle); pruning works on float weights.
_WEIGHT_INPUTS: dict[str, tuple[int, int | None]] = {
    "Conv": (1, None), "ConvTranspose": (1, None), "Gemm": (1, None), "MatMul": (1, None),
    "QLinearConv": (3, 5), "QLinearMatMul": (3, 5), "QGemm": (3, 5),
    "ConvInteger": (1, 3), "MatMulInteger": (1, 3),
}


@dataclass(frozen=True)
class PruneResult:
    """A pruned model and what was pruned.

    ``model_bytes`` is the model in its own format: ONNX for :func:`prune_onnx`, a ``.keras``
    archive for :func:`prune_keras`. ``per_layer`` maps each pruned weight to its op, shape,
    parameter count, zero count and sparsity. ``sparsity_achieved`` is over those weights only.
    """

    model_bytes: bytes = field(repr=False)
    sparsity_achieved: float
    per_layer: dict[str, dict]
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"sparsity_achieved": self.sparsity_achieved, "per_layer": self.per_layer,
                "notes": list(self.notes), "bytes": len(self.model_bytes)}


@dataclass(frozen=True)
class SparsityReport:
    """Sparsity of an ONNX model's weight layers and its deflated size (vs an unpruned baseline)."""

    per_layer: dict[str, dict]
    total_sparsity: float  # zeros / parameters over the weight layers
    weight_params: int
    model_bytes: int
    compressed_bytes: int
    baseline_bytes: int | None = None
    baseline_compressed_bytes: int | None = None
    compressed_ratio: float | None = None  # baseline compressed / this compressed (>1: smaller)
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["notes"] = list(self.notes)
        return d


def _check_sparsity(sparsity: float) -> float:
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        s = math.nan
    if not (0.0 < s < 1.0):
        raise ModelError(f"pruning sparsity must be strictly between 0 and 1 (got {sparsity!r}): "
                         "0.5 zeroes half of each weight layer, 0.8 four fifths", stage="prune")
    return s


def _magnitude_mask(w: np.ndarray, sparsity: float) -> np.ndarray:
    """True where ``w`` survives: the ``round(sparsity * size)`` smallest |w| are dropped."""
    k = int(round(sparsity * w.size))
    keep = np.ones(w.size, dtype=bool)
    if k > 0:
        keep[np.argpartition(np.abs(w).ravel(), k - 1)[:k]] = False
    return keep.reshape(w.shape)


def _masks_for(weights: Sequence[np.ndarray], sparsity: float, scope: str) -> list[np.ndarray]:
    """Keep-masks: per tensor (``"layer"``) or ranking all tensors together (``"global"``)."""
    if scope == "layer":
        return [_magnitude_mask(w, sparsity) for w in weights]
    keep = _magnitude_mask(np.concatenate([np.abs(w).ravel() for w in weights]), sparsity)
    bounds = np.cumsum([0] + [w.size for w in weights])
    return [keep[a:b].reshape(w.shape) for a, b, w in zip(bounds[:-1], bounds[1:], weights,
                                                          strict=True)]


def _emptied(per_layer: dict[str, dict]) -> list[str]:
    heavy = [f"{k} ({v['sparsity']:.0%})" for k, v in per_layer.items() if v["sparsity"] >= 0.99]
    return ([f"nearly emptied by global ranking: {', '.join(heavy[:5])}; if accuracy suffers, "
             "try scope='layer' or a lower sparsity"] if heavy else [])


def _check_scope(scope: str) -> None:
    if scope not in ("layer", "global"):
        raise ModelError(f"pruning scope must be 'global' or 'layer' (got {scope!r})",
                         stage="prune")


def _layer_entry(op: str, node: str, w: np.ndarray, zeros: int) -> dict:
    return {"op": op, "node": node, "shape": list(w.shape), "params": int(w.size),
            "zeros": int(zeros), "sparsity": float(zeros / w.size) if w.size else 0.0}


def _load_onnx(model_bytes: bytes) -> Any:
    import onnx

    try:
        return onnx.load_from_string(model_bytes)
    except Exception as exc:  # protobuf raises its own DecodeError
        raise ModelError(f"not a readable ONNX model ({str(exc)[:200]})", stage="prune") from None


def _weight_refs(model: Any, op_types: Sequence[str]) -> list[tuple[str, str, str, str | None]]:
    """(initializer name, op type, node name, zero-point initializer) of each weight, deduped.

    A weight is an initializer fed to the op directly, or through a DequantizeLinear (QDQ).
    """
    inits = {t.name for t in model.graph.initializer}
    dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    refs: dict[str, tuple[str, str, str, str | None]] = {}
    for node in model.graph.node:
        if node.op_type not in op_types or node.op_type not in _WEIGHT_INPUTS:
            continue
        w_idx, zp_idx = _WEIGHT_INPUTS[node.op_type]
        # MatMul: the weight is whichever operand is constant.
        candidates = [w_idx, 0] if node.op_type == "MatMul" else [w_idx]
        for idx in candidates:
            if idx >= len(node.input):
                continue
            name = node.input[idx]
            zp = (node.input[zp_idx] if zp_idx is not None and zp_idx < len(node.input)
                  and node.input[zp_idx] else None)
            if name in dq and dq[name].input[0] in inits:
                q = dq[name]
                name, zp = q.input[0], (q.input[2] if len(q.input) > 2 and q.input[2] else None)
            if name in inits:
                refs.setdefault(name, (name, node.op_type, node.name, zp))
                break
    return list(refs.values())


def prune_onnx(model_bytes: bytes, sparsity: float, *,
               op_types: Sequence[str] = PRUNABLE_OPS, scope: str = "global") -> PruneResult:
    """Zero the smallest-magnitude weights of the ``op_types`` layers of an ONNX model.

    ``scope="global"`` (default) ranks all weights of all those layers together, so each layer
    loses what it can spare (on the digits CNN one-shot 80% keeps accuracy within a point,
    where per-layer 80% loses 20 points); ``scope="layer"`` prunes every weight tensor to
    ``sparsity`` on its own. Biases and other ops are untouched, nothing is fine-tuned: run the accuracy gate on
    the result. Raises :class:`ModelError` for a sparsity outside (0, 1) or a model with no
    float weight initializer to prune.
    """
    from onnx import numpy_helper

    s = _check_sparsity(sparsity)
    _check_scope(scope)
    model = _load_onnx(model_bytes)
    by_name = {t.name: t for t in model.graph.initializer}
    weights: list[tuple[str, str, str, np.ndarray]] = []
    skipped = []
    for name, op, node, _zp in _weight_refs(model, op_types):
        w = numpy_helper.to_array(by_name[name])
        if w.dtype.kind != "f" or w.ndim < 2:
            skipped.append(name)
            continue
        weights.append((name, op, node, w))
    if not weights:
        raise ModelError(
            f"no float {'/'.join(op_types)} weight initializers to prune"
            + (f" ({len(skipped)} quantized or 1-D weight(s) skipped)" if skipped else "")
            + ": prune the float model before quantizing it", stage="prune")
    masks = _masks_for([w for *_, w in weights], s, scope)
    per_layer: dict[str, dict] = {}
    total = zeros = 0
    for (name, op, node, w), keep in zip(weights, masks, strict=True):
        pruned = np.where(keep, w, np.zeros_like(w))
        by_name[name].CopyFrom(numpy_helper.from_array(pruned, name))
        z = int((pruned == 0).sum())
        per_layer[name] = _layer_entry(op, node, pruned, z)
        total += pruned.size
        zeros += z
    how = ("each weight tensor separately" if scope == "layer" else
           "all weight tensors ranked together (global)")
    notes = [f"magnitude pruning of {len(weights)} {'/'.join(op_types)} weight tensor(s) to "
             f"{s:.0%} sparsity, {how}; biases untouched",
             "no fine-tuning: the accuracy gate decides whether the pruned model is kept "
             "(Keras models with training data can be fine-tuned with prune_keras)",
             _UNSTRUCTURED_NOTE]
    notes.extend(_emptied(per_layer))
    if skipped:
        notes.append(f"skipped {len(skipped)} quantized or 1-D weight(s): "
                     f"{', '.join(skipped[:5])}")
    return PruneResult(model.SerializeToString(), zeros / total, per_layer, tuple(notes))


def _deflated(data: bytes) -> int:
    return len(zlib.compress(data, _DEFLATE_LEVEL))


def _zero_point(model: Any, zp_name: str | None, w: np.ndarray, by_name: dict) -> Any:
    from onnx import numpy_helper

    if zp_name is None or zp_name not in by_name:
        return 0
    zp = numpy_helper.to_array(by_name[zp_name])
    if zp.size == 1 or np.all(zp == zp.flat[0]):
        return zp.flat[0]
    # Per-channel zero points: along axis 0 (output channels) of the weight.
    return zp.reshape(-1, *([1] * (w.ndim - 1))) if zp.size == w.shape[0] else zp.flat[0]


def sparsity_report(model_bytes: bytes, *, baseline: bytes | None = None,
                    op_types: Sequence[str] = tuple(_WEIGHT_INPUTS)) -> SparsityReport:
    """Per-layer and total sparsity of the weight layers, and the deflated size.

    Quantized models are read too (a weight equal to its zero point counts as zero). Compressed
    sizes use deflate at the level the bundle writer uses, so ``compressed_ratio`` (``baseline``
    deflated / this model deflated) is what pruning saves in the bundle's transfer and storage.
    """
    from onnx import numpy_helper

    model = _load_onnx(model_bytes)
    by_name = {t.name: t for t in model.graph.initializer}
    per_layer: dict[str, dict] = {}
    total = zeros = 0
    for name, op, node, zp_name in _weight_refs(model, op_types):
        w = numpy_helper.to_array(by_name[name])
        if w.ndim < 2:
            continue
        z = int((w == _zero_point(model, zp_name, w, by_name)).sum())
        per_layer[name] = _layer_entry(op, node, w, z)
        total += w.size
        zeros += z
    compressed = _deflated(model_bytes)
    notes = [_UNSTRUCTURED_NOTE]
    base_raw = base_comp = ratio = None
    if baseline is not None:
        base_raw, base_comp = len(baseline), _deflated(baseline)
        ratio = base_comp / compressed
        notes.insert(0, f"deflated {base_comp:,} → {compressed:,} bytes ({ratio:.2f}x smaller); "
                        f"uncompressed size {base_raw:,} → {len(model_bytes):,} bytes (zeros are "
                        "stored densely)")
    return SparsityReport(per_layer, zeros / total if total else 0.0, total, len(model_bytes),
                          compressed, base_raw, base_comp, ratio, tuple(notes))


def polynomial_sparsity(step: int, target: float, end_step: int, *,
                        power: int = _SCHEDULE_POWER) -> float:
    """Sparsity at ``step``: rises from 0 to ``target`` at ``end_step`` as 1 − (1 − t)^power."""
    if end_step <= 0 or step >= end_step:
        return target
    return target * (1.0 - (1.0 - max(step, 0) / end_step) ** power)


def _kernels(model: Any) -> list[tuple[Any, str]]:
    """(variable, layer class) of each prunable kernel (Conv*/Dense/Depthwise/Separable)."""
    seen: set[int] = set()
    out: list[tuple[Any, str]] = []

    def walk(layer: Any) -> None:
        for sub in getattr(layer, "layers", []):
            walk(sub)
        for v in layer.trainable_weights:
            leaf = v.path.rsplit("/", 1)[-1]
            if leaf in _KERAS_KERNELS and len(v.shape) >= 2 and id(v) not in seen:
                seen.add(id(v))
                out.append((v, type(layer).__name__))

    walk(model)
    return out


def _ends_in_softmax(model: Any) -> bool:
    act = getattr(model.layers[-1], "activation", None) if model.layers else None
    return getattr(act, "__name__", "") == "softmax" or type(model.layers[-1]).__name__ == "Softmax"


def _default_loss(model: Any, y: np.ndarray) -> Any:
    import keras

    logits = not _ends_in_softmax(model)
    if y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1):
        if y.dtype.kind in "iu":
            return keras.losses.SparseCategoricalCrossentropy(from_logits=logits)
        return keras.losses.MeanSquaredError()
    return keras.losses.CategoricalCrossentropy(from_logits=logits)


def _copy_model(model: Any) -> tuple[Any, bool]:
    """A copy with the same weights (the caller's model stays dense), or the model itself."""
    import keras

    try:
        clone = keras.models.clone_model(model)
        clone.set_weights(model.get_weights())
        return clone, True
    except Exception:  # subclassed models cannot be cloned
        return model, False


def _keras_bytes(model: Any) -> bytes:
    with tempfile.TemporaryDirectory(prefix="edgepack-prune-") as tmp:
        path = Path(tmp) / "pruned.keras"
        model.save(path)
        return path.read_bytes()


class _Masks:
    """Magnitude masks for a list of Keras variables, recomputed on demand."""

    def __init__(self, variables: list[Any], scope: str) -> None:
        self.variables = variables
        self.scope = scope
        self.masks = [np.ones(tuple(v.shape), dtype=bool) for v in variables]

    def update(self, sparsity: float) -> None:
        weights = [np.asarray(v.numpy()) for v in self.variables]
        self.masks = _masks_for(weights, sparsity, self.scope)
        self.apply()

    def apply(self) -> None:
        for v, m in zip(self.variables, self.masks, strict=True):
            v.assign(np.where(m, v.numpy(), 0).astype(v.dtype))


def _prune_callback(masks: _Masks, schedule: Callable[[int], float], frequency: int,
                    end_step: int) -> Any:
    import keras

    class PruneSchedule(keras.callbacks.Callback):
        """Raise the masks' sparsity on schedule; keep pruned weights at zero after each step."""

        def __init__(self) -> None:
            super().__init__()
            self.step = 0

        def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
            if self.step <= end_step and (self.step % frequency == 0 or self.step == end_step):
                masks.update(schedule(self.step))

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            # The optimizer moved every weight; put the pruned ones back to zero.
            masks.apply()
            self.step += 1

    return PruneSchedule()


def prune_keras(model: Any, sparsity: float, train: tuple[np.ndarray, np.ndarray], *,
                epochs: int = 2, schedule: str = "polynomial", batch_size: int = 32,
                learning_rate: float = 1e-3, frequency: int | None = None,
                scope: str = "global", loss: Any = None, seed: int = 0) -> tuple[Any, PruneResult]:
    """Magnitude-prune a Keras 3 model's kernels while fine-tuning it on ``train``.

    ``schedule="polynomial"``: sparsity rises from 0 to ``sparsity`` as a cubic over the first
    70% of the fine-tuning steps (masks recomputed every ``frequency`` steps, default ~10
    updates), the rest fine-tune at the final sparsity. ``"constant"``: prune to the target at
    once, then fine-tune with the mask fixed. ``epochs=0`` prunes one-shot without fine-tuning.
    Every mask is re-applied after each batch. Kernels only (biases kept); ``scope`` as in
    :func:`prune_onnx`.

    Returns a copy of the model (the argument stays dense; subclassed models that cannot be
    cloned are pruned in place) compiled with a fresh optimizer and no pruning machinery left:
    the zeros are plain weights, so any converter keeps them. ``PruneResult.model_bytes`` is
    the ``.keras`` archive of that model. ``loss`` defaults to sparse/categorical cross-entropy
    (from logits unless the last layer is a softmax), MSE for float 1-D targets.
    """
    import keras

    s = _check_sparsity(sparsity)
    if schedule not in ("polynomial", "constant"):
        raise ModelError(f"pruning schedule must be 'polynomial' or 'constant' (got "
                         f"{schedule!r})", stage="prune")
    _check_scope(scope)
    if epochs < 0:
        raise ModelError(f"epochs must be 0 or more (got {epochs})", stage="prune")
    x, y = (np.asarray(a) for a in train)
    if len(x) != len(y) or len(x) == 0:
        raise DataError(f"pruning fine-tune data: {len(x)} inputs vs {len(y)} labels; give the "
                        "same non-zero number of each", stage="prune")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    keras.utils.set_random_seed(seed)
    pruned, copied = _copy_model(model)
    kernels = _kernels(pruned)
    if not kernels:
        raise ModelError("the Keras model has no Conv/Dense kernels to prune", stage="prune")
    masks = _Masks([v for v, _ in kernels], scope)
    loss = loss or _default_loss(pruned, y)
    notes = []
    steps_per_epoch = math.ceil(len(x) / batch_size)
    total_steps = epochs * steps_per_epoch
    if total_steps:
        end_step = 0 if schedule == "constant" else max(1, int(total_steps * _RAMP_FRACTION))
        freq = frequency or max(1, end_step // 10)

        def sched(step: int) -> float:
            return polynomial_sparsity(step, s, end_step)

        pruned.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss)
        pruned.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0, shuffle=True,
                   callbacks=[_prune_callback(masks, sched, freq, end_step)])
        if schedule == "polynomial":
            notes.append(f"fine-tuned {total_steps} steps ({epochs} epoch(s)); sparsity rose "
                         f"0 → {s:.0%} on a cubic polynomial schedule over the first {end_step} "
                         f"steps (masks every {freq} steps), then held")
        else:
            notes.append(f"pruned to {s:.0%} at once, then fine-tuned {total_steps} steps "
                         f"({epochs} epoch(s)) with the mask fixed")
    else:
        notes.append("one-shot magnitude pruning, no fine-tuning (epochs=0)")
    masks.update(s)  # exact final sparsity (no-op when the schedule already reached it)
    # "Strip": nothing wraps the layers, so only the fine-tuning optimizer state is dropped.
    pruned.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss,
                   metrics=["accuracy"] if not isinstance(loss, keras.losses.MeanSquaredError)
                   else None)
    pruned.optimizer.build(pruned.trainable_variables)  # saves and loads without warnings
    per_layer, total, zeros = {}, 0, 0
    for v, layer_type in kernels:
        w = np.asarray(v.numpy())
        z = int((w == 0).sum())
        per_layer[v.path] = _layer_entry(layer_type, v.path.rsplit("/", 1)[0], w, z)
        total += w.size
        zeros += z
    how = "each to" if scope == "layer" else "ranked together (global) to"
    notes.append(f"magnitude pruning of {len(kernels)} kernel(s), {how} {s:.0%}; biases "
                 "untouched; the returned model has no pruning wrappers (weights stay zero)")
    notes.extend(_emptied(per_layer))
    if not copied:
        notes.append("the model could not be cloned (subclassed?): it was pruned in place")
    notes.append(_UNSTRUCTURED_NOTE)
    return pruned, PruneResult(_keras_bytes(pruned), zeros / total, per_layer, tuple(notes))
