"""The shipped device profiles load, say true things about their hardware, and reject typos."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from edgepack.agent.errors import ProfileError
from edgepack.agent.profiles import (
    Profile,
    QuantScheme,
    list_targets,
    load_profile,
    load_profile_file,
)

REQUIRED = {
    "rpi4",
    "rpi5",
    "rpi-zero-2w",
    "jetson-orin-nano",
    "android-arm64",
    "coral-edgetpu",
    "esp32-s3",
    "x86-64-avx2",
    "x86-64-vnni",
}
MCU_TARGETS = ("esp32-s3", "cortex-m7", "cortex-m4")
TARGETS = list_targets()

MINIMAL = """\
name = "mine"
description = "a user's own board"

[hardware]
arch = "aarch64"
cpu = "Cortex-A55"
cpu_family = "arm64"
cores = 4
ram_mb = 2048
storage_mb = 16384

[runtime]
formats = ["onnx"]
runtimes = ["onnxruntime"]

[quantization]
default = "int8"

[budgets]
model_mb = 100
rss_mb = 512
p95_ms = 3

[transfer]
chunk_kb = 128
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mine.toml"
    path.write_text(text, encoding="utf-8")
    return path


# --- every shipped target -------------------------------------------------------------------


def test_required_targets_are_shipped() -> None:
    missing = REQUIRED - set(TARGETS)
    assert not missing, f"targets not shipped: {sorted(missing)}"
    assert any(t.startswith("cortex-m") for t in TARGETS)


@pytest.mark.parametrize("name", TARGETS)
def test_shipped_target_loads_and_is_sane(name: str) -> None:
    p = load_profile(name)
    assert isinstance(p, Profile)
    assert p.name == name
    assert p.source == f"targets/{name}.toml"
    assert p.description
    hw = p.hardware
    assert hw.cores >= 1 and hw.ram_mb > 0 and hw.storage_mb > 0 and hw.clock_mhz > 0
    assert hw.cpu_family in {"arm64", "arm32", "x86_64", "xtensa", "cortex-m"}
    assert p.runtime.formats and p.runtime.runtimes
    assert p.runtime.opset >= 13
    assert 0 <= p.runtime.threads <= hw.cores
    q = p.quantization
    assert q.tflite_io in {"float32", "int8", "uint8"}
    assert q.calibration_samples > 0 and q.max_drop_points > 0
    b = p.budgets
    assert 0 < b.rss_mb <= hw.ram_mb
    assert 0 < b.model_mb <= max(hw.storage_mb, hw.flash_mb)
    assert b.p95_ms > 0
    assert 0 < p.transfer.chunk_kb <= 256 and p.transfer.window >= 1
    # Lists in TOML come back as tuples, so the whole profile is hashable and immutable.
    assert isinstance(hw.isa_features, tuple)
    assert isinstance(q.candidates, tuple)
    hash(p)


@pytest.mark.parametrize("name", TARGETS)
def test_default_scheme_is_a_candidate(name: str) -> None:
    q = load_profile(name).quantization
    if q.candidates:
        assert q.scheme in q.candidates
        assert len(set(q.candidates)) == len(q.candidates)


@pytest.mark.parametrize("name", TARGETS)
def test_integer_only_targets_are_int8_end_to_end(name: str) -> None:
    p = load_profile(name)
    if not p.runtime.integer_only:
        return
    assert p.quantization.default == "int8"
    assert p.quantization.tflite_io in {"int8", "uint8"}
    assert "onnx" not in p.runtime.formats


# --- real hardware facts ----------------------------------------------------------------------


def test_dotprod_only_from_armv82() -> None:
    assert "dotprod" in load_profile("rpi5").hardware.isa_features
    assert "dotprod" not in load_profile("rpi4").hardware.isa_features
    assert "dotprod" not in load_profile("rpi-zero-2w").hardware.isa_features


def test_x86_vnni_split() -> None:
    vnni = load_profile("x86-64-vnni")
    avx2 = load_profile("x86-64-avx2")
    assert "avx512_vnni" in vnni.hardware.isa_features
    assert "avx2" in avx2.hardware.isa_features
    assert not any("vnni" in f for f in avx2.hardware.isa_features)
    assert vnni.quantization.scheme == QuantScheme("QDQ", "uint8", "int8", per_channel=True)
    # Without VNNI, U8S8 saturates in vpmaddubsw unless weights are 7-bit.
    assert avx2.quantization.scheme.reduce_range
    assert avx2.quantization.scheme.label == "QDQ-U8S8-pc-rr"
    assert any(c.weight_type == "uint8" for c in avx2.quantization.candidates)


def test_hardware_facts() -> None:
    assert load_profile("rpi-zero-2w").hardware.ram_mb == 512
    jetson = load_profile("jetson-orin-nano")
    assert jetson.hardware.cores == 6
    assert jetson.quantization.default == "fp16"
    assert jetson.runtime.providers[0] == "TensorrtExecutionProvider"
    assert jetson.runtime.providers[-1] == "CPUExecutionProvider"
    esp = load_profile("esp32-s3")
    assert (esp.hardware.cores, esp.hardware.clock_mhz) == (2, 240)


def test_integer_only_targets() -> None:
    coral = load_profile("coral-edgetpu")
    assert coral.runtime.integer_only
    assert coral.runtime.delegates == ("edgetpu",)
    assert coral.quantization.tflite_io == "uint8"
    for name in (*MCU_TARGETS, "coral-edgetpu"):
        p = load_profile(name)
        assert p.runtime.integer_only, name
        assert p.quantization.default == "int8", name


@pytest.mark.parametrize("name", [t for t in MCU_TARGETS if t in TARGETS])
def test_microcontrollers(name: str) -> None:
    p = load_profile(name)
    assert p.runtime.formats == ("tflm",)
    assert p.quantization.tflite_io == "int8"
    assert p.hardware.flash_mb > 0
    assert 0 < p.budgets.model_mb <= p.hardware.flash_mb
    assert 0 < p.budgets.arena_kb <= p.hardware.ram_mb * 1024
    assert p.transfer.chunk_kb <= 16


# --- errors ------------------------------------------------------------------------------------


def test_minimal_user_profile_loads(tmp_path: Path) -> None:
    p = load_profile_file(_write(tmp_path, MINIMAL))
    assert p.name == "mine"
    assert p.budgets.p95_ms == 3
    assert p.quantization.scheme == QuantScheme()  # defaults fill in what is left out
    # A path goes through load_profile too.
    assert load_profile(str(tmp_path / "mine.toml")) == p


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL.replace("p95_ms = 3", "p95_msec = 3"))
    with pytest.raises(ProfileError) as err:
        load_profile_file(path)
    message = str(err.value)
    assert str(path) in message
    assert "budgets.p95_msec" in message
    assert err.value.context["key"] == "budgets.p95_msec"
    assert err.value.context["file"] == str(path)


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ('name = "mine"', 'name = "mine"\nnmae = "x"', "nmae"),
        ("cores = 4", "cores = 4\ncore_count = 4", "hardware.core_count"),
        ('default = "int8"', 'default = "int8"\n[quantization.scheme]\nperchannel = true',
         "quantization.scheme.perchannel"),
        ('default = "int8"', 'default = "int8"\n[[quantization.candidates]]\nformat = "QDQ"\n'
         'weights = "int8"', "quantization.candidates[0].weights"),
    ],
)
def test_unknown_keys_anywhere(tmp_path: Path, old: str, new: str, key: str) -> None:
    assert old in MINIMAL
    with pytest.raises(ProfileError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_profile_file(_write(tmp_path, MINIMAL.replace(old, new, 1)))


def test_missing_section_and_bad_values(tmp_path: Path) -> None:
    no_budgets = MINIMAL.split("[budgets]")[0] + "[transfer]\nchunk_kb = 128\n"
    with pytest.raises(ProfileError, match="missing 'budgets'"):
        load_profile_file(_write(tmp_path, no_budgets))
    with pytest.raises(ProfileError, match="incomplete"):
        load_profile_file(_write(tmp_path, MINIMAL.replace("rss_mb = 512\n", "")))
    with pytest.raises(ProfileError, match="quantization.default"):
        load_profile_file(_write(tmp_path, MINIMAL.replace('"int8"', '"int4"', 1)))
    with pytest.raises(ProfileError, match="runtime.formats"):
        load_profile_file(_write(tmp_path, MINIMAL.replace('["onnx"]', '["pt"]')))
    with pytest.raises(ProfileError, match="not valid TOML"):
        load_profile_file(_write(tmp_path, MINIMAL + "[budgets\n"))
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile_file(tmp_path / "absent.toml")


def test_unknown_target_lists_known_targets() -> None:
    with pytest.raises(ProfileError) as err:
        load_profile("rpi-6")
    message = str(err.value)
    assert "unknown target 'rpi-6'" in message
    for name in ("rpi4", "rpi5", "esp32-s3", "x86-64-vnni"):
        assert name in message
    assert err.value.context["target"] == "rpi-6"


def test_profiles_are_frozen() -> None:
    p = load_profile("rpi4")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.name = "rpi5"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.budgets.p95_ms = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.quantization.scheme.per_channel = False  # type: ignore[misc]


def test_to_dict_round_trips_without_source() -> None:
    d = load_profile("coral-edgetpu").to_dict()
    assert "source" not in d
    assert d["runtime"]["integer_only"] is True
    assert d["quantization"]["scheme"]["activation_type"] == "int8"
