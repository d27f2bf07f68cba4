"""The plan stage: arguments plus a target profile become a frozen :class:`BuildPlan`.

Everything a build was asked to do is grouped by the stage that reads it (what to quantize,
which data feeds the gate, how to prune, how to package, which devices choose); the plan also
holds what the arguments resolve to against the profile (the quantization mode, the bundle
name, the output format, which follows the input's format). Mistakes in the arguments fail
here, before anything slow; what depends on the model itself (does it need calibration data? is
a TFLite model already quantized?) is checked right after import by :func:`check_imported`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgepack.agent.errors import DataError, ModelError
from edgepack.agent.profiles import Profile, QuantScheme, load_profile

__all__ = [
    "BuildPlan",
    "DataConfig",
    "PackageConfig",
    "ProfileOnConfig",
    "PruneConfig",
    "QuantizeConfig",
    "check_imported",
    "default_format",
    "host_threads",
    "make_plan",
]

QUANTIZE_MODES = ("auto", "int8", "dynamic", "fp16", "none")
_TFLITE_FORMATS = ("tflite", "tflm")


@dataclass(frozen=True)
class QuantizeConfig:
    """What the optimize stage tries: the mode and the int8 knobs."""

    mode: str = "auto"  # auto | int8 | dynamic | fp16 | none
    scheme: QuantScheme | None = None  # int8 scheme instead of the profile's default
    calibration_method: str | None = None  # minmax | entropy | percentile
    calibration_samples: int | None = None  # cap on calibration samples
    variants: bool = True  # time the profile's candidate int8 schemes and keep the fastest
    keep_io_types: bool = True  # fp16: keep float32 inputs/outputs
    tflite_io: str | None = None  # full-int8 TFLite I/O: float32 | int8 | uint8


@dataclass(frozen=True)
class DataConfig:
    """The data the gate and the calibrator read (``.npz`` files keyed by input name)."""

    calibration: str | None = None
    eval: str | None = None
    sample_input: str | None = None
    batch: int = 1
    max_drop: float | None = None  # points; default: the profile's


@dataclass(frozen=True)
class PruneConfig:
    """Magnitude pruning before quantization (``train``: fine-tune a Keras model on it)."""

    sparsity: float | None = None
    train: str | None = None


@dataclass(frozen=True)
class PackageConfig:
    """What the package stage writes: ``OUT/NAME-VERSION-TARGET.edgepack``, signed with ``key``."""

    name: str | None = None
    version: str = "1.0.0"
    key: str | None = None
    out_dir: str = "dist"
    format: str | None = None  # onnx | tflite | tflm; default: the target's first format
    allow_non_tensor_outputs: bool = False  # ship sequence/map outputs (ZipMap) as they are


@dataclass(frozen=True)
class ProfileOnConfig:
    """Device-in-the-loop choice: these devices measure every candidate and choose."""

    devices: tuple[str, ...] = ()
    broker: str | None = None
    fleet: str = "default"
    timeout: float = 600.0
    runs: int = 50
    cache: str | None = None
    db: str | None = None  # fleet database with the devices' enrolled keys (None: ./fleet.db)


@dataclass(frozen=True)
class BuildPlan:
    """A build decided: the arguments by concern, resolved against the target profile."""

    model: Path
    profile: Profile
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    package: PackageConfig = field(default_factory=PackageConfig)
    profile_on: ProfileOnConfig = field(default_factory=ProfileOnConfig)
    source_kind: str = ""  # the input's format (importers.KINDS); "" when not detected

    @property
    def target(self) -> str:
        return self.profile.name

    @property
    def mode(self) -> str:
        """The quantization mode asked for (``auto`` resolved to the profile's default)."""
        m = self.quantize.mode
        return self.profile.quantization.default if m == "auto" else m

    @property
    def name(self) -> str:
        return self.package.name or self.model.stem or self.model.name

    @property
    def format(self) -> str:
        """onnx, tflite or tflm: what the bundle's model is.

        ``format=`` when given; else it follows the input: a TFLite input stays TFLite (``tflm``
        on microcontrollers), scikit-learn and PMML models become ONNX, anything else takes the
        target's first format.
        """
        fmt = self.package.format or default_format(self.profile, self.source_kind)
        return fmt if fmt in ("tflite", "tflm") else "onnx"

    @property
    def max_drop(self) -> float:
        d = self.data.max_drop
        return d if d is not None else self.profile.quantization.max_drop_points

    @property
    def calibration_method(self) -> str:
        return self.quantize.calibration_method or self.profile.quantization.calibration_method

    @property
    def threads(self) -> int:
        return host_threads(self.profile)

    def with_quantize(self, **changes: object) -> BuildPlan:
        return replace(self, quantize=replace(self.quantize, **changes))


def host_threads(profile: Profile) -> int:
    """Inference threads on this host for ``profile``: the target's, at most this host's cores."""
    want = profile.runtime.threads or profile.hardware.cores
    return max(1, min(want, os.cpu_count() or 1))


def make_plan(model: str | Path, *, target: str, quantize: str = "auto",
              calibration: str | None = None, calibration_method: str | None = None,
              calibration_samples: int | None = None, eval: str | None = None,  # noqa: A002
              sample_input: str | None = None, max_drop: float | None = None, batch: int = 1,
              name: str | None = None, version: str = "1.0.0", key: str | None = None,
              out: str = "dist", variants: bool = True, keep_io_types: bool = True,
              format: str | None = None, tflite_io: str | None = None,  # noqa: A002
              prune: float | None = None, train: str | None = None,
              scheme: QuantScheme | None = None, profile_on: tuple[str, ...] | list[str] = (),
              broker: str | None = None, fleet: str = "default",
              profile_timeout: float = 600.0, profile_runs: int = 50,
              profile_cache: str | None = None, fleet_db: str | None = None,
              allow_non_tensor_outputs: bool = False) -> BuildPlan:
    """Check the arguments against the target profile and freeze them into a :class:`BuildPlan`.

    Raises :class:`ProfileError`, :class:`ModelError` or :class:`DataError` (with ``field=``
    naming the argument) before anything slow runs.
    """
    from edgepack.agent.bundle import parse_version
    from edgepack.agent.protocol import check_id
    from edgepack.host.build.importers import detect_kind

    profile = load_profile(target)
    if quantize not in QUANTIZE_MODES:
        raise ModelError(f"`quantize=` takes one of {', '.join(QUANTIZE_MODES)}, not "
                         f"{quantize!r}", field="quantize")
    kind = detect_kind(model)  # unknown formats fail before anything slow
    _check_format(kind, format, profile)
    if kind == "pmml":
        quantize = _pmml_mode(quantize)
    plan = BuildPlan(
        model=Path(model), profile=profile,
        quantize=QuantizeConfig(mode=quantize, scheme=scheme,
                                calibration_method=calibration_method,
                                calibration_samples=calibration_samples, variants=variants,
                                keep_io_types=keep_io_types, tflite_io=tflite_io),
        data=DataConfig(calibration=_opt_str(calibration), eval=_opt_str(eval),
                        sample_input=_opt_str(sample_input), batch=batch, max_drop=max_drop),
        prune=PruneConfig(sparsity=prune, train=_opt_str(train)),
        package=PackageConfig(name=name, version=version, key=_opt_str(key),
                              out_dir=str(out), format=format,
                              allow_non_tensor_outputs=allow_non_tensor_outputs),
        profile_on=ProfileOnConfig(devices=tuple(profile_on), broker=broker, fleet=fleet,
                                   timeout=profile_timeout, runs=profile_runs,
                                   cache=_opt_str(profile_cache), db=_opt_str(fleet_db)),
        source_kind=kind)
    check_id(plan.name, "bundle name")
    parse_version(version)
    if format and format not in profile.runtime.formats:
        raise ModelError(f"target {profile.name} runs {'/'.join(profile.runtime.formats)}, not "
                         f"{format}", target=profile.name, field="format")
    if profile_on and (not broker or not key):
        raise DataError("`profile_on=` needs `broker=` (where the devices are) and `key=` (jobs "
                        "and candidate bundles are signed)",
                        field="key" if broker else "broker")
    if prune is not None and not 0.0 < prune < 1.0:
        raise ModelError(f"`prune=` takes a sparsity between 0 and 1 (exclusive), not {prune}",
                         field="prune")
    return plan


def default_format(profile: Profile, kind: str) -> str:
    """The bundle format when ``format=`` is not given: it follows the input ``kind``."""
    formats = profile.runtime.formats
    if kind == "tflite":
        return next((f for f in formats if f in _TFLITE_FORMATS), formats[0])
    if kind in ("sklearn", "pmml") and "onnx" in formats:
        return "onnx"  # no TFLite path for trees, forests and PMML documents
    return formats[0]


def _check_format(kind: str, format: str | None, profile: Profile) -> None:  # noqa: A002
    """A TFLite input packages as TFLite (or TFLM): it is never converted to ONNX."""
    if kind != "tflite":
        return
    what = ("give the source model (Keras, SavedModel or ONNX) for an ONNX bundle; edgepack "
            "does not convert TFLite to ONNX")
    if format == "onnx":
        raise ModelError(f"`format=` onnx cannot take a TFLite model: drop `format=` to package "
                         f"it as TFLite, or {what}.", target=profile.name, field="format")
    if not any(f in _TFLITE_FORMATS for f in profile.runtime.formats):
        raise ModelError(f"target {profile.name} runs {'/'.join(profile.runtime.formats)} only "
                         f"and this is a TFLite model: pick a target that runs TFLite (edgepack "
                         f"targets list), or {what}.", target=profile.name, field="target")


# `quantize=` values that ask for what an already-quantized TFLite model is (no-ops).
_SAME_AS = {"int8": ("int8", "uint8"), "dynamic": ("dynamic-int8",), "fp16": ("float16",)}


def check_imported(plan: BuildPlan, imported: Any) -> None:
    """The checks that need the model read: a quantized TFLite model is packaged as it is (a
    `quantize=` asking for something else is refused); int8 needs calibration data only when the
    model will really be quantized to int8 (not trees, forests, PMML or a quantized TFLite).
    """
    name, target = plan.model.name, plan.profile.name
    tflite = getattr(imported, "tflite_bytes", None)
    if tflite:
        from edgepack.host.build.tflite_intake import inspect_tflite

        dtype = inspect_tflite(bytes(tflite), name=name).dtype
        asked = plan.quantize.mode
        if dtype != "float32":
            if asked not in ("auto", "none") and dtype not in _SAME_AS.get(asked, ()):
                raise ModelError(
                    f"{name} is already quantized ({dtype}) and cannot be re-quantized to "
                    f"{asked}: leave `quantize=` at auto to package it as it is, or give the "
                    "float source model (Keras, SavedModel, ONNX or a float .tflite).",
                    target=target, field="quantize")
            return
    if plan.mode != "int8" or plan.data.calibration or plan.source_kind == "pmml" or \
            getattr(imported, "float_only", False):
        return
    if plan.profile.runtime.integer_only:
        why = (f"{target} runs integer-only kernels, so this float network must be quantized to "
               "int8, which needs calibration data: pass `calibration=` data.npz (a few hundred "
               "representative inputs keyed by input name).")
    else:
        others = "dynamic or none" if tflite else "dynamic, fp16 or none"
        why = (f"{target} quantizes to int8 by default, which needs calibration data: pass "
               "`calibration=` data.npz (a few hundred representative inputs keyed by input "
               f"name), or choose `quantize=` {others} (no calibration).")
    raise DataError(f"{name} is a float network; {why}", target=target, field="calibration",
                    stage="import")


def _pmml_mode(quantize: str) -> str:
    """PMML models stay float (the document's float64 arithmetic and string inputs): ``auto``
    means none; int8 and dynamic are kept float by the backend (and say so); fp16 is refused."""
    if quantize == "fp16":
        raise ModelError("PMML models stay float64 as the document specifies; fp16 would change "
                         "its arithmetic. Leave `quantize=` at auto (or none).", field="quantize")
    return "none" if quantize == "auto" else quantize


def _opt_str(v: str | Path | None) -> str | None:
    return None if v is None else str(v)
