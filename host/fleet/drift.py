"""Drift on the fleet server: decode device windows, merge them, judge them against the reference.

Devices send one ``drift/1`` window per telemetry message (``edgepack.agent.drift``); the
collector keeps them as :class:`WindowRecord`. :func:`merge_windows` adds windows up per device,
per bundle or per group over a time range (KLL sketches and counts are mergeable), and
:func:`judge` compares a merged window with the bundle's reference profile (``drift.json``,
made by ``edgepack.host.build.drift_reference``):

* per sketched figure: PSI on the reference's quintile bins, the two-sample Kolmogorov-Smirnov
  statistic and the Wasserstein-1 distance divided by the reference's standard deviation, all
  computed from the sketches;
* per count figure (classes, token buckets, confidence bins): PSI;
* confidence: the drop of the mean top probability from the reference's.

Window payloads come from devices and are hostile until checked: :func:`decode_window` bounds
every size, validates the binary layout of each KLL sketch before the sketch library sees it
(malformed sketches can crash it) and raises :class:`ProtocolError` naming the field.
``docs/drift.md`` has the thresholds and why.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from edgepack.agent.drift import REFERENCE_SCHEMA, SCHEMA
from edgepack.agent.errors import BundleError, DataError, ProtocolError

__all__ = [
    "MAX_WINDOW_BYTES",
    "DriftThresholds",
    "WindowProfile",
    "WindowRecord",
    "ReferenceFigure",
    "Reference",
    "FigureDrift",
    "DriftVerdict",
    "decode_window",
    "merge_windows",
    "select_windows",
    "merge_by",
    "load_reference",
    "judge",
]

MAX_WINDOW_BYTES = 64 * 1024
_MAX_FIGURES = 256
_MAX_SKETCH_B64 = 16 * 1024
_MAX_BINS = 4096
_MAX_COUNT = 1 << 53
_MAX_K = 1024
_SKETCH_KEY = re.compile(r"[io]\d{1,3}\.(?:c\d{1,3}|px|f\d{1,6}|v\d{1,6})")
_COUNTS_KEY = re.compile(r"[io]\d{1,3}\.(?:tok|cls|conf)")
_EPS = 1e-4
_GRID = tuple(i / 100 for i in range(101))
_MIDPOINTS = tuple((i + 0.5) / 100 for i in range(100))


@dataclass(frozen=True)
class DriftThresholds:
    """When a figure alerts (``docs/drift.md`` says why these defaults).

    ``psi``: population stability index at or above which a distribution has shifted (0.2 is
    the customary "significant shift" level). ``ks``: Kolmogorov-Smirnov effect size; a KS
    figure only counts when it also exceeds the two-sample critical value at ``ks_alpha`` for
    the rows behind it plus the sketches' rank error, so small windows and coarse sketches do
    not alert on noise. ``confidence_drop``: fall of
    the mean top probability, absolute. ``min_rows``: figures built on fewer sampled rows are
    reported, never alerted on.
    """

    psi: float = 0.2
    ks: float = 0.1
    ks_alpha: float = 0.01
    confidence_drop: float = 0.1
    min_rows: int = 300


@dataclass(frozen=True)
class WindowProfile:
    """A decoded (or merged) drift window: counters, KLL sketches (serialized), counts, sums."""

    reference_id: str
    calls: int
    sampled: int
    rows: int
    sketches: Mapping[str, bytes] = field(default_factory=dict)
    counts: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    sums: Mapping[str, float] = field(default_factory=dict)

    def to_payload(self, rate: float = 1.0) -> dict:
        """The ``drift/1`` JSON form (for storing a merged window like a device's)."""
        return {"schema": SCHEMA, "ref": self.reference_id, "rate": rate, "calls": self.calls,
                "sampled": self.sampled, "rows": self.rows,
                "s": {k: base64.b64encode(v).decode() for k, v in self.sketches.items()},
                "c": {k: list(v) for k, v in self.counts.items()}, "sum": dict(self.sums)}


@dataclass(frozen=True)
class WindowRecord:
    """One window as the collector stores it: who sent it, for which bundle, when."""

    device: str
    bundle_id: str
    ts: float
    window: WindowProfile
    groups: tuple[str, ...] = ()


def decode_window(raw: bytes | str | Mapping, *,
                  max_bytes: int = MAX_WINDOW_BYTES) -> WindowProfile:
    """Parse and validate one device window (bytes, text or an already parsed JSON object).

    Raises :class:`ProtocolError` (with ``field``) for anything that is not a well-formed
    ``drift/1`` window within the size limits; never lets malformed bytes reach the sketch library.
    """
    doc = _parse(raw, max_bytes)
    if doc.get("schema") != SCHEMA:
        raise _bad(f"not a drift window: expected schema {SCHEMA!r}", "schema")
    ref = doc.get("ref")
    if not isinstance(ref, str) or len(ref) > 64:
        raise _bad("drift window `ref` must be the reference id (a short string)", "ref")
    calls, sampled, rows = (_count(doc.get(f), f) for f in ("calls", "sampled", "rows"))
    if sampled > calls:
        raise _bad(f"drift window says {sampled} sampled of {calls} calls", "sampled")
    sketches = {key: _sketch_bytes(v, f"s.{key}")
                for key, v in _section(doc, "s", _SKETCH_KEY).items()}
    counts = {key: _counts(v, f"c.{key}") for key, v in _section(doc, "c", _COUNTS_KEY).items()}
    sums = {key: _sum(v, f"sum.{key}") for key, v in _section(doc, "sum", _COUNTS_KEY).items()}
    return WindowProfile(ref, calls, sampled, rows, sketches, counts, sums)


def _parse(raw: bytes | str | Mapping, max_bytes: int) -> Mapping:
    if isinstance(raw, Mapping):
        doc: object = raw
    else:
        data = raw.encode() if isinstance(raw, str) else bytes(raw)
        if len(data) > max_bytes:
            raise _bad(f"drift window of {len(data)} bytes is over the {max_bytes}-byte limit",
                       "drift")
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise _bad(f"drift window is not JSON: {type(e).__name__}", "drift") from None
    if not isinstance(doc, Mapping):
        raise _bad("drift window must be a JSON object", "drift")
    return doc


def _bad(message: str, where: str) -> ProtocolError:
    return ProtocolError(message, field=where)


def _count(v: object, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= _MAX_COUNT:
        raise _bad(f"drift window `{where}` must be a non-negative integer", where)
    return v


def _section(doc: Mapping, name: str, pattern: re.Pattern) -> Mapping:
    sec = doc.get(name, {})
    if not isinstance(sec, Mapping) or len(sec) > _MAX_FIGURES:
        raise _bad(f"drift window `{name}` must be an object of at most {_MAX_FIGURES} "
                   "figures", name)
    for key in sec:
        if not isinstance(key, str) or not pattern.fullmatch(key):
            raise _bad(f"drift window `{name}` has an unknown figure key {str(key)[:40]!r}",
                       name)
    return sec


def _counts(v: object, where: str) -> tuple[int, ...]:
    if not isinstance(v, list) or not 0 < len(v) <= _MAX_BINS:
        raise _bad(f"drift window `{where}` must be a list of 1..{_MAX_BINS} counts", where)
    return tuple(_count(c, where) for c in v)


def _sum(v: object, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise _bad(f"drift window `{where}` must be a finite non-negative number", where)
    return float(v)


def _sketch_bytes(v: object, where: str, max_k: int = _MAX_K) -> bytes:
    if not isinstance(v, str) or len(v) > _MAX_SKETCH_B64:
        raise _bad(f"`{where}` must be a base64 KLL sketch of at most {_MAX_SKETCH_B64} "
                   "characters", where)
    try:
        blob = base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(f"`{where}` is not base64", where) from None
    problem = _kll_problem(blob, max_k)
    if problem:
        raise _bad(f"`{where}` is not a valid KLL float sketch: {problem}", where)
    return blob


def _kll_problem(blob: bytes, max_k: int) -> str:
    """What is wrong with a serialized ``kll_floats_sketch`` ('' when nothing is).

    Checks everything the deserializer trusts: header, level offsets against the capacity the
    library derives from k, the exact length, n against the level weights, and that items are
    finite, within min..max and sorted where KLL keeps them sorted.
    """
    if len(blob) < 8:
        return "truncated header"
    pre, ver, family, flags, k, m = struct.unpack_from("<BBBBHB", blob)
    if family != 15 or m != 8 or not 8 <= k <= max_k:
        return f"family {family}, m {m}, k {k} (expected 15, 8, 8..{max_k})"
    if flags & 1:
        ok = pre == 2 and ver == 1 and flags & ~3 == 0 and len(blob) == 8
        return "" if ok else "bad empty sketch"
    if flags & 4:
        ok = pre == 2 and ver == 2 and flags & ~6 == 0 and len(blob) == 12
        return "" if ok and math.isfinite(struct.unpack_from("<f", blob, 8)[0]) else \
            "bad single-item sketch"
    if pre != 5 or ver != 1 or flags & ~2 or len(blob) < 20:
        return "bad preamble"
    n, min_k, num_levels = struct.unpack_from("<QHB", blob, 8)
    if not 8 <= min_k <= k or not 1 <= num_levels <= 60:
        return f"min_k {min_k}, {num_levels} levels"
    capacity = sum(_level_capacity(k, num_levels, h) for h in range(num_levels))
    if len(blob) < 20 + 4 * num_levels:
        return "truncated levels"
    levels = [*struct.unpack_from(f"<{num_levels}I", blob, 20), capacity]
    if any(a > b for a, b in zip(levels[:-1], levels[1:], strict=True)):
        return "level offsets out of order or beyond capacity"
    if len(blob) != 20 + 4 * num_levels + 8 + 4 * (capacity - levels[0]):
        return f"{len(blob)} bytes do not match the level offsets"
    if n != sum((levels[h + 1] - levels[h]) << h for h in range(num_levels)):
        return "n does not match the level weights"
    values = np.frombuffer(blob, dtype="<f4", offset=20 + 4 * num_levels)
    lo, hi, items = values[0], values[1], values[2:]
    if not np.all(np.isfinite(values)) or lo > hi or items.size == 0 or \
            items.min() < lo or items.max() > hi:
        return "items not finite or outside min..max"
    for h in range(0 if flags & 2 else 1, num_levels):
        level = items[levels[h] - levels[0]:levels[h + 1] - levels[0]]
        if np.any(level[1:] < level[:-1]):
            return f"level {h} is not sorted"
    return ""


def _level_capacity(k: int, num_levels: int, height: int) -> int:
    """Items a KLL level may hold (the library's formula: k·(2/3)^depth, rounded, at least 8)."""
    def aux(k: int, depth: int) -> int:
        return (((2 * k) << depth) // 3 ** depth + 1) >> 1

    depth = num_levels - height - 1
    cap = aux(k, depth) if depth <= 30 else aux(aux(k, depth // 2), depth - depth // 2)
    return max(8, cap)


def _kll(blob: bytes) -> object:
    from datasketches import kll_floats_sketch

    return kll_floats_sketch.deserialize(blob)


def merge_windows(windows: Iterable[WindowProfile]) -> WindowProfile:
    """Add windows up (same reference only): counters and counts sum, sketches merge.

    Raises :class:`DataError` for windows of different references and :class:`ProtocolError`
    for count vectors whose lengths disagree.
    """
    from datasketches import kll_floats_sketch

    windows = list(windows)
    if not windows:
        return WindowProfile("", 0, 0, 0)
    refs = {w.reference_id for w in windows}
    if len(refs) > 1:
        raise DataError(f"cannot merge drift windows of different references {sorted(refs)}: "
                        "select windows of one bundle", field="bundle_id")
    merged: dict[str, object] = {}
    counts: dict[str, np.ndarray] = {}
    sums: dict[str, float] = {}
    for w in windows:
        for key, blob in w.sketches.items():
            sk = _kll(blob)
            merged.setdefault(key, kll_floats_sketch(sk.k)).merge(sk)
        for key, c in w.counts.items():
            if key in counts and len(counts[key]) != len(c):
                raise _bad(f"drift windows disagree on the bins of {key!r}", f"c.{key}")
            counts[key] = counts.get(key, 0) + np.asarray(c, dtype=np.int64)
        for key, v in w.sums.items():
            sums[key] = sums.get(key, 0.0) + v
    return WindowProfile(
        windows[0].reference_id, sum(w.calls for w in windows),
        sum(w.sampled for w in windows), sum(w.rows for w in windows),
        {k: s.serialize() for k, s in merged.items()},
        {k: tuple(int(x) for x in c) for k, c in counts.items()}, sums)


def select_windows(records: Iterable[WindowRecord], *, device: str | None = None,
                   bundle_id: str | None = None, group: str | None = None,
                   since: float | None = None, until: float | None = None) -> list[WindowRecord]:
    """The records of one device, bundle and/or group within ``since <= ts < until``."""
    return [r for r in records
            if (device is None or r.device == device)
            and (bundle_id is None or r.bundle_id == bundle_id)
            and (group is None or group in r.groups)
            and (since is None or r.ts >= since) and (until is None or r.ts < until)]


def merge_by(records: Iterable[WindowRecord], by: str) -> dict[str, WindowProfile]:
    """Merged windows per ``device``, ``bundle`` or ``group`` (a record counts in each group)."""
    if by not in ("device", "bundle", "group"):
        raise DataError(f"cannot group drift windows by {by!r}: pass `by=` as device, bundle "
                        "or group", field="by")
    buckets: dict[str, list[WindowProfile]] = {}
    for r in records:
        keys = {"device": (r.device,), "bundle": (r.bundle_id,), "group": r.groups}[by]
        for key in keys:
            buckets.setdefault(key, []).append(r.window)
    return {key: merge_windows(ws) for key, ws in sorted(buckets.items())}


@dataclass(frozen=True)
class ReferenceFigure:
    """One figure of the reference profile, as the judge needs it."""

    key: str
    kind: str
    label: str
    rows: int
    edges: tuple[float, ...] = ()
    expected: tuple[float, ...] = ()
    counts: tuple[int, ...] = ()
    mean: float | None = None
    std: float = 0.0
    sketch: bytes = b""


@dataclass(frozen=True)
class Reference:
    """A parsed ``drift.json``: its id, task, row count and figures by key."""

    id: str
    task: str
    rows: int
    figures: Mapping[str, ReferenceFigure]


def load_reference(doc: Mapping | bytes | str) -> Reference:
    """Parse and check a reference profile; :class:`BundleError` naming the field if malformed."""
    if not isinstance(doc, Mapping):
        try:
            doc = json.loads(doc)
        except (ValueError, RecursionError) as e:
            raise BundleError(f"drift reference is not JSON: {e}", field="drift.json") from None
    if not isinstance(doc, Mapping) or doc.get("schema") != REFERENCE_SCHEMA:
        raise BundleError(f"not a drift reference: expected schema {REFERENCE_SCHEMA!r}",
                          field="schema")
    figures: dict[str, ReferenceFigure] = {}
    try:
        for key, f in doc["figures"].items():
            figures[key] = _reference_figure(key, f)
        return Reference(str(doc["id"]), str(doc["task"]), int(doc["rows"]), figures)
    except (KeyError, TypeError, ValueError, AttributeError, ProtocolError) as e:
        raise BundleError(f"drift reference is malformed: {e}", field="figures") from None


def _reference_figure(key: str, f: Mapping) -> ReferenceFigure:
    base = {"key": key, "kind": f["kind"], "label": str(f.get("label", key)),
            "rows": int(f["rows"]), "mean": None if f.get("mean") is None else float(f["mean"])}
    if f["kind"] == "counts":
        return ReferenceFigure(**base, counts=tuple(int(c) for c in f["counts"]))
    if f["kind"] != "sketch":
        raise ValueError(f"figure {key}: unknown kind {f['kind']!r}")
    edges = tuple(float(e) for e in f["edges"])
    expected = tuple(float(e) for e in f["expected"])
    if len(expected) != len(edges) + 1 or list(edges) != sorted(set(edges)):
        raise ValueError(f"figure {key}: edges and expected masses do not fit")
    return ReferenceFigure(**base, edges=edges, expected=expected, std=float(f["std"]),
                           sketch=_sketch_bytes(f["sketch"], f"figures.{key}.sketch"))


@dataclass(frozen=True)
class FigureDrift:
    """How one figure compares with the reference.

    ``score`` is the largest of PSI / threshold, KS / max(threshold, critical value) and
    confidence drop / threshold: 1.0 means at the alert threshold. ``alert`` needs
    ``rows >= min_rows``; ``note`` says why a figure was not judged.
    """

    key: str
    label: str
    kind: str
    rows: int
    psi: float | None = None
    ks: float | None = None
    ks_critical: float | None = None
    wasserstein: float | None = None
    mean: float | None = None
    reference_mean: float | None = None
    confidence_drop: float | None = None
    score: float = 0.0
    alert: bool = False
    note: str = ""


@dataclass(frozen=True)
class DriftVerdict:
    """The judgement of a (merged) window against its reference.

    ``score`` is the largest figure score among judged figures (≥ 1.0 ⇔ ``alert``); ``judged``
    is False when no figure had ``min_rows`` rows yet.
    """

    reference_id: str
    calls: int
    sampled: int
    rows: int
    score: float
    alert: bool
    judged: bool
    figures: tuple[FigureDrift, ...]
    thresholds: DriftThresholds

    @property
    def alerts(self) -> tuple[FigureDrift, ...]:
        """The figures that alert."""
        return tuple(f for f in self.figures if f.alert)

    def to_dict(self) -> dict:
        """JSON-ready form for the fleet API."""
        return {"reference_id": self.reference_id, "calls": self.calls,
                "sampled": self.sampled, "rows": self.rows, "score": round(self.score, 4),
                "alert": self.alert, "judged": self.judged,
                "thresholds": self.thresholds.__dict__,
                "figures": [{k: (round(v, 5) if isinstance(v, float) else v)
                             for k, v in f.__dict__.items()} for f in self.figures]}


def judge(reference: Reference, window: WindowProfile, *,
          thresholds: DriftThresholds | None = None) -> DriftVerdict:
    """Compare a (merged) window with the reference; see :class:`DriftThresholds`.

    Raises :class:`DataError` when the window was sketched for another reference and
    :class:`ProtocolError` when its count vectors do not fit the reference's bins.
    """
    t = thresholds or DriftThresholds()
    if window.reference_id != reference.id:
        raise DataError(f"drift window is for reference {window.reference_id!r}, not "
                        f"{reference.id!r}: judge it against its own bundle's drift.json",
                        field="reference")
    figures = []
    for key, ref in reference.figures.items():
        if ref.kind == "sketch":
            fig = _judge_sketch(ref, window, t) if key in window.sketches else None
        else:
            fig = _judge_counts(ref, window, t) if key in window.counts else None
        figures.append(fig or FigureDrift(key, ref.label, ref.kind, 0, note="no data"))
    judged = [f for f in figures if f.rows >= t.min_rows]
    return DriftVerdict(reference.id, window.calls, window.sampled, window.rows,
                        score=max((f.score for f in judged), default=0.0),
                        alert=any(f.alert for f in figures), judged=bool(judged),
                        figures=tuple(figures), thresholds=t)


def _psi(actual: np.ndarray, expected: np.ndarray) -> float:
    a = np.clip(actual, _EPS, None)
    e = np.clip(expected, _EPS, None)
    return float(np.sum((a - e) * np.log(a / e)))


def _finish(ref: ReferenceFigure, rows: int, t: DriftThresholds, **figures: float) -> FigureDrift:
    ratios = [figures["psi"] / t.psi]
    if figures.get("ks") is not None:
        ratios.append(figures["ks"] / max(t.ks, figures["ks_critical"]))
    if figures.get("confidence_drop") is not None:
        ratios.append(figures["confidence_drop"] / t.confidence_drop)
    score = max(ratios)
    enough = rows >= t.min_rows
    note = "" if enough else f"{rows} of {t.min_rows} rows needed to judge"
    return FigureDrift(ref.key, ref.label, ref.kind, rows, score=score,
                       alert=enough and score >= 1.0, note=note, **figures)


def _judge_sketch(ref: ReferenceFigure, window: WindowProfile, t: DriftThresholds) -> FigureDrift:
    w, r = _kll(window.sketches[ref.key]), _kll(ref.sketch)
    if w.is_empty() or r.is_empty():
        return FigureDrift(ref.key, ref.label, ref.kind, 0, note="no data")
    cdf = w.get_cdf(list(ref.edges), inclusive=True) if ref.edges else [1.0]
    actual = np.diff(np.concatenate([[0.0], cdf]))
    points = sorted(set(r.get_quantiles(list(_GRID))) | set(w.get_quantiles(list(_GRID))))
    ks = float(np.max(np.abs(np.subtract(r.get_cdf(points, inclusive=True)[:-1],
                                         w.get_cdf(points, inclusive=True)[:-1]))))
    distance = float(np.mean(np.abs(np.subtract(r.get_quantiles(list(_MIDPOINTS)),
                                                w.get_quantiles(list(_MIDPOINTS))))))
    rows = window.rows
    # The two-sample critical value at ks_alpha, widened by both sketches' rank error (as the
    # sketch library's own KS test does): a KS below it may be sampling noise or sketch error.
    c_alpha = math.sqrt(-0.5 * math.log(t.ks_alpha / 2))
    critical = (c_alpha * math.sqrt((rows + ref.rows) / (rows * ref.rows))
                + r.normalized_rank_error(False) + w.normalized_rank_error(False))
    return _finish(ref, rows, t, psi=_psi(actual, np.asarray(ref.expected)), ks=ks,
                   ks_critical=critical,
                   wasserstein=distance / ref.std if ref.std > 0 else distance,
                   mean=float(np.mean(w.get_quantiles(list(_MIDPOINTS)))),
                   reference_mean=ref.mean)


def _judge_counts(ref: ReferenceFigure, window: WindowProfile, t: DriftThresholds) -> FigureDrift:
    counts = np.asarray(window.counts[ref.key], dtype=np.float64)
    if len(counts) != len(ref.counts):
        raise _bad(f"drift window has {len(counts)} bins for {ref.key!r}, the reference "
                   f"{len(ref.counts)}", f"c.{ref.key}")
    total = counts.sum()
    if total == 0:
        return FigureDrift(ref.key, ref.label, ref.kind, 0, note="no data")
    expected = np.asarray(ref.counts, dtype=np.float64)
    if ref.key.endswith(".conf"):  # ordered bins: group the sparse ones, as for sketched figures
        groups = _ordered_groups(expected / max(expected.sum(), 1.0))
        counts, expected = np.add.reduceat(counts, groups), np.add.reduceat(expected, groups)
    psi = _psi(counts / total, expected / max(expected.sum(), 1.0))
    rows = window.rows if ref.key.endswith(".tok") else int(total)
    if ref.key.endswith(".conf") and ref.mean is not None and ref.key in window.sums:
        mean = float(window.sums[ref.key] / total)
        return _finish(ref, rows, t, psi=psi, mean=mean, reference_mean=ref.mean,
                       confidence_drop=ref.mean - mean)
    return _finish(ref, rows, t, psi=psi)


def _ordered_groups(mass: np.ndarray, least: float = 0.1) -> list[int]:
    """Start indices of runs of adjacent bins holding at least ``least`` reference mass each."""
    starts, acc = [0], 0.0
    for i, m in enumerate(mass[:-1]):
        acc += m
        if acc >= least:
            starts.append(i + 1)
            acc = 0.0
    if len(starts) > 1 and acc + mass[-1] < least:
        starts.pop()  # the last run is too light: it joins the one before
    return starts
