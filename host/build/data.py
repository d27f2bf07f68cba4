"""Calibration, eval and sample data: ``.npz`` files matched to a model's inputs."""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepack.agent.errors import DataError

__all__ = ["TensorSpec", "Dataset", "load_dataset"]

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
    flag = {"calibration": "--calibration", "eval": "--eval"}.get(what, f"--{what}")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{flag} {path} is not a readable .npz file ({exc}). Save arrays keyed by "
                        "input name with numpy.savez.") from None
    try:
        with npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{flag} {path} holds arrays numpy cannot read without pickle ({exc}); "
                        "save plain numeric arrays (no object/string dtype).") from None
    labels = arrays.pop(LABELS, None) if allow_labels else None
    if not arrays:
        raise DataError(f"{flag} {path} holds no input arrays")
    names = [s.name for s in specs]
    if len(specs) == 1 and len(arrays) == 1 and names[0] not in arrays:
        arrays = {names[0]: next(iter(arrays.values()))}
    missing = [n for n in names if n not in arrays]
    if missing:
        raise DataError(f"{flag} {path} has no array for model input(s) {', '.join(missing)}; it "
                        f"has {', '.join(sorted(arrays))}. Key the arrays by input name.")
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
                f"{_fmt(shape)}: give samples along axis 0, i.e. (N, {_fmt(shape[1:])[1:-1]})")
        for i, (got, want) in enumerate(zip(arr.shape[1:], shape[1:], strict=False), start=1):
            if want is not None and got != want:
                raise DataError(f"{flag} array '{spec.name}' has shape {arr.shape}; dimension {i} "
                                f"is {got} but the model expects {want} ({_fmt(shape)})")
        want_dt = _np_dtype(spec.dtype)
        if arr.dtype != want_dt:
            if arr.dtype.kind in "fiu" and want_dt.kind == "f" and arr.dtype.kind != "f" or (
                    arr.dtype.kind == "f" and want_dt.kind == "f"):
                arr = arr.astype(want_dt)
            else:
                raise DataError(f"{flag} array '{spec.name}' is {arr.dtype}, but the model input "
                                f"is {want_dt}; convert it (arr.astype('{want_dt}'))")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise DataError(f"{flag} array '{spec.name}' contains {bad} NaN or infinite values; "
                            "clean the data (calibration ranges and the gate need finite inputs)")
        if n_samples is None:
            n_samples = arr.shape[0]
        elif arr.shape[0] != n_samples:
            raise DataError(f"{flag} arrays hold different sample counts ({n_samples} vs "
                            f"{arr.shape[0]} for '{spec.name}')")
        out[spec.name] = arr
    if not n_samples:
        raise DataError(f"{flag} {path} holds zero samples")
    if labels is not None and len(labels) != n_samples:
        raise DataError(f"{flag} 'labels' has {len(labels)} entries for {n_samples} samples")
    ds = Dataset(out, labels, str(path))
    if max_samples is not None and len(ds) > max_samples:
        ds = ds.take(slice(0, max_samples))
    return ds


def _fmt(shape: Sequence[int | None]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"
