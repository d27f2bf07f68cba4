"""The drift reference profile: what the model saw and answered on the build's own data.

:func:`make_reference` takes the build's inputs (calibration and eval samples) and the model's
outputs on them, decides what a device should sketch (a :class:`~edgepack.agent.drift.DriftSpec`)
and summarises the data the same way, with larger sketches. The result is a JSON document meant
for the bundle member ``drift.json``: the spec the device reads, and per figure the reference
numbers the fleet server judges windows against (``docs/drift.md``).

How inputs are read (``kinds=`` and ``layouts=`` override by input name):

* rank ≥ 3 → ``image``: 4-D tensors whose last axis has 1, 3 or 4 entries are NHWC, else those
  whose axis 1 has are NCHW; anything else is one channel over all values (``N...``);
* integer rank ≤ 2 → ``tokens`` (ids counted in equal-width buckets of the vocabulary);
* float rank ≤ 2 → ``tabular``: at most ``max_features`` columns, the ones with the largest
  variance on the reference data (the document's ``notes`` say which were left out).

Quantized tensors (``quantization=``: a TFLite model's int8/uint8 inputs and outputs, by name)
are read and sketched in float terms, ``(q - zero_point) * scale``: the spec carries the scale
and zero point, so a device dequantizes what its model takes and returns the same way.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from edgepack.agent.drift import (
    DEFAULT_K,
    DEFAULT_MAX_ROWS,
    DEFAULT_PIXELS_PER_ROW,
    DEFAULT_SAMPLE_RATE,
    REFERENCE_MEMBER,
    REFERENCE_SCHEMA,
    DriftSpec,
    InputSpec,
    OutputSpec,
    dequantize,
    extract_figures,
)
from edgepack.agent.errors import DataError

if TYPE_CHECKING:
    from edgepack.host.build.data import Dataset, TensorSpec
    from edgepack.host.build.validate import Outputs

__all__ = [
    "NO_DRIFT_DATA",
    "REFERENCE_MEMBER",
    "REFERENCE_K",
    "DriftSample",
    "Quantization",
    "drift_sample",
    "make_reference",
    "reference_member",
    "spec_from_reference",
    "reference_json",
]

# The reference is sketched once and shipped once: k=200 (rank error 1.3 %) costs ~2.5 KB a sketch.
REFERENCE_K = 200
# PSI bins: the reference's quintiles. A window sketch of k=32 misplaces up to a few percent of
# rank, which decile bins (10 % each) would turn into PSI noise; quintiles keep it small. Bins of
# discrete data (pixels in 1/16 steps) under 10 % of the mass are merged into a neighbour.
_PSI_QUANTILES = (0.2, 0.4, 0.6, 0.8)
_MIN_BIN_MASS = 0.1
_TASKS = ("classification", "regression")
# Why a build without calibration or eval data has no drift.json.
NO_DRIFT_DATA = "no calibration or eval data (random inputs say nothing of the field)"
# Below this many rows the reference's quintile edges are too coarse to judge windows against.
MIN_REFERENCE_ROWS = 20


# (scale, zero_point) of a quantized tensor, by tensor name
Quantization = Mapping[str, tuple[float, int]]


@dataclass(frozen=True)
class DriftSample:
    """What a build profiles: its inputs by name and the optimized model's outputs on them.

    ``quantization``: ``(scale, zero_point)`` of the tensors given as the model's own int8/uint8
    values (a TFLite model with integer I/O), by name; the others are float already.
    """

    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    quantization: dict[str, tuple[float, int]] = field(default_factory=dict)


def drift_sample(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 sets: Sequence[tuple[Dataset, Outputs]], *,
                 quantization: Quantization | None = None) -> DriftSample | None:
    """Stack the build's datasets (calibration, eval) with the model's outputs on each.

    Outputs that are not tensors are left out; None when no output is a tensor.
    ``quantization`` names the quantized tensors the sets hold as integers (see
    :class:`DriftSample`).
    """
    ins: dict[str, list[np.ndarray]] = {s.name: [] for s in inputs}
    outs: dict[str, list[np.ndarray]] = {}
    for data, produced in sets:
        arrays = [(s.name, a) for s, a in zip(outputs, produced.arrays, strict=True)
                  if a is not None]
        if not arrays:
            return None
        rows = min(len(a) for _, a in arrays)  # a batch > 1 drops the last partial batch
        for name in ins:
            ins[name].append(np.asarray(data.inputs[name])[:rows])
        for name, a in arrays:
            outs.setdefault(name, []).append(a[:rows])
    if not outs:
        return None
    return DriftSample({k: np.concatenate(v) for k, v in ins.items()},
                       {k: np.concatenate(v) for k, v in outs.items()}, dict(quantization or {}))


def reference_member(sample: DriftSample | None, *, why_not: str = "") -> tuple[dict, dict]:
    """The bundle member ``drift.json`` for ``sample`` and the build report's ``drift`` entry.

    Returns ``({}, {"skipped": reason})`` when the build's data cannot give a reference (no
    sample, too few rows, nothing of a supported kind): drift.json is optional.
    """
    if sample is None:
        return {}, {"skipped": why_not or "the model's outputs are not tensors"}
    rows = min((len(a) for a in (*sample.inputs.values(), *sample.outputs.values())), default=0)
    if rows < MIN_REFERENCE_ROWS:
        return {}, {"skipped": f"{rows} samples of calibration/eval data; a drift reference "
                               f"needs at least {MIN_REFERENCE_ROWS}"}
    quant = sample.quantization
    outs = _float_terms(sample.outputs, quant)
    task = "classification" if any(_class_output(a) for a in outs.values()) else "regression"
    try:
        ref = make_reference(sample.inputs, sample.outputs, task=task, quantization=quant)
    except DataError as e:
        return {}, {"skipped": str(e)}
    entry = {"member": REFERENCE_MEMBER, "id": ref["id"], "task": task, "rows": ref["rows"],
             "figures": len(ref["figures"]), "notes": ref["notes"]}
    if quant:
        entry["dequantized"] = sorted(quant)
    return {REFERENCE_MEMBER: reference_json(ref)}, entry


def _class_output(a: np.ndarray) -> bool:
    """Scores ``[N, C>1]`` or integer labels ``[N]``: the model classifies."""
    return (a.dtype.kind == "f" and a.ndim == 2 and a.shape[1] > 1) or \
        (a.dtype.kind in "iu" and a.ndim == 1)


def make_reference(inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], *,
                   task: str, classes: Sequence[int] | None = None, max_features: int = 16,
                   k: int = DEFAULT_K, reference_k: int = REFERENCE_K,
                   sample_rate: float = DEFAULT_SAMPLE_RATE, max_rows: int = DEFAULT_MAX_ROWS,
                   pixels_per_row: int = DEFAULT_PIXELS_PER_ROW, token_buckets: int = 32,
                   layouts: Mapping[str, str] | None = None,
                   kinds: Mapping[str, str] | None = None,
                   vocab: Mapping[str, int] | None = None,
                   quantization: Quantization | None = None) -> dict:
    """Build the reference profile from samples keyed by input name and the model's outputs.

    ``task`` is ``classification`` or ``regression``; ``classes`` lists the integer class labels
    when the model emits labels (default: the labels seen). ``k`` and ``sample_rate`` are what the
    devices will use per window; ``reference_k`` sizes the reference's own sketches.
    ``quantization`` gives ``(scale, zero_point)`` of tensors passed as quantized integers:
    they are profiled dequantized, and the spec tells devices to do the same.
    Raises :class:`DataError` naming the argument when the data cannot be profiled.
    """
    if task not in _TASKS:
        raise DataError(f"unknown drift task {task!r}: pass `task=` as one of {list(_TASKS)}",
                        field="task")
    rows = _batch_size(inputs, outputs)
    quant = dict(quantization or {})
    notes: list[str] = []
    in_specs = tuple(_input_spec(name, x, max_features=max_features,
                                 pixels_per_row=pixels_per_row, token_buckets=token_buckets,
                                 layout=(layouts or {}).get(name), kind=(kinds or {}).get(name),
                                 vocab=(vocab or {}).get(name), notes=notes)
                     for name, x in _float_terms(inputs, quant).items())
    out_specs = _output_specs(_float_terms(outputs, quant), task=task, classes=classes,
                              max_features=max_features, notes=notes)
    in_specs = tuple(_quantized(s, quant) for s in in_specs if s is not None)
    out_specs = tuple(_quantized(s, quant) for s in out_specs)
    spec = DriftSpec(in_specs, out_specs, k=k,
                     sample_rate=sample_rate, max_rows=max_rows)
    if not spec.figures:
        raise DataError("nothing to profile for drift: no input or output has a supported "
                        "shape and dtype; pass `kinds=` to say how to read them", field="kinds")
    figs = extract_figures(spec, inputs, outputs)
    labels = _labels(spec)
    figures: dict[str, dict] = {}
    for key, values in figs.values.items():
        figures[key] = _sketch_figure(values, rows=rows, reference_k=reference_k)
    for key, counts in figs.counts.items():
        figures[key] = {"kind": "counts", "rows": rows, "counts": [int(c) for c in counts]}
    for key, total in figs.sums.items():
        figures[key]["mean"] = round(total / rows, 6)
    for key in figures:
        figures[key]["label"] = labels[key]
    doc = {"schema": REFERENCE_SCHEMA, "task": task, "rows": rows, "spec": spec.to_dict(),
           "figures": dict(sorted(figures.items())), "notes": notes}
    doc["id"] = hashlib.sha256(reference_json(doc)).hexdigest()[:16]
    return doc


def _float_terms(arrays: Mapping[str, np.ndarray], quant: Quantization
                 ) -> dict[str, np.ndarray]:
    """The arrays with the quantized integer ones dequantized (as a device sketches them)."""
    out = {}
    for name, a in arrays.items():
        a = np.asarray(a)
        out[name] = dequantize(a, *quant[name]) if name in quant and a.dtype.kind in "iu" else a
    return out


def _quantized(s: InputSpec | OutputSpec, quant: Quantization) -> InputSpec | OutputSpec:
    """``s`` with the scale and zero point of its tensor, when it is a quantized one."""
    if s.name not in quant or s.kind in ("tokens", "labels"):
        return s
    scale, zero_point = quant[s.name]
    return replace(s, scale=float(scale), zero_point=int(zero_point))


def spec_from_reference(ref: Mapping) -> DriftSpec:
    """The :class:`DriftSpec` a device builds from this reference (as the agent reads it)."""
    return DriftSpec.from_reference(ref)


def reference_json(ref: Mapping) -> bytes:
    """Canonical bytes of a reference document (sorted keys, no spaces): the bundle member."""
    return json.dumps(ref, sort_keys=True, separators=(",", ":")).encode()


def _batch_size(inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> int:
    if not inputs:
        raise DataError("no inputs to profile: pass `inputs=` as arrays keyed by input name",
                        field="inputs")
    sizes = {name: np.asarray(a).shape[0] if np.ndim(a) else 1
             for name, a in {**inputs, **outputs}.items()}
    if len(set(sizes.values())) != 1 or min(sizes.values()) < 1:
        raise DataError(f"inputs and outputs must share their first (batch) axis, got {sizes}: "
                        "pass `outputs=` computed on exactly these `inputs=`", field="outputs")
    return next(iter(sizes.values()))


def _input_spec(name: str, x: np.ndarray, *, max_features: int, pixels_per_row: int,
                token_buckets: int, layout: str | None, kind: str | None, vocab: int | None,
                notes: list[str]) -> InputSpec | None:
    integer = np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_
    if not (integer or np.issubdtype(x.dtype, np.floating)):
        notes.append(f"{name}: dtype {x.dtype} is not sketched")
        return None
    kind = kind or ("image" if x.ndim >= 3 else "tokens" if integer else "tabular")
    if kind == "image":
        layout = layout or _layout(x.shape)
        channels = {"NHWC": x.shape[-1], "NCHW": x.shape[1] if x.ndim > 1 else 1}.get(layout, 1)
        return InputSpec(name, "image", layout=layout, channels=int(channels),
                         pixels_per_row=pixels_per_row)
    if kind == "tokens":
        size = int(vocab or (int(x.max()) + 1 if x.size else 1))
        return InputSpec(name, "tokens", vocab=max(size, 1),
                         buckets=max(1, min(token_buckets, size)))
    if kind != "tabular":
        raise DataError(f"unknown input kind {kind!r} for {name!r}: pass `kinds=` with "
                        "image, tabular or tokens", field="kinds")
    flat = x.reshape(x.shape[0], -1).astype(np.float64)
    chosen = _top_variance(flat, max_features)
    if len(chosen) < flat.shape[1]:
        notes.append(f"{name}: {len(chosen)} of {flat.shape[1]} features sketched (the "
                     f"{len(chosen)} with the largest reference variance)")
    return InputSpec(name, "tabular", features=chosen)


def _layout(shape: tuple[int, ...]) -> str:
    if len(shape) == 4 and shape[-1] in (1, 3, 4):
        return "NHWC"
    if len(shape) == 4 and shape[1] in (1, 3, 4):
        return "NCHW"
    return "N..."


def _top_variance(flat: np.ndarray, limit: int) -> tuple[int, ...]:
    var = np.nan_to_num(np.nanvar(flat, axis=0), nan=0.0)
    order = np.argsort(-var, kind="stable")[:max(limit, 1)]
    return tuple(sorted(int(j) for j in order))


def _output_specs(outputs: Mapping[str, np.ndarray], *, task: str,
                  classes: Sequence[int] | None, max_features: int,
                  notes: list[str]) -> tuple[OutputSpec, ...]:
    specs: list[OutputSpec] = []
    for name, raw in outputs.items():
        y = np.asarray(raw)
        flat = y.reshape(y.shape[0], -1) if y.ndim else y.reshape(1, 1)
        floating = np.issubdtype(y.dtype, np.floating)
        integer = np.issubdtype(y.dtype, np.integer)
        if task == "regression" and floating:
            specs.append(OutputSpec(name, "regression",
                                    columns=_top_variance(flat.astype(np.float64), max_features)))
        elif task == "classification" and floating:
            specs.append(_probability_spec(name, flat, classes))
        elif task == "classification" and integer and flat.shape[1] == 1:
            known = sorted({int(v) for v in (classes if classes is not None else flat[:, 0])})
            specs.append(OutputSpec(name, "labels", classes=len(known), labels=tuple(known)))
        else:
            notes.append(f"{name}: {y.dtype} output of shape {list(y.shape)} is not sketched")
    if any(s.kind == "probabilities" for s in specs) and any(s.kind == "labels" for s in specs):
        notes.extend(f"{s.name}: labels not sketched (the probabilities give the classes)"
                     for s in specs if s.kind == "labels")
        specs = [s for s in specs if s.kind != "labels"]
    return tuple(specs)


def _probability_spec(name: str, flat: np.ndarray, classes: Sequence[int] | None) -> OutputSpec:
    width = flat.shape[1]
    n_classes = max(width, 2)
    if classes is not None and len(classes) != n_classes:
        raise DataError(f"output {name!r} scores {n_classes} classes but `classes=` lists "
                        f"{len(classes)}", field="classes")
    in_unit = bool(np.all((flat >= 0) & (flat <= 1)))
    sums_to_one = width == 1 or bool(np.allclose(flat.sum(axis=1), 1.0, atol=1e-3))
    activation = "none" if in_unit and sums_to_one else "sigmoid" if width == 1 else "softmax"
    return OutputSpec(name, "probabilities", activation=activation, classes=n_classes)


def _labels(spec: DriftSpec) -> dict[str, str]:
    """Human names of the figures, for the dashboard and the verdict."""
    labels: dict[str, str] = {}
    for n, s in enumerate(spec.inputs):
        for c in range(s.channels):
            labels[f"i{n}.c{c}"] = f"{s.name}: channel {c} mean"
        labels[f"i{n}.px"] = f"{s.name}: pixel intensity"
        labels.update({f"i{n}.f{j}": f"{s.name}: feature {j}" for j in s.features})
        labels[f"i{n}.tok"] = f"{s.name}: token id buckets"
    for n, o in enumerate(spec.outputs):
        labels[f"o{n}.cls"] = f"{o.name}: predicted class"
        labels[f"o{n}.conf"] = f"{o.name}: top probability"
        labels.update({f"o{n}.v{j}": f"{o.name}: value {j}" for j in o.columns})
    return labels


def _sketch_figure(values: np.ndarray, *, rows: int, reference_k: int) -> dict:
    from datasketches import kll_floats_sketch

    v = np.asarray(values, dtype=np.float32)
    v = v[np.isfinite(v)]
    sketch = kll_floats_sketch(reference_k)
    sketch.update(v)
    if v.size == 0:
        edges: list[float] = []
        expected = [1.0]
    else:
        edges = _psi_edges(v)
        bins = np.searchsorted(np.asarray(edges, dtype=np.float32), v, side="left")
        expected = (np.bincount(bins, minlength=len(edges) + 1) / v.size).tolist()
    return {"kind": "sketch", "rows": rows, "n": int(v.size),
            "mean": round(float(v.mean()), 6) if v.size else 0.0,
            "std": round(float(v.std()), 6) if v.size else 0.0,
            "edges": edges, "expected": [round(e, 6) for e in expected],
            "sketch": base64.b64encode(sketch.serialize()).decode()}


def _psi_edges(v: np.ndarray) -> list[float]:
    """Quintile edges of the reference values, bins under ``_MIN_BIN_MASS`` merged away."""
    edges = np.unique(np.quantile(v, _PSI_QUANTILES).astype(np.float32))
    mass = np.bincount(np.searchsorted(edges, v, side="left"), minlength=len(edges) + 1) / v.size
    kept: list[float] = []
    acc = 0.0
    for edge, m in zip(edges, mass[:-1], strict=True):
        acc += m
        if acc >= _MIN_BIN_MASS:
            kept.append(float(edge))
            acc = 0.0
    if kept and acc + mass[-1] < _MIN_BIN_MASS:
        kept.pop()  # the last bin is too light: it joins the one before
    return kept
