"""Device profiles: ``targets/*.toml`` read into frozen dataclasses.

A profile is data, not code. Unknown keys are an error that names the file and the key, so a typo
in a profile never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from edgepack.agent.errors import ProfileError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "Hardware",
    "RuntimePrefs",
    "QuantScheme",
    "Quantization",
    "Budgets",
    "Transfer",
    "Profile",
    "list_targets",
    "load_profile",
    "load_profile_file",
]


@dataclass(frozen=True)
class Hardware:
    """What the board physically has."""

    arch: str  # aarch64, armv7l, x86_64, xtensa, armv8m, ...
    cpu: str
    cpu_family: str  # arm64 | arm32 | x86_64 | xtensa | cortex-m: decides whether the host can time it
    cores: int
    ram_mb: float
    storage_mb: float
    isa_features: tuple[str, ...] = ()
    accelerators: tuple[str, ...] = ()
    flash_mb: float = 0.0
    clock_mhz: int = 0


@dataclass(frozen=True)
class RuntimePrefs:
    """Formats and runtimes the device runs, in order of preference."""

    formats: tuple[str, ...]  # onnx | tflite | tflm
    runtimes: tuple[str, ...]  # onnxruntime | litert | tflm | edgetpu
    opset: int = 17
    threads: int = 0  # 0: as many as cores
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    delegates: tuple[str, ...] = ()
    integer_only: bool = False  # Edge TPU, microcontrollers: every op must be int8


@dataclass(frozen=True)
class QuantScheme:
    """One int8 scheme: onnxruntime's QuantFormat x activation/weight types x per-channel."""

    format: str = "QDQ"  # QDQ | QOperator
    activation_type: str = "uint8"  # uint8 | int8
    weight_type: str = "int8"  # uint8 | int8
    per_channel: bool = True
    reduce_range: bool = False

    @property
    def label(self) -> str:
        a = "U8" if self.activation_type == "uint8" else "S8"
        w = "U8" if self.weight_type == "uint8" else "S8"
        pc = "pc" if self.per_channel else "pt"
        rr = "-rr" if self.reduce_range else ""
        return f"{self.format}-{a}{w}-{pc}{rr}"


@dataclass(frozen=True)
class Quantization:
    """Optimization defaults for the target."""

    default: str = "int8"  # int8 | dynamic | fp16 | none
    scheme: QuantScheme = field(default_factory=QuantScheme)
    candidates: tuple[QuantScheme, ...] = ()
    calibration_method: str = "minmax"
    calibration_samples: int = 256
    max_drop_points: float = 1.0
    tflite_io: str = "float32"  # float32 | int8 | uint8: model I/O of full-int8 TFLite


@dataclass(frozen=True)
class Budgets:
    """What a bundle may cost on the device."""

    model_mb: float
    rss_mb: float
    p95_ms: float
    arena_kb: float = 0.0  # microcontrollers: tensor arena available


@dataclass(frozen=True)
class Transfer:
    """How bundles travel to this device."""

    chunk_kb: int = 256
    window: int = 8


@dataclass(frozen=True)
class Profile:
    """A device profile, as read from ``targets/<name>.toml``."""

    name: str
    description: str
    hardware: Hardware
    runtime: RuntimePrefs
    quantization: Quantization
    budgets: Budgets
    transfer: Transfer
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source", None)
        return d

    @property
    def host_can_time(self) -> bool:
        """True when latency measured on this host says something about the target's CPU."""
        import platform

        machine = platform.machine().lower()
        family = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}
        return family.get(machine) == self.hardware.cpu_family


_SECTIONS: dict[str, type] = {
    "hardware": Hardware,
    "runtime": RuntimePrefs,
    "quantization": Quantization,
    "budgets": Budgets,
    "transfer": Transfer,
}


def _hints(cls: type) -> dict[str, Any]:
    import typing

    return typing.get_type_hints(cls)


def _typed(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check a scalar or list value against a field's annotation."""
    def bad(expected: str) -> ProfileError:
        return ProfileError(f"{source}: '{key}' must be {expected}, got {value!r}", file=source,
                            key=key)

    if hint is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
    elif hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad("an integer")
    elif hint is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise bad("a number")
        value = float(value)
    elif hint is str:
        if not isinstance(value, str):
            raise bad("a string")
    elif getattr(hint, "__origin__", None) is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad("an array of strings")
        value = tuple(value)
    return value


def _build(cls: type, data: Any, where: str, source: str) -> Any:
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: [{where}] must be a table, got {type(data).__name__}",
                           file=source, key=where)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise ProfileError(
                f"{source}: unknown key '{where}.{key}' (known: {', '.join(sorted(fields))})",
                file=source, key=f"{where}.{key}")
        if cls is Quantization and key == "scheme":
            value = _build(QuantScheme, value, f"{where}.scheme", source)
        elif cls is Quantization and key == "candidates":
            if not isinstance(value, list):
                raise ProfileError(f"{source}: '{where}.candidates' must be an array of tables",
                                   file=source, key=f"{where}.candidates")
            value = tuple(_build(QuantScheme, v, f"{where}.candidates[{i}]", source)
                          for i, v in enumerate(value))
        else:
            value = _typed(value, _hints(cls)[key], f"{where}.{key}", source)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ProfileError(f"{source}: [{where}] is incomplete: {exc}", file=source,
                           key=where) from None


def _parse(data: dict[str, Any], source: str) -> Profile:
    known = {"name", "description", *_SECTIONS}
    for key in data:
        if key not in known:
            raise ProfileError(f"{source}: unknown key '{key}' (known: {', '.join(sorted(known))})",
                               file=source, key=key)
    for key in known:
        if key not in data:
            raise ProfileError(f"{source}: missing '{key}'", file=source, key=key)
    sections = {k: _build(cls, data[k], k, source) for k, cls in _SECTIONS.items()}
    profile = Profile(name=data["name"], description=data["description"], source=source, **sections)
    _check(profile, source)
    return profile


def _check(p: Profile, source: str) -> None:
    def bad(key: str, msg: str) -> ProfileError:
        return ProfileError(f"{source}: '{key}' {msg}", file=source, key=key)

    if p.quantization.default not in {"int8", "dynamic", "fp16", "none"}:
        raise bad("quantization.default", "must be one of int8, dynamic, fp16, none")
    schemes = [("quantization.scheme", p.quantization.scheme)] + [
        (f"quantization.candidates[{i}]", c) for i, c in enumerate(p.quantization.candidates)]
    for where, s in schemes:
        if s.format not in {"QDQ", "QOperator"}:
            raise bad(f"{where}.format", "must be QDQ or QOperator")
        for t in (s.activation_type, s.weight_type):
            if t not in {"int8", "uint8"}:
                raise bad(where, f"type '{t}' must be int8 or uint8")
    if p.quantization.tflite_io not in {"float32", "int8", "uint8"}:
        raise bad("quantization.tflite_io", "must be float32, int8 or uint8")
    if p.hardware.cpu_family not in {"arm64", "arm32", "x86_64", "xtensa", "cortex-m"}:
        raise bad("hardware.cpu_family", "must be arm64, arm32, x86_64, xtensa or cortex-m")
    if p.quantization.calibration_method not in {"minmax", "entropy", "percentile"}:
        raise bad("quantization.calibration_method", "must be minmax, entropy or percentile")
    for f in p.runtime.formats:
        if f not in {"onnx", "tflite", "tflm"}:
            raise bad("runtime.formats", f"has unknown format '{f}'")
    if not p.runtime.formats:
        raise bad("runtime.formats", "must name at least one format")


def _target_files() -> dict[str, Any]:
    root = resources.files("edgepack.targets")
    return {p.name[:-5]: p for p in root.iterdir() if p.name.endswith(".toml")}


def list_targets() -> list[str]:
    """Names of the profiles shipped in ``edgepack.targets``."""
    return sorted(_target_files())


def load_profile_file(path: str | Path) -> Profile:
    """Load a profile from any TOML file (a user's own target)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        why = "it does not exist" if isinstance(exc, FileNotFoundError) else exc.strerror
        raise ProfileError(f"cannot read profile file {path}: {why}", file=str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: not valid TOML: {exc}", file=str(path)) from None
    return _parse(data, str(path))


def load_profile(name: str) -> Profile:
    """Load a shipped profile by name, or a ``.toml`` file by path."""
    if name.endswith(".toml") or "/" in name:
        return load_profile_file(name)
    files = _target_files()
    if name not in files:
        raise ProfileError(
            f"unknown target '{name}'. Known targets: {', '.join(sorted(files))} "
            "(or pass a path to your own profile .toml)", target=name)
    res = files[name]
    try:
        data = tomllib.loads(res.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"targets/{name}.toml: not valid TOML: {exc}", target=name) from None
    profile = _parse(data, f"targets/{name}.toml")
    if profile.name != name:
        raise ProfileError(f"targets/{name}.toml: name '{profile.name}' differs from the file name",
                           file=f"targets/{name}.toml", key="name")
    return profile
