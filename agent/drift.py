"""Drift sketches on the device: what the model sees and answers, summarised per telemetry window.

A :class:`DriftSpec` (read from the bundle's reference profile, ``drift.json``) says which
figures to keep; :class:`DriftSketcher` samples live inference calls, folds them into those
figures and hands one compact, mergeable window payload (schema ``drift/1``) to the telemetry
loop. The fleet server merges windows and judges them against the reference
(``edgepack.host.fleet.drift``). ``docs/drift.md`` documents the payload field by field.

A figure is either a KLL quantile sketch (Apache DataSketches, ``kll_floats_sketch``) or a vector
of counts over fixed bins. Figure keys are short (``i0.c0``: input 0, channel 0 mean) so the
payload stays small whatever the tensor names are:

======== ================================================ ======
key      what                                             kind
======== ================================================ ======
i{n}.c{c} mean of channel ``c`` per sample (images)        sketch
i{n}.px  pixel intensities (a random subset per sample)    sketch
i{n}.f{j} tabular feature column ``j``                    sketch
i{n}.tok token ids in equal-width id buckets (+ out-of-range) counts
o{n}.cls predicted class (+ one bucket for unknown labels) counts
o{n}.conf top probability in ``CONFIDENCE_BINS`` equal bins counts
o{n}.v{j} regression output column ``j``                   sketch
======== ================================================ ======

The same extraction (:func:`extract_figures`) builds the reference on the build machine, so the
device and the reference can never disagree on what a figure means. Quantized int8/uint8 tensors
(TFLite models with integer I/O) carry their ``scale`` and ``zero_point`` in the spec and are
sketched in float terms (:func:`dequantize`), on the device as in the reference.
"""

from __future__ import annotations

import base64
import itertools
import json
import math
import random
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgepack.agent.errors import BundleError, DataError

__all__ = [
    "SCHEMA",
    "REFERENCE_SCHEMA",
    "DEFAULT_K",
    "DEFAULT_SAMPLE_RATE",
    "DEFAULT_MAX_ROWS",
    "CONFIDENCE_BINS",
    "InputSpec",
    "OutputSpec",
    "DriftSpec",
    "Figures",
    "extract_figures",
    "dequantize",
    "DriftSketcher",
    "REFERENCE_MEMBER",
    "load_sketcher",
    "payload_bytes",
]

# The optional bundle member holding the reference profile (docs/bundle.md).
REFERENCE_MEMBER = "drift.json"

SCHEMA = "drift/1"
REFERENCE_SCHEMA = "edgepack.drift/1"
# KLL k of a window sketch: k=32 keeps the digits CNN's window under 2 KB at the row cap
# (normalized rank error 7.9 % at the 99th percentile of trials; typical errors are far smaller).
DEFAULT_K = 32
# 1 % of calls: on the digits CNN (~30 µs an inference) the hook costs ~2.5 % by itself and a
# sampled call about half an inference; 1 % measured 3 % overhead, 2 % 4-5 % (bench/drift.py).
# Heavier models afford a higher rate for the same relative cost (docs/drift.md).
DEFAULT_SAMPLE_RATE = 0.01
DEFAULT_MAX_ROWS = 4096
DEFAULT_PIXELS_PER_ROW = 16
# Sampled calls are buffered (copies) and turned into figures this many at a time: numpy's
# per-call overhead on tiny arrays costs more than the work, so one pass over 64 rows is cheap.
_FOLD_CALLS = 64
_FOLD_BYTES = 1 << 20
CONFIDENCE_BINS = 10

_INPUT_KINDS = ("image", "tabular", "tokens")
_OUTPUT_KINDS = ("probabilities", "labels", "regression")
_LAYOUTS = ("NHWC", "NCHW", "N...")
_ACTIVATIONS = ("none", "softmax", "sigmoid")


@dataclass(frozen=True)
class InputSpec:
    """How one model input is summarised.

    ``kind`` is ``image`` (``layout`` NHWC, NCHW or ``N...`` = one channel over everything;
    ``channels``; ``pixels_per_row`` values of each sample go into the pixel sketch, 0 = all),
    ``tabular`` (``features``: the column indices sketched) or ``tokens`` (ids ``0..vocab-1``
    counted in ``buckets`` equal-width buckets, anything else in one extra bucket). ``scale``
    and ``zero_point`` (a quantized int8/uint8 tensor of a TFLite model; scale 0: none): integer
    values are sketched dequantized, ``(q - zero_point) * scale``, as the reference was.
    """

    name: str
    kind: str
    layout: str = ""
    channels: int = 0
    pixels_per_row: int = 0
    features: tuple[int, ...] = ()
    vocab: int = 0
    buckets: int = 0
    scale: float = 0.0
    zero_point: int = 0


@dataclass(frozen=True)
class OutputSpec:
    """How one model output is summarised.

    ``probabilities``: ``classes`` scores per row (``activation`` softmax/sigmoid when the model
    emits logits) → predicted class counts and the top-probability histogram. ``labels``: integer
    class labels (``labels`` lists the known ones) → class counts. ``regression``: the
    ``columns`` sketched. ``scale``/``zero_point``: as for :class:`InputSpec`.
    """

    name: str
    kind: str
    activation: str = "none"
    classes: int = 0
    labels: tuple[int, ...] = ()
    columns: tuple[int, ...] = ()
    scale: float = 0.0
    zero_point: int = 0


@dataclass(frozen=True)
class DriftSpec:
    """What a device sketches, read from the bundle's reference profile."""

    inputs: tuple[InputSpec, ...]
    outputs: tuple[OutputSpec, ...]
    k: int = DEFAULT_K
    sample_rate: float = DEFAULT_SAMPLE_RATE
    max_rows: int = DEFAULT_MAX_ROWS
    reference_id: str = ""
    figures: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False,
                                      repr=False)
    bins: Mapping[str, int] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "figures", _figure_kinds(self.inputs, self.outputs))
        object.__setattr__(self, "bins", _figure_bins(self.inputs, self.outputs))

    def to_dict(self) -> dict:
        """The JSON form stored under ``spec`` in ``drift.json`` (without the reference id)."""
        return {"inputs": [_spec_dict(i) for i in self.inputs],
                "outputs": [_spec_dict(o) for o in self.outputs],
                "k": self.k, "sample_rate": self.sample_rate, "max_rows": self.max_rows}

    @classmethod
    def from_reference(cls, doc: Mapping) -> DriftSpec:
        """Read the spec out of a reference profile (the parsed ``drift.json``).

        Raises :class:`BundleError` naming the field when the document is not a reference.
        """
        if not isinstance(doc, Mapping) or doc.get("schema") != REFERENCE_SCHEMA:
            raise BundleError(f"not a drift reference: expected schema {REFERENCE_SCHEMA!r}",
                              field="schema")
        spec = doc.get("spec")
        if not isinstance(spec, Mapping):
            raise BundleError("drift reference has no `spec` object", field="spec")
        try:
            inputs = tuple(_input_spec(d) for d in spec["inputs"])
            outputs = tuple(_output_spec(d) for d in spec["outputs"])
            k, rate, max_rows = int(spec["k"]), float(spec["sample_rate"]), int(spec["max_rows"])
            ref_id = str(doc["id"])
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"drift reference spec is malformed: {e!r}", field="spec") from e
        if not (8 <= k <= 1024 and 0.0 <= rate <= 1.0 and max_rows > 0):
            raise BundleError(f"drift reference spec out of range: k={k}, sample_rate={rate}, "
                              f"max_rows={max_rows}", field="spec")
        return cls(inputs, outputs, k=k, sample_rate=rate, max_rows=max_rows, reference_id=ref_id)


def _spec_dict(s: InputSpec | OutputSpec) -> dict:
    """The JSON form of a tensor's spec; ``scale``/``zero_point`` only for quantized tensors."""
    d = asdict(s)
    if not s.scale:
        del d["scale"], d["zero_point"]
    return d


def _quantization(d: Mapping) -> tuple[float, int]:
    scale, zero_point = float(d.get("scale", 0.0)), int(d.get("zero_point", 0))
    if not (math.isfinite(scale) and scale >= 0.0):
        raise ValueError(f"tensor {d.get('name')!r}: scale {scale}")
    return scale, zero_point


def dequantize(x: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """A quantized integer tensor in float terms, ``(q - zero_point) * scale`` in float32: the
    device and the reference both sketch these values."""
    return (np.asarray(x).astype(np.float32) - np.float32(zero_point)) * np.float32(scale)


def _float_terms(x: np.ndarray, s: InputSpec | OutputSpec) -> np.ndarray:
    """``x`` dequantized when ``s`` says it is a quantized tensor and it holds integers."""
    return dequantize(x, s.scale, s.zero_point) if s.scale and x.dtype.kind in "iu" else x


def _input_spec(d: Mapping) -> InputSpec:
    scale, zero_point = _quantization(d)
    s = InputSpec(name=str(d["name"]), kind=str(d["kind"]), layout=str(d.get("layout", "")),
                  channels=int(d.get("channels", 0)),
                  pixels_per_row=int(d.get("pixels_per_row", 0)),
                  features=tuple(int(j) for j in d.get("features", ())),
                  vocab=int(d.get("vocab", 0)), buckets=int(d.get("buckets", 0)),
                  scale=scale, zero_point=zero_point)
    bad = (s.kind not in _INPUT_KINDS
           or (s.kind == "image" and (s.layout not in _LAYOUTS or not 1 <= s.channels <= 64))
           or (s.kind == "tokens" and (s.vocab < 1 or not 1 <= s.buckets <= 1024)))
    if bad:
        raise ValueError(f"input {s.name!r}: {s.kind}/{s.layout}")
    return s


def _output_spec(d: Mapping) -> OutputSpec:
    scale, zero_point = _quantization(d)
    s = OutputSpec(name=str(d["name"]), kind=str(d["kind"]),
                   activation=str(d.get("activation", "none")),
                   classes=int(d.get("classes", 0)),
                   labels=tuple(int(v) for v in d.get("labels", ())),
                   columns=tuple(int(j) for j in d.get("columns", ())),
                   scale=scale, zero_point=zero_point)
    if s.kind not in _OUTPUT_KINDS or s.activation not in _ACTIVATIONS:
        raise ValueError(f"output {s.name!r}: {s.kind}/{s.activation}")
    return s


def _figure_kinds(inputs: tuple[InputSpec, ...],
                  outputs: tuple[OutputSpec, ...]) -> dict[str, str]:
    kinds: dict[str, str] = {}
    for n, i in enumerate(inputs):
        if i.kind == "image":
            kinds.update({f"i{n}.c{c}": "sketch" for c in range(i.channels)})
            kinds[f"i{n}.px"] = "sketch"
        elif i.kind == "tabular":
            kinds.update({f"i{n}.f{j}": "sketch" for j in i.features})
        else:
            kinds[f"i{n}.tok"] = "counts"
    for n, o in enumerate(outputs):
        if o.kind == "regression":
            kinds.update({f"o{n}.v{j}": "sketch" for j in o.columns})
        else:
            kinds[f"o{n}.cls"] = "counts"
            if o.kind == "probabilities":
                kinds[f"o{n}.conf"] = "counts"
    return kinds


def _figure_bins(inputs: tuple[InputSpec, ...],
                 outputs: tuple[OutputSpec, ...]) -> dict[str, int]:
    """Number of bins of each count figure."""
    bins = {f"i{n}.tok": i.buckets + 1 for n, i in enumerate(inputs) if i.kind == "tokens"}
    for n, o in enumerate(outputs):
        if o.kind == "labels":
            bins[f"o{n}.cls"] = len(o.labels) + 1
        elif o.kind == "probabilities":
            bins[f"o{n}.cls"] = o.classes + 1
            bins[f"o{n}.conf"] = CONFIDENCE_BINS
    return bins


@dataclass(frozen=True)
class Figures:
    """One batch of inferences turned into figures: values for sketches, counts, sums, rows."""

    values: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]
    sums: dict[str, float]
    rows: int


@dataclass
class _Pieces:
    """What sampled calls leave behind until the window closes: cheap to append to."""

    values: dict[str, list] = field(default_factory=dict)
    hits: dict[str, list] = field(default_factory=dict)
    tops: dict[str, list] = field(default_factory=dict)
    rows: int = 0

    def add(self, key: str, piece: object, into: dict[str, list]) -> None:
        into.setdefault(key, []).append(piece)


class _PixelSampler:
    """Which pixels of each sample go into the pixel sketch: successive slices of one random
    permutation of the pixel positions, so every row gets a random subset and, over rows, every
    pixel is drawn equally often."""

    def __init__(self, seed: int | None) -> None:
        self._rng = np.random.default_rng(seed)
        self._perms: dict[int, np.ndarray] = {}
        self._pos = 0

    def take(self, flat: np.ndarray, per_row: int) -> np.ndarray:
        batch, size = flat.shape
        perm = self._perms.get(size)
        if perm is None:
            perm = self._perms[size] = self._rng.permutation(size)
        pos = self._pos % size
        self._pos = pos + batch * per_row
        if batch == 1 and pos + per_row <= size:
            return flat[0, perm[pos:pos + per_row]]
        idx = perm[(pos + np.arange(batch * per_row)) % size].reshape(batch, per_row)
        return np.take_along_axis(flat, idx, axis=1).ravel()


def extract_figures(spec: DriftSpec, inputs: Mapping[str, np.ndarray],
                    outputs: Mapping[str, np.ndarray], *,
                    pixel_seed: int | None = None, all_pixels: bool = True) -> Figures:
    """Turn a batch of inputs and the model's outputs on them into the spec's figures.

    The first axis of every tensor is the batch. Every pixel of an image goes into the pixel
    figure (the reference), unless ``all_pixels`` is False: then each sample gives
    ``pixels_per_row`` random pixels (drawn with ``pixel_seed``), as on the device. Tensors the
    spec names but the call lacks are skipped, so a model with optional inputs still reports
    the rest.
    """
    pieces = _Pieces()
    _extract(spec, inputs, outputs, None if all_pixels else _PixelSampler(pixel_seed), pieces)
    return _summarise(spec, pieces)


def _extract(spec: DriftSpec, inputs: Mapping[str, np.ndarray],
             outputs: Mapping[str, np.ndarray], pixels: _PixelSampler | None,
             pieces: _Pieces) -> None:
    """Turn one batch (a call, or buffered calls joined) into pieces: a few numpy calls per
    tensor, copies of what must outlive it; histograms and sketches wait for :func:`_summarise`."""
    rows = 0
    for n, s in enumerate(spec.inputs):
        x = inputs.get(s.name)
        if x is None:
            continue
        x = _float_terms(np.asarray(x), s)
        if not x.ndim:
            x = x.reshape(1, 1)
        rows = max(rows, x.shape[0])
        if s.kind == "image":
            _image(f"i{n}", s, x, pieces, pixels)
        elif s.kind == "tabular":
            flat = x.reshape(x.shape[0], -1)
            for j in s.features:
                pieces.add(f"i{n}.f{j}", np.array(flat[:, j], dtype=np.float32), pieces.values)
        else:
            ids = x.astype(np.int64).ravel()
            bucket = ids * s.buckets // s.vocab
            bucket[(ids < 0) | (ids >= s.vocab)] = s.buckets
            pieces.add(f"i{n}.tok", bucket, pieces.hits)
    for n, s in enumerate(spec.outputs):
        y = outputs.get(s.name)
        if y is None:
            continue
        y = _float_terms(np.asarray(y), s)
        y = y.reshape(y.shape[0], -1) if y.ndim else y.reshape(1, 1)
        rows = max(rows, y.shape[0])
        if s.kind == "regression":
            for j in s.columns:
                pieces.add(f"o{n}.v{j}", np.array(y[:, j], dtype=np.float32), pieces.values)
        elif s.kind == "labels":
            known = np.asarray(s.labels, dtype=np.int64)
            lab = y[:, 0].astype(np.int64)
            pos = np.minimum(np.searchsorted(known, lab), len(known) - 1)
            pieces.add(f"o{n}.cls", np.where(known[pos] == lab, pos, len(known)), pieces.hits)
        else:
            cls, top = _top_class(y, s.activation)
            pieces.add(f"o{n}.cls", cls, pieces.hits)
            pieces.add(f"o{n}.conf", top, pieces.tops)
    pieces.rows += rows


def _joined(parts: list, dtype: type) -> np.ndarray:
    """One array of the pieces (arrays, or plain numbers from the one-row fast path)."""
    return np.concatenate([np.ravel(p) for p in parts]).astype(dtype, copy=False)


def _summarise(spec: DriftSpec, pieces: _Pieces) -> Figures:
    values = {k: _joined(v, np.float32) for k, v in pieces.values.items()}
    counts = {k: np.bincount(_joined(v, np.intp), minlength=spec.bins[k])
              for k, v in pieces.hits.items()}
    sums = {}
    for key, parts in pieces.tops.items():
        top = _joined(parts, np.float64)
        top = np.where(np.isfinite(top), top, 0.0)  # NaN scores count as confidence 0
        counts[key] = np.bincount(
            np.minimum((top * CONFIDENCE_BINS).astype(np.intp), CONFIDENCE_BINS - 1),
            minlength=CONFIDENCE_BINS)
        sums[key] = float(top.sum())
    return Figures(values, counts, sums, pieces.rows)


def _image(prefix: str, s: InputSpec, x: np.ndarray, pieces: _Pieces,
           pixels: _PixelSampler | None) -> None:
    batch = x.shape[0]
    flat = x.reshape(batch, -1)
    if s.channels == 1 or s.layout == "N...":
        means = np.add.reduce(flat, axis=1, dtype=np.float32, keepdims=True) / flat.shape[1]
    elif s.layout == "NHWC":
        means = x.reshape(batch, -1, x.shape[-1]).mean(axis=1, dtype=np.float32)
    else:
        means = x.reshape(batch, x.shape[1], -1).mean(axis=2, dtype=np.float32)
    for c in range(min(s.channels, means.shape[1])):
        pieces.add(f"{prefix}.c{c}", means[:, c], pieces.values)
    if pixels is not None and 0 < s.pixels_per_row < flat.shape[1]:
        chosen = pixels.take(flat, s.pixels_per_row)  # fancy indexing: already a copy
    else:
        chosen = np.array(flat, dtype=np.float32).ravel()
    pieces.add(f"{prefix}.px", chosen, pieces.values)


def _top_class(z: np.ndarray, activation: str) -> tuple[object, object]:
    """Predicted class and its probability per row, from scores or probabilities.

    One row of a few classes (a device serving single requests) is done in plain Python, which
    costs a third of the numpy calls on arrays that small.
    """
    if z.shape[0] == 1 and 1 < z.shape[1] <= 64:
        row = z[0].tolist()
        top = max(row)
        cls = row.index(top)
        if activation == "softmax":
            return cls, 1.0 / sum([math.exp(v - top) for v in row])
        return cls, (1.0 / (1.0 + math.exp(-top)) if activation == "sigmoid" else top)
    if z.shape[1] == 1:  # one score per row: the probability of class 1
        p1 = 1.0 / (1.0 + np.exp(-z[:, 0])) if activation == "sigmoid" else z[:, 0]
        cls = (p1 >= 0.5).astype(np.intp)
        return cls, np.where(cls == 1, p1, 1.0 - p1)
    cls = z.argmax(axis=1)
    if activation == "softmax":  # the top softmax probability is 1 / sum(exp(z - max z))
        return cls, 1.0 / np.exp(z - z.max(axis=1, keepdims=True)).sum(axis=1)
    top = z.max(axis=1)
    return cls, 1.0 / (1.0 + np.exp(-top)) if activation == "sigmoid" else top


def payload_bytes(payload: Mapping) -> int:
    """Size of a window payload as compact UTF-8 JSON: what it costs on the wire."""
    return len(json.dumps(payload, separators=(",", ":")).encode())


class DriftSketcher:
    """Sketch a sample of live inference calls per telemetry window.

    Thread-safe: :meth:`observe` may be called from any inference thread, :meth:`take_window`
    from the telemetry loop. Sampling is per call: the number of calls to skip is drawn from a
    geometric distribution (``random.Random(seed)``), so a call that is not sampled costs a
    counter tick and a comparison. A sampled call only copies the tensors the spec names (never
    keeping the caller's buffers); every ``_FOLD_CALLS`` sampled calls (or ``_FOLD_BYTES`` of
    copies) they are turned into figures in one vectorised pass, and :meth:`take_window` builds
    the sketches and histograms, so the inference path pays for no numpy work per call. A window
    holds at most ``spec.max_rows`` rows; later calls in the window are counted, not sketched.
    """

    def __init__(self, spec: DriftSpec, *, sample_rate: float | None = None,
                 seed: int | None = None) -> None:
        rate = spec.sample_rate if sample_rate is None else float(sample_rate)
        if not 0.0 <= rate <= 1.0:
            raise DataError(f"drift sampling rate must be within 0..1, got {rate}: pass "
                            "`sample_rate=` as a fraction of inference calls",
                            field="sample_rate")
        from datasketches import kll_floats_sketch

        self.spec = spec
        self.sample_rate = rate
        self._kll = kll_floats_sketch
        self._random = random.Random(seed)
        self._pixels = _PixelSampler(seed)
        self._lock = threading.Lock()
        self._log_q = math.log1p(-rate) if 0.0 < rate < 1.0 else 0.0
        # next() on itertools.count is atomic under the GIL: a call that is not sampled takes
        # no lock, only a counter tick and one comparison
        self._counter = itertools.count()
        self._window_start = 0
        self._next_sample = self._next_skip() - 1
        self._sampled = 0
        self._pieces = _Pieces()
        self._in_names = tuple(i.name for i in spec.inputs)
        self._out_names = tuple(o.name for o in spec.outputs)
        self._buffer: list[tuple[dict, dict]] = []
        self._buffered_rows = self._buffered_bytes = 0

    def _next_skip(self) -> int:
        if self.sample_rate >= 1.0:
            return 1
        if self.sample_rate <= 0.0:
            return 1 << 62
        return int(math.log(1.0 - self._random.random()) / self._log_q) + 1

    def observe(self, inputs: Mapping[str, np.ndarray],
                outputs: Mapping[str, np.ndarray]) -> bool:
        """Count one inference call and keep its figures if it is sampled; True when kept."""
        call = next(self._counter)
        if call < self._next_sample:
            return False
        with self._lock:
            if call < self._next_sample:  # another thread took this sample
                return False
            self._next_sample = call + self._next_skip()
            if call < self._window_start:
                # Counted by the window that just closed while this call waited for the lock:
                # its figures land in this window, so count the call here too (sampled <= calls).
                self._window_start -= 1
            room = self.spec.max_rows - self._pieces.rows - self._buffered_rows
            if room <= 0:
                return False
            first = next(iter(inputs.values()), None)
            batch = first.shape[0] if getattr(first, "ndim", 0) else 1
            if batch > room:
                inputs, outputs, batch = _head(inputs, room), _head(outputs, room), room
            ins = {n: np.array(inputs[n]) for n in self._in_names if n in inputs}
            outs = {n: np.array(outputs[n]) for n in self._out_names if n in outputs}
            self._buffer.append((ins, outs))
            self._buffered_rows += batch
            self._buffered_bytes += sum(a.nbytes for a in ins.values())
            if len(self._buffer) >= _FOLD_CALLS or self._buffered_bytes >= _FOLD_BYTES:
                self._fold()
            self._sampled += 1
            return True

    def _fold(self) -> None:
        """Turn the buffered calls into figures (under the lock), vectorised when shapes allow."""
        buffer, self._buffer = self._buffer, []
        self._buffered_rows = self._buffered_bytes = 0
        if not buffer:
            return
        try:
            groups = [tuple({n: np.concatenate([call[side][n] for call in buffer])
                             for n in buffer[0][side]} for side in (0, 1))]
        except (ValueError, KeyError):  # shapes or names differ between calls: one by one
            groups = buffer
        for ins, outs in groups:
            _extract(self.spec, ins, outs, self._pixels, self._pieces)

    def take_window(self) -> dict:
        """The window's payload (schema ``drift/1``, JSON-ready) and a fresh window.

        Empty sketches are left out; ``s`` holds base64 KLL sketches, ``c`` count vectors,
        ``sum`` exact sums (the top-probability sum, for the mean confidence).
        """
        with self._lock:
            self._fold()
            end = next(self._counter)  # this tick is not a call: the next window starts after it
            calls, sampled, pieces = end - self._window_start, self._sampled, self._pieces
            self._window_start = end + 1
            self._sampled = 0
            self._pieces = _Pieces()
        figs = _summarise(self.spec, pieces)
        sketches = {}
        for key, values in figs.values.items():
            sketch = self._kll(self.spec.k)
            sketch.update(values)
            if not sketch.is_empty():
                sketches[key] = base64.b64encode(sketch.serialize()).decode()
        return {
            "schema": SCHEMA, "ref": self.spec.reference_id, "rate": self.sample_rate,
            "calls": calls, "sampled": sampled, "rows": min(figs.rows, self.spec.max_rows),
            "s": sketches,
            "c": {key: [int(v) for v in c] for key, c in figs.counts.items()},
            "sum": {key: round(v, 4) for key, v in figs.sums.items()},
        }


def load_sketcher(slot_dir: str | Path, *, sample_rate: float) -> DriftSketcher | None:
    """The sketcher for an installed bundle's ``drift.json``; None when it has none.

    Raises :class:`BundleError` naming the member when the file is there but unreadable.
    """
    path = Path(slot_dir) / REFERENCE_MEMBER
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as e:
        raise BundleError(f"{REFERENCE_MEMBER} is not readable JSON: {e}",
                          field=REFERENCE_MEMBER) from None
    return DriftSketcher(DriftSpec.from_reference(doc), sample_rate=sample_rate)


def _head(tensors: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """The first ``rows`` rows of every batched tensor (the window's row cap)."""
    return {name: (t[:rows] if getattr(t, "ndim", 0) and t.shape[0] > rows else t)
            for name, t in tensors.items()}
