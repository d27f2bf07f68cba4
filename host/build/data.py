"""Calibration, eval and sample data: ``.npz`` files matched to a model's inputs."""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepack.agent.errors import DataError

__all__ = ["Dataset", "GateData", "TensorSpec", "load_dataset", "load_gate_data"]

LABELS = "labels"


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: name, numpy dtype name, shape (None for dynamic dims)."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]


@dataclass(frozen=True)
class Dataset:
    """Samples keyed by input name, each array shaped ``(N, *input_shape_without_batch)``."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: str

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, idx: Sequence[int] | slice) -> Dataset:
        return Dataset({k: v[idx] for k, v in self.inputs.items()},
                       None if self.labels is None else self.labels[idx], self.source)

    def batches(self, batch: int = 1) -> Iterator[dict[str, np.ndarray]]:
        """Feeds for a model whose batch dimension is ``batch``."""
        n = len(self) - len(self) % batch if len(self) >= batch else 0
        for i in range(0, n, batch):
            yield {k: v[i:i + batch] for k, v in self.inputs.items()}

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for k in sorted(self.inputs):
            h.update(k.encode())
            h.update(np.ascontiguousarray(self.inputs[k]).tobytes())
        return h.hexdigest()[:16]


def _np_dtype(dtype: str) -> np.dtype:
    return np.dtype(dtype)


def load_dataset(path: str | Path, specs: Sequence[TensorSpec], *, what: str = "calibration",
                 max_samples: int | None = None, allow_labels: bool = True) -> Dataset:
    """Read an ``.npz`` and check it against the model's inputs.

    Arrays are keyed by input name; a single-input model also accepts one array under any key.
    Each array holds samples along axis 0: shape ``(N, *shape[1:])`` for a batch-first input, or
    exactly ``(N, *shape)`` when the file already carries the batch axis of 1.
    """
    path = Path(path)
    flag = f"`{what.replace('-', '_')}=`"
    field = what.replace("-", "_")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{flag} {path} is not a readable .npz file ({exc}). Save arrays keyed by "
                        "input name with numpy.savez.", field=field) from None
    try:
        with npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{flag} {path} holds arrays numpy cannot read without pickle ({exc}); "
                        "save plain numeric arrays (no object/string dtype).",
                        field=field) from None
    labels = arrays.pop(LABELS, None) if allow_labels else None
    if not arrays:
        raise DataError(f"{flag} {path} holds no input arrays", field=field)
    names = [s.name for s in specs]
    if len(specs) == 1 and len(arrays) == 1 and names[0] not in arrays:
        arrays = {names[0]: next(iter(arrays.values()))}
    missing = [n for n in names if n not in arrays]
    if missing:
        raise DataError(f"{flag} {path} has no array for model input(s) {', '.join(missing)}; it "
                        f"has {', '.join(sorted(arrays))}. Key the arrays by input name.",
                        field=field)
    out: dict[str, np.ndarray] = {}
    n_samples = None
    for spec in specs:
        arr = arrays[spec.name]
        shape = spec.shape
        if arr.ndim == len(shape) + 1 and arr.shape[1:2] == (1,) and shape[:1] in ((1,), (None,)):
            arr = arr.reshape(arr.shape[0], *arr.shape[2:])  # (N, 1, ...) → (N, ...)
        if arr.ndim != len(shape):
            raise DataError(
                f"{flag} array '{spec.name}' has shape {arr.shape}, but the model input is "
                f"{_fmt(shape)}: give samples along axis 0, i.e. (N, {_fmt(shape[1:])[1:-1]})",
                field=field)
        for i, (got, want) in enumerate(zip(arr.shape[1:], shape[1:], strict=False), start=1):
            if want is not None and got != want:
                raise DataError(f"{flag} array '{spec.name}' has shape {arr.shape}; dimension {i} "
                                f"is {got} but the model expects {want} ({_fmt(shape)})",
                                field=field)
        want_dt = _np_dtype(spec.dtype)
        if arr.dtype != want_dt:
            if arr.dtype.kind in "fiu" and want_dt.kind == "f" and arr.dtype.kind != "f" or (
                    arr.dtype.kind == "f" and want_dt.kind == "f"):
                arr = arr.astype(want_dt)
            else:
                raise DataError(f"{flag} array '{spec.name}' is {arr.dtype}, but the model input "
                                f"is {want_dt}; convert it (arr.astype('{want_dt}'))", field=field)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise DataError(f"{flag} array '{spec.name}' contains {bad} NaN or infinite values; "
                            "clean the data (calibration ranges and the gate need finite inputs)",
                            field=field)
        if n_samples is None:
            n_samples = arr.shape[0]
        elif arr.shape[0] != n_samples:
            raise DataError(f"{flag} arrays hold different sample counts ({n_samples} vs "
                            f"{arr.shape[0]} for '{spec.name}')", field=field)
        out[spec.name] = arr
    if not n_samples:
        raise DataError(f"{flag} {path} holds zero samples", field=field)
    if labels is not None and len(labels) != n_samples:
        raise DataError(f"{flag} 'labels' has {len(labels)} entries for {n_samples} samples",
                        field=field)
    ds = Dataset(out, labels, str(path))
    if max_samples is not None and len(ds) > max_samples:
        ds = ds.take(slice(0, max_samples))
    return ds


def _fmt(shape: Sequence[int | None]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


HOLDOUT_FRACTION = 0.2
RANDOM_SOURCE = "16 random inputs (no eval or calibration data given: pass eval data for a " \
    "real gate)"


@dataclass(frozen=True)
class GateData:
    """What the gate and the calibrator read: calibration set, eval set and where it came from."""

    calib: Dataset | None
    evalset: Dataset
    source: str

    @property
    def random(self) -> bool:
        return self.source == RANDOM_SOURCE


def load_gate_data(specs: Sequence[TensorSpec], *, calibration: str | None,
                   eval: str | None, sample_input: str | None,  # noqa: A002
                   cap: int) -> GateData:
    """Calibration set and eval set (held out from calibration when no eval data is given)."""
    calib = evalset = None
    if calibration:
        calib = load_dataset(calibration, specs, what="calibration")
    if eval:
        evalset = load_dataset(eval, specs, what="eval")
        source = f"eval data {Path(eval).name}"
    elif calib is not None and len(calib) >= 2:
        n_hold = max(1, int(round(len(calib) * HOLDOUT_FRACTION)))
        evalset = calib.take(slice(len(calib) - n_hold, len(calib)))
        calib = calib.take(slice(0, len(calib) - n_hold))
        source = f"{n_hold} samples held out of the calibration data"
    elif calib is not None:
        evalset = calib
        source = "the single calibration sample (no eval data given)"
    elif sample_input:
        evalset = load_dataset(sample_input, specs, what="sample_input")
        source = f"sample input {Path(sample_input).name} (no eval data given)"
    else:
        rng = np.random.default_rng(0)
        arrays = {}
        for s in specs:
            shape = (16, *s.shape[1:])
            dt = np.dtype(s.dtype)
            arrays[s.name] = (rng.standard_normal(shape).astype(dt) if dt.kind == "f"
                              else rng.integers(0, 2, shape).astype(dt))
        evalset = Dataset(arrays, None, "random")
        source = RANDOM_SOURCE
    if calib is not None and len(calib) > cap:
        calib = calib.take(slice(0, cap))
    return GateData(calib, evalset, source)
