"""The package stage: manifest and report assembled, signed, written as a bundle v1 archive.

:func:`write_bundle` writes archives deterministically (the host side of
``edgepack.agent.bundle``); :func:`package` is the last stage of every build, whatever the
model's format: the manifest's common entries, golden samples, ``report.json``, signature.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import io
import json
import os
import platform
import tempfile
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgepack.agent.bundle import MANIFEST, SCHEMA, SIGNATURE, read_bundle, validate_manifest
from edgepack.agent.errors import BundleError, ModelError

if TYPE_CHECKING:
    from edgepack.host.build.data import Dataset, TensorSpec
    from edgepack.host.build.plan import BuildPlan
    from edgepack.host.build.report import Progress
    from edgepack.host.build.result import BuildReport, BuildResult
    from edgepack.host.build.validate import Outputs

__all__ = ["check_outputs", "created", "golden", "health", "manifest", "npz_bytes", "package",
           "toolchain", "write_bundle"]

GOLDEN_SAMPLES = 8

# Fixed zip metadata so the same inputs give the same bytes.
_EPOCH = (1980, 1, 1, 0, 0, 0)


def _zinfo(name: str, data: bytes = b"") -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_EPOCH)
    info.compress_type = zipfile.ZIP_STORED if _bomb_like(data) else zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    info.create_system = 3
    return info


def _bomb_like(data: bytes) -> bool:
    """Would DEFLATE shrink ``data`` past what readers accept from an honest member?

    Models whose weights are one repeated constant (exporters' placeholders, test graphs)
    compress several hundred times; readers refuse such members as zip bombs, so they are stored.
    """
    from edgepack.agent.bundle import Limits

    if len(data) <= 1 << 20:
        return False
    return len(data) / max(1, len(zlib.compress(data, 1))) > Limits().max_ratio / 2


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """An ``.npz`` file as bytes, reproducible (``np.savez`` stamps the current time)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name in sorted(arrays):
            arr = io.BytesIO()
            np.lib.format.write_array(arr, np.ascontiguousarray(arrays[name]),
                                      allow_pickle=False)
            zf.writestr(_zinfo(f"{name}.npy"), arr.getvalue())
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_bundle(out_path: str | os.PathLike, manifest: dict[str, Any], model_bytes: bytes,
                 files: Mapping[str, bytes], *, sign: Any = None) -> Path:
    """Fill in hashes, sign the manifest and write the archive atomically.

    ``manifest`` is completed in place with ``schema``, ``model.sha256``/``bytes`` and ``files``.
    ``sign`` is a callable ``bytes -> signature dict`` (``edgepack.host.keys.sign_bytes`` bound to
    a key) or None for an unsigned bundle. The file appears at ``out_path`` only when complete and
    readable; nothing partial is ever left behind.
    """
    out_path = Path(out_path)
    manifest["schema"] = SCHEMA
    manifest["model"]["sha256"] = _sha(model_bytes)
    manifest["model"]["bytes"] = len(model_bytes)
    manifest["files"] = {name: _sha(data) for name, data in sorted(files.items())}
    validate_manifest(manifest)
    manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"
    members: list[tuple[str, bytes]] = [(MANIFEST, manifest_bytes),
                                        (manifest["model"]["file"], model_bytes)]
    members += sorted(files.items())
    if sign is not None:
        members.append((SIGNATURE, json.dumps(sign(manifest_bytes), sort_keys=True).encode()))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=".edgepack", dir=out_path.parent)
    try:
        with os.fdopen(fd, "wb") as raw, zipfile.ZipFile(raw, "w") as zf:
            for name, data in members:
                zf.writestr(_zinfo(name, data), data)
        read_bundle(tmp)  # never ship what the device could not read
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if not out_path.exists():
        raise BundleError(f"bundle {out_path} was not written")
    return out_path


def created() -> str:
    """The build time (``SOURCE_DATE_EPOCH`` when set, for reproducible bundles)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    t = (_dt.datetime.fromtimestamp(int(epoch), _dt.timezone.utc) if epoch
         else _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0))
    return t.isoformat().replace("+00:00", "Z")


def toolchain(*packages: str) -> dict[str, str]:
    """Versions of Python, edgepack, the ONNX tools and ``packages``."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("edgepack", "onnx", "onnxruntime", "onnxconverter-common", "numpy", *packages):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def golden(inputs: Sequence[TensorSpec], evalset: Dataset, outputs: Outputs,
           batch: int) -> tuple[dict[str, np.ndarray], int]:
    """Up to GOLDEN_SAMPLES model-shaped feeds (``batch`` rows each) and their outputs.

    String tensors are numpy str arrays (``<U``), which ``.npz`` holds without pickle.
    """
    n = max(1, min(GOLDEN_SAMPLES, len(evalset) // batch))
    rows = n * batch
    arrays: dict[str, np.ndarray] = {}
    for i, spec in enumerate(inputs):
        arrays[f"input_{i}"] = _plain(evalset.inputs[spec.name][:rows]).reshape(n, *spec.shape)
    for j, arr in enumerate(outputs.arrays):
        if arr is not None:
            arrays[f"output_{j}"] = _plain(arr[:rows]).reshape(n, batch, *arr.shape[1:])
    return arrays, n


def _plain(arr: np.ndarray) -> np.ndarray:
    return arr.astype(str) if arr.dtype.kind == "O" else arr


def health(mode: str, outputs: Outputs) -> dict[str, float]:
    """Tolerances of the device's golden check for a model quantized as ``mode``."""
    # Int8 kernels differ by a rounding step between CPUs (x86 VNNI vs ARM NEON), so the
    # device's check is looser than bit-exactness but tight enough to catch a broken model.
    loose = mode in ("int8", "dynamic")
    scale = max((float(np.nanmax(np.abs(a))) for a in outputs.arrays
                 if a is not None and a.dtype.kind == "f" and np.isfinite(a).any()),
                default=1.0)
    return {"atol": (0.05 if loose else 1e-3) * max(scale, 1e-6) + 1e-5,
            "rtol": 0.05 if loose else 1e-3,
            "min_cosine": 0.99 if loose else 0.999,
            "min_label_agreement": 0.85 if loose else 1.0}


def manifest(plan: BuildPlan, *, model: dict, runtime: dict, optimization: dict,
             metrics: dict, health: dict, toolchain: dict,
             budgets: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of ``plan``'s bundle (``model.sha256``/``files`` are filled when written)."""
    b = plan.profile.budgets
    return {
        "name": plan.name, "version": plan.package.version, "created": created(),
        "target": plan.profile.name, "model": model, "runtime": runtime,
        "optimization": optimization, "metrics": metrics, "health": health,
        "budgets": {"p95_ms": b.p95_ms, "peak_rss_mb": b.rss_mb, "model_mb": b.model_mb,
                    **(budgets or {})},
        "toolchain": toolchain,
    }


def _non_tensor(dtype: str) -> bool:
    return dtype in ("sequence", "map", "unknown") or dtype.endswith("_type")


def check_outputs(plan: BuildPlan, outputs: Sequence[Mapping[str, Any]]) -> None:
    """Refuse outputs that are not tensors (sequences, maps) unless the plan allows them.

    Every runtime reads tensors; sequences of maps (skl2onnx's ZipMap) only full onnxruntime
    builds do: mobile and web runtimes, LiteRT and most C API callers fail on them.
    """
    odd = [f"'{o['name']}' ({o.get('dtype')})" for o in outputs
           if _non_tensor(str(o.get("dtype")))]
    if odd and not plan.package.allow_non_tensor_outputs:
        raise ModelError(
            f"output{'s' if len(odd) > 1 else ''} {', '.join(odd)} of {plan.model.name} "
            f"{'are' if len(odd) > 1 else 'is'} not a tensor: mobile and web runtimes, LiteRT "
            "and most C API callers cannot read sequences or maps, so devices would fail the "
            "health gate. Export the model with tensor outputs (skl2onnx: "
            "options={'zipmap': False} gives probabilities as a float tensor), or "
            "pass `allow_non_tensor_outputs=` to ship them as they are (devices running full "
            "onnxruntime read them).", stage="package", field="allow_non_tensor_outputs")


def _json_default(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else float(v)


def report_json(report: dict[str, Any]) -> bytes:
    return json.dumps(report, indent=2, sort_keys=True, default=_json_default).encode()


def bundle_path(plan: BuildPlan) -> Path:
    return Path(plan.package.out_dir) / \
        f"{plan.name}-{plan.package.version}-{plan.profile.name}.edgepack"


def package(plan: BuildPlan, manifest: dict[str, Any], model_bytes: bytes,
            files: Mapping[str, bytes], golden: Mapping[str, np.ndarray], report: BuildReport,
            progress: Progress) -> BuildResult:
    """Sign (with the plan's key) and write ``NAME-VERSION-TARGET.edgepack``; finish the report.

    ``report.warnings`` is the list the manifest's ``optimization.warnings`` holds too: the
    unsigned-bundle warning lands in both.
    """
    from dataclasses import replace

    from edgepack.agent.bundle import sha256_file
    from edgepack.host.build.result import BuildResult
    from edgepack.host.keys import signer

    check_outputs(plan, manifest["model"]["outputs"])
    sign, signed_by = signer(plan.package.key)
    if sign is None:
        report.warnings.append("the bundle is unsigned (no signing key): devices refuse it "
                               "unless allow_unsigned = true")
    out = bundle_path(plan)
    third_party = progress.third_party_output()
    if third_party is not None:
        report = replace(report, third_party_output=third_party)
    files = {**files, "golden.npz": npz_bytes(golden),
             "report.json": report_json(report.to_dict())}
    with progress.stage("packaging"):
        write_bundle(out, manifest, model_bytes, files, sign=sign)
    bid = sha256_file(out)
    report = replace(report, timings_s=dict(progress.timings), bundle={
        "path": str(out), "bundle_id": bid, "bytes": out.stat().st_size, "name": plan.name,
        "version": plan.package.version, "target": plan.profile.name, "signed_by": signed_by})
    return BuildResult(path=out, bundle_id=bid, manifest=manifest, report=report,
                       model_bytes=model_bytes)
