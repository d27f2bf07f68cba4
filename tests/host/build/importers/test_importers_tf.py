"""Keras (.keras, .h5), SavedModel and TFLite inputs, and their broken variants."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from importer_models import Digits, TfModels, run_onnx

from edgepack.agent.errors import ModelError
from edgepack.host.build.importers import Imported, import_model


@pytest.fixture(scope="session")
def imported_tf(tf_models: TfModels, tmp_path_factory: pytest.TempPathFactory
                ) -> dict[str, Imported]:
    """Each TensorFlow format imported once (each takes a tf2onnx run)."""
    return {kind: import_model(path, workdir=tmp_path_factory.mktemp(f"work-{kind}"))
            for kind, path in [("keras", tf_models.keras), ("h5", tf_models.h5),
                               ("saved_model", tf_models.saved_model)]}


@pytest.mark.parametrize("fmt", ["keras", "h5"])
def test_keras_file_becomes_onnx_and_saved_model(fmt: str, imported_tf: dict[str, Imported],
                                                 tf_models: TfModels, digits: Digits) -> None:
    imp = imported_tf[fmt]

    assert imp.kind == "keras"
    assert imp.source == getattr(tf_models, fmt)
    assert imp.tflite_bytes is None and not imp.float_only
    assert (imp.saved_model_dir / "saved_model.pb").is_file()
    assert onnx.load(str(imp.onnx_path)).opset_import[0].version == 17
    x = digits.x_test[:64]
    (got,) = run_onnx(imp.onnx_path, x).values()
    np.testing.assert_allclose(got, np.asarray(tf_models.model(x, training=False)), atol=1e-4)
    assert any("SavedModel → tf2onnx opset 17" in n for n in imp.notes)
    assert any(n.startswith("checked: ONNX matches the Keras model") for n in imp.notes)


def test_h5_is_flagged_as_legacy(imported_tf: dict[str, Imported]) -> None:
    assert any("legacy HDF5" in n for n in imported_tf["h5"].notes)
    assert not any("legacy" in n for n in imported_tf["keras"].notes)


def test_saved_model_directory(imported_tf: dict[str, Imported], tf_models: TfModels,
                               digits: Digits) -> None:
    imp = imported_tf["saved_model"]

    assert imp.kind == "saved_model"
    assert imp.saved_model_dir == tf_models.saved_model
    x = digits.x_test[:64]
    (got,) = run_onnx(imp.onnx_path, x).values()
    np.testing.assert_allclose(got, np.asarray(tf_models.model(x, training=False)), atol=1e-4)


def test_tflite_is_packaged_as_is(tf_models: TfModels, tmp_path: Path) -> None:
    imp = import_model(tf_models.tflite, workdir=tmp_path)

    assert imp.kind == "tflite"
    assert imp.tflite_bytes == tf_models.tflite.read_bytes()
    assert imp.onnx_path is None and imp.saved_model_dir is None and not imp.float_only
    assert any("packaged as is" in n for n in imp.notes)
    assert any("loads in LiteRT" in n for n in imp.notes)


def test_opset_is_passed_to_tf2onnx(tf_models: TfModels, tmp_path: Path) -> None:
    imp = import_model(tf_models.saved_model, workdir=tmp_path, opset=15)

    assert onnx.load(str(imp.onnx_path)).opset_import[0].version == 15


# --- broken inputs ---------------------------------------------------------------------------

def _random_bytes(path: Path, n: int = 4096) -> Path:
    path.write_bytes(np.random.default_rng(1).bytes(n))
    return path


def test_random_bytes_keras_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"not a Keras 3 archive \(.keras files are zip"):
        import_model(_random_bytes(tmp_path / "m.keras"), workdir=tmp_path / "w")


def test_zip_that_is_not_a_keras_model(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "m.keras", "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(ModelError, match="without config.json: not a Keras model"):
        import_model(tmp_path / "m.keras", workdir=tmp_path / "w")


def test_truncated_keras_archive(tf_models: TfModels, tmp_path: Path) -> None:
    data = tf_models.keras.read_bytes()
    (tmp_path / "m.keras").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="not a Keras 3 archive"):
        import_model(tmp_path / "m.keras", workdir=tmp_path / "w")


def test_random_bytes_h5_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not an HDF5 file, so not a legacy Keras .h5 model"):
        import_model(_random_bytes(tmp_path / "m.h5"), workdir=tmp_path / "w")


def test_hdf5_file_without_a_model(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "weights.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(ModelError, match=r"Keras \S+ cannot load weights.h5"):
        import_model(tmp_path / "weights.h5", workdir=tmp_path / "w")


def test_random_bytes_tflite_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not a TFLite model .no 'TFL3' flatbuffer identifier"):
        import_model(_random_bytes(tmp_path / "m.tflite"), workdir=tmp_path / "w")


def test_tflite_header_with_garbage_body(tf_models: TfModels, tmp_path: Path) -> None:
    data = tf_models.tflite.read_bytes()
    (tmp_path / "m.tflite").write_bytes(data[:8] + np.random.default_rng(2).bytes(len(data)))
    with pytest.raises(ModelError, match="has a TFLite header but does not load in LiteRT"):
        import_model(tmp_path / "m.tflite", workdir=tmp_path / "w")


def test_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"not a TensorFlow SavedModel \(no saved_model.pb"):
        import_model(tmp_path / "empty", workdir=tmp_path / "w")


def test_corrupt_saved_model(tmp_path: Path) -> None:
    sm = tmp_path / "sm"
    sm.mkdir()
    _random_bytes(sm / "saved_model.pb")
    with pytest.raises(ModelError, match="tf2onnx could not convert SavedModel") as err:
        import_model(sm, workdir=tmp_path / "w")
    assert "full log:" in str(err.value)
    assert (tmp_path / "w" / "tf2onnx.log").is_file()
