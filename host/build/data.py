"""Calibration, eval and sample data: ``.npz`` files matched to a model's inputs."""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepack.agent.errors import DataError

__all__ = ["Dataset", "GateData", "InputDomain", "STRING_DTYPES", "TensorSpec", "check_arrays",
           "load_dataset", "load_gate_data"]

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


STRING_DTYPES = ("string", "str")  # a string tensor's dtype (the manifest says "string")


def _np_dtype(dtype: str) -> np.dtype:
    return np.dtype(str) if dtype in STRING_DTYPES else np.dtype(dtype)


@dataclass(frozen=True)
class InputDomain:
    """What an importer knows about a model's inputs beyond their tensor types.

    ``missing_ok``: NaN (numbers) and ``""`` (strings) are missing values the model handles (PMML),
    so data may hold them. ``synthesized``: rows to gate and write golden samples with when no
    data is given (instead of random ones). ``label_field``: the column or array that holds the
    expected class labels when there is no ``labels`` entry.
    """

    missing_ok: bool = False
    synthesized: Dataset | None = None
    label_field: str | None = None


def load_dataset(path: str | Path, specs: Sequence[TensorSpec], *, what: str = "calibration",
                 max_samples: int | None = None, allow_labels: bool = True,
                 domain: InputDomain | None = None) -> Dataset:
    """Read an ``.npz`` (or a ``.csv`` with a header) and check it against the model's inputs.

    Arrays are keyed by input name; a single-input model also accepts one array under any key.
    Each array holds samples along axis 0: shape ``(N, *shape[1:])`` for a batch-first input, or
    exactly ``(N, *shape)`` when the file already carries the batch axis of 1; an input of one
    value per sample (``(N, 1)``) also takes a flat ``(N,)`` array. A CSV names the inputs in its
    header, one column per input taking one value per sample; an empty cell is a missing value.
    """
    path = Path(path)
    flag = f"`{what.replace('-', '_')}=`"
    field = what.replace("-", "_")
    domain = domain or InputDomain()
    if path.suffix.lower() == ".csv":
        arrays = _read_csv(path, specs, flag, field, domain)
    else:
        arrays = _read_npz(path, flag, field)
    labels = None
    if allow_labels:
        labels = arrays.pop(LABELS, None)
        if labels is None and domain.label_field and domain.label_field not in \
                {s.name for s in specs}:
            labels = arrays.pop(domain.label_field, None)
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
    ds = check_arrays(arrays, specs, flag=flag, field=field, source=str(path),
                      missing_ok=domain.missing_ok, labels=labels)
    if max_samples is not None and len(ds) > max_samples:
        ds = ds.take(slice(0, max_samples))
    return ds


def _read_npz(path: Path, flag: str, field: str) -> dict[str, np.ndarray]:
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{flag} {path} is not a readable .npz file ({exc}). Save arrays keyed by "
                        "input name with numpy.savez, or give a CSV with a header.",
                        field=field) from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        return {"input": np.asarray(npz)}  # a plain .npy holds one array
    try:
        with npz:
            return {k: npz[k] for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{flag} {path} holds arrays numpy cannot read without pickle ({exc}); "
                        "save numeric arrays, and strings as numpy str arrays "
                        "(np.array(values, dtype=str)), not object arrays.",
                        field=field) from None


def _read_csv(path: Path, specs: Sequence[TensorSpec], flag: str, field: str,
              domain: InputDomain) -> dict[str, np.ndarray]:
    """One array per model input (and the labels column) from a CSV with a header."""
    import csv

    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{flag} {path} is not a readable CSV file ({exc})", field=field) from None
    if not rows or not any(c.strip() for c in rows[0]):
        raise DataError(f"{flag} {path} has no header: its first line must name the columns "
                        "(the model's input names)", field=field)
    header = [c.strip() for c in rows[0]]
    body = [r for r in rows[1:] if any(c.strip() for c in r)]
    for i, r in enumerate(body, start=2):
        if len(r) != len(header):
            raise DataError(f"{flag} {path} line {i} has {len(r)} cells for {len(header)} "
                            "columns", field=field)
    wanted = {s.name: s for s in specs}
    out: dict[str, np.ndarray] = {}
    for j, name in enumerate(header):
        cells = [r[j].strip() for r in body]
        spec = wanted.get(name)
        if name in (LABELS, domain.label_field) and spec is None:
            out[name] = np.array(cells, dtype=str)
        elif spec is not None:
            if len([d for d in spec.shape[1:] if d != 1]) or len(spec.shape) > 2:
                raise DataError(f"{flag} {path}: model input '{name}' takes "
                                f"{_fmt(spec.shape)} per sample; a CSV column gives one value. "
                                "Use an .npz for this model.", field=field)
            out[name] = _csv_column(cells, spec, name, flag, field, path)
    return out


def _csv_column(cells: list[str], spec: TensorSpec, name: str, flag: str, field: str,
                path: Path) -> np.ndarray:
    if spec.dtype in STRING_DTYPES:
        return np.array(cells, dtype=str)
    values = []
    for i, c in enumerate(cells, start=2):
        try:
            values.append(float(c) if c else np.nan)
        except ValueError:
            raise DataError(f"{flag} {path} line {i}, column '{name}': {c!r} is not a number "
                            f"(the model input is {spec.dtype})", field=field) from None
    return np.array(values, dtype=np.float64)


def check_arrays(arrays: dict[str, np.ndarray], specs: Sequence[TensorSpec], *, flag: str,
                 field: str, source: str, missing_ok: bool = False,
                 labels: np.ndarray | None = None) -> Dataset:
    """A Dataset of ``arrays`` shaped and typed for ``specs``, or a DataError saying what is off."""
    out: dict[str, np.ndarray] = {}
    n_samples = None
    for spec in specs:
        arr = _shaped(arrays[spec.name], spec, flag, field)
        arr = _typed(arr, spec, flag, field, missing_ok)
        if n_samples is None:
            n_samples = arr.shape[0]
        elif arr.shape[0] != n_samples:
            raise DataError(f"{flag} arrays hold different sample counts ({n_samples} vs "
                            f"{arr.shape[0]} for '{spec.name}')", field=field)
        out[spec.name] = arr
    if not n_samples:
        raise DataError(f"{flag} {source} holds zero samples", field=field)
    if labels is not None and len(labels) != n_samples:
        raise DataError(f"{flag} 'labels' has {len(labels)} entries for {n_samples} samples",
                        field=field)
    return Dataset(out, labels, source)


def _shaped(arr: np.ndarray, spec: TensorSpec, flag: str, field: str) -> np.ndarray:
    shape = spec.shape
    if arr.ndim == len(shape) + 1 and arr.shape[1:2] == (1,) and shape[:1] in ((1,), (None,)):
        arr = arr.reshape(arr.shape[0], *arr.shape[2:])  # (N, 1, ...) → (N, ...)
    if arr.ndim == len(shape) - 1 and shape[-1:] == (1,):
        arr = arr.reshape(*arr.shape, 1)  # one value per sample given flat: (N,) → (N, 1)
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
    return arr


def _typed(arr: np.ndarray, spec: TensorSpec, flag: str, field: str,
           missing_ok: bool) -> np.ndarray:
    want_dt = _np_dtype(spec.dtype)
    if want_dt.kind == "U":
        if arr.dtype.kind == "S":
            arr = np.char.decode(arr, "utf-8")
        elif arr.dtype.kind in "iub":
            arr = arr.astype(str)
        elif arr.dtype.kind != "U":
            raise DataError(f"{flag} array '{spec.name}' is {arr.dtype}, but the model input is "
                            "a string; give a numpy str array (np.array(values, dtype=str))",
                            field=field)
        return arr
    if arr.dtype != want_dt:
        if arr.dtype.kind in "fiu" and want_dt.kind == "f" and arr.dtype.kind != "f" or (
                arr.dtype.kind == "f" and want_dt.kind == "f"):
            arr = arr.astype(want_dt)
        else:
            raise DataError(f"{flag} array '{spec.name}' is {arr.dtype}, but the model input "
                            f"is {want_dt}; convert it (arr.astype('{want_dt}'))", field=field)
    if arr.dtype.kind == "f" and not missing_ok and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise DataError(f"{flag} array '{spec.name}' contains {bad} NaN or infinite values; "
                        "clean the data (calibration ranges and the gate need finite inputs)",
                        field=field)
    return arr


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
                   cap: int, domain: InputDomain | None = None) -> GateData:
    """Calibration set and eval set (held out from calibration when no eval data is given).

    Without any data, ``domain.synthesized`` rows (when the importer made some) or random
    inputs are the eval set.
    """
    calib = evalset = None
    if calibration:
        calib = load_dataset(calibration, specs, what="calibration", domain=domain)
    if eval:
        evalset = load_dataset(eval, specs, what="eval", domain=domain)
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
        evalset = load_dataset(sample_input, specs, what="sample_input", domain=domain)
        source = f"sample input {Path(sample_input).name} (no eval data given)"
    elif domain is not None and domain.synthesized is not None:
        syn = domain.synthesized
        evalset = check_arrays(dict(syn.inputs), specs, flag="synthesized inputs",
                               field="eval", source=syn.source, missing_ok=True)
        source = syn.source
    else:
        rng = np.random.default_rng(0)
        arrays = {}
        for s in specs:
            shape = (16, *s.shape[1:])
            dt = _np_dtype(s.dtype)
            arrays[s.name] = (rng.standard_normal(shape).astype(dt) if dt.kind == "f"
                              else rng.integers(0, 2, shape).astype(dt))
        evalset = Dataset(arrays, None, "random")
        source = RANDOM_SOURCE
    if calib is not None and len(calib) > cap:
        calib = calib.take(slice(0, cap))
    return GateData(calib, evalset, source)
