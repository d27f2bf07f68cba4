"""Session fixtures: the "found in the wild" corpus, built once into a tmp dir (see
``wild_models``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import wild_models as wild  # noqa: E402


@pytest.fixture(scope="session")
def wild_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("wild")


@pytest.fixture(scope="session")
def onnx_corpus(wild_dir: Path) -> dict[str, wild.Artifact]:
    """The small hand-written ONNX graphs, by name."""
    made = [wild.make_old_opset(wild_dir, 7), wild.make_old_opset(wild_dir, 9),
            wild.make_old_opset(wild_dir, 11), wild.make_external_data(wild_dir),
            wild.make_fp16(wild_dir), wild.make_com_microsoft(wild_dir),
            wild.make_sklearn(wild_dir)]
    return {a.name: a for a in made}


@pytest.fixture(scope="module")
def light() -> dict[str, wild.Artifact]:
    return {a.name: a for a in wild.light_graphs()}


@pytest.fixture(scope="session")
def tflite_corpus(wild_dir: Path) -> dict[str, wild.Artifact]:
    """The tiny CNN as float, int8, 16x8, uint8-I/O and dynamic-range TFLite, plus the int8 one
    LiteRT refuses."""
    made = [wild.make_tflite(wild_dir, kind) for kind in wild.TFLITE_KINDS]
    made += [wild.make_litert_refused(wild_dir), wild.make_uint8(wild_dir)]
    return {a.name: a for a in made}


@pytest.fixture(scope="session")
def encoders(wild_dir: Path) -> dict[str, tuple[wild.Artifact, Path]]:
    """The Keras encoders (GELU exact and tanh) and their tf2onnx conversions (opset 17)."""
    out = {}
    for gelu in ("exact", "tanh"):
        art = wild.make_keras_encoder(wild_dir, gelu)
        onnx_path = wild.keras_to_onnx(wild_dir / f"{art.name}_sm", wild_dir / f"{art.name}.onnx")
        out[gelu] = (art, onnx_path)
    return out
