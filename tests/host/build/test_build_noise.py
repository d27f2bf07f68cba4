"""Quiet builds: what the libraries print goes into report.json, not the terminal.

Real ``edgepack build`` processes (the C++ logs need real file descriptors): an fp16 ONNX build
(onnxconverter-common's float16 ``UserWarning``s), an int8 ONNX build and a Keras model for a
microcontroller (LiteRT's C++ log lines) quiet, the fp16 one with ``--verbose`` too; plus the collector
itself on warnings, log records and a raw write to file descriptor 2.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).parents[3]
EDGEPACK = str(Path(sys.executable).parent / "edgepack")
sys.path.insert(0, str(ROOT / "tests" / "host" / "build" / "engine"))
sys.path.insert(0, str(ROOT / "examples"))

# Third-party lines the builds below are known to print when nothing holds them back.
NOISE = ("UserWarning", "float16.py", "XNNPACK", "fully_quantize", "WARNING:root",
         "oneDNN", "absl::InitializeLog")


@dataclass(frozen=True)
class Models:
    dir: Path
    onnx: Path
    keras: Path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    from build_models import digits_flat, make_mlp, train_mlp_weights
    from digits import digits_data, train_keras_cnn

    d = tmp_path_factory.mktemp("noise")
    x_tr, x_te, y_tr, y_te = digits_flat()
    make_mlp(d / "model.onnx", train_mlp_weights(x_tr, y_tr))
    np.savez(d / "calib.npz", x=x_tr[:200])
    np.savez(d / "eval.npz", x=x_te, labels=y_te)
    ix_tr, ix_te, iy_tr, iy_te = digits_data()
    train_keras_cnn(ix_tr, iy_tr, epochs=1, width=4).save(d / "model.keras")
    np.savez(d / "calib_img.npz", image=ix_tr[:32])
    return Models(d, d / "model.onnx", d / "model.keras")


def _build(models: Models, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["SOURCE_DATE_EPOCH"] = "1700000000"
    return subprocess.run([EDGEPACK, "build", *args], cwd=models.dir, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def _report(bundle: Path) -> dict:
    with zipfile.ZipFile(bundle) as zf:
        return json.loads(zf.read("report.json"))


def _noise_in(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if any(n in ln for n in NOISE)]


def test_fp16_build_keeps_float16_warnings_in_the_report(models: Models) -> None:
    run = _build(models, "model.onnx", "--target", "x86-64-vnni", "--quantize", "fp16",
                 "--no-variants", "--out", "quiet")

    assert run.returncode == 0, run.stderr
    assert _noise_in(run.stderr) == []
    assert "kept in the bundle's report.json (third_party_output)" in run.stderr
    third = _report(models.dir / "quiet" / "model-1.0.0-x86-64-vnni.edgepack")[
        "third_party_output"]
    assert third["shown_live"] is False
    src = third["sources"]["UserWarning from onnxconverter_common"]
    assert third["count"] >= src["count"] >= 1
    assert "will be truncated" in src["first"][0]


def test_python_build_is_quiet_too(models: Models) -> None:
    """``edgepack.host.build.build()`` from Python keeps library output in the report, as the
    CLI does; ``verbose=True`` lets it through."""
    code = ("import json, sys; from edgepack.host.build import build\n"
            "r = build('model.onnx', target='x86-64-vnni', quantize='fp16', variants=False, "
            "out=sys.argv[1], verbose=sys.argv[2] == 'loud')\n"
            "print(json.dumps(r.report.third_party_output))")
    runs = {how: subprocess.run([sys.executable, "-c", code, f"py-{how}", how],
                                cwd=models.dir, capture_output=True, text=True, timeout=300,
                                check=False) for how in ("quiet", "loud")}

    assert runs["quiet"].returncode == 0, runs["quiet"].stderr
    printed = runs["quiet"].stdout.splitlines()
    assert _noise_in(runs["quiet"].stderr + "\n".join(printed[:-1])) == []
    third = json.loads(runs["quiet"].stdout.splitlines()[-1])
    assert third["shown_live"] is False
    assert third["sources"]["UserWarning from onnxconverter_common"]["count"] >= 1
    assert runs["loud"].returncode == 0, runs["loud"].stderr
    assert any("truncated" in ln for ln in runs["loud"].stderr.splitlines())
    assert json.loads(runs["loud"].stdout.splitlines()[-1])["shown_live"] is True


def test_verbose_shows_library_output_as_it_comes(models: Models) -> None:
    run = _build(models, "model.onnx", "--target", "x86-64-vnni", "--quantize", "fp16",
                 "--no-variants", "--out", "loud", "--verbose", "--json")

    assert run.returncode == 0, run.stderr
    assert any("UserWarning" in ln and "truncated" in ln for ln in run.stderr.splitlines())
    report = json.loads(run.stdout)  # stdout stays pure JSON
    assert report["third_party_output"]["shown_live"] is True
    assert report["third_party_output"]["count"] >= 1


def test_int8_onnx_build_prints_only_its_own_output(models: Models) -> None:
    run = _build(models, "model.onnx", "--target", "rpi4", "--calibration", "calib.npz",
                 "--eval", "eval.npz", "--out", "int8")

    assert run.returncode == 0, run.stderr
    assert _noise_in(run.stderr) == []
    assert "warning: the bundle is unsigned" in run.stdout  # the build's own warnings stay
    report = _report(models.dir / "int8" / "model-1.0.0-rpi4.edgepack")
    assert report["third_party_output"]["shown_live"] is False


def test_keras_build_for_a_microcontroller_keeps_cpp_logs_in_the_report(models: Models) -> None:
    quiet = _build(models, "model.keras", "--target", "esp32-s3", "--calibration",
                   "calib_img.npz", "--out", "mcu")

    assert quiet.returncode == 0, quiet.stderr
    assert _noise_in(quiet.stderr) == []
    third = _report(models.dir / "mcu" / "model-1.0.0-esp32-s3.edgepack")["third_party_output"]
    lines = [ln for s in third["sources"].values() for ln in s["first"]]
    assert _noise_in("\n".join(lines)), third  # LiteRT's C++ lines, captured at fd level


def test_collector_counts_warnings_log_records_and_raw_fd_writes() -> None:
    from edgepack.host.build.noise import ThirdPartyOutput

    handlers = logging.getLogger().handlers[:]
    with ThirdPartyOutput(first_lines=2) as out:
        for i in range(3):
            warnings.warn_explicit(f"careful {i}", UserWarning, "/x/site-packages/lib/m.py", i)
        logging.getLogger().warning("Inference failed for node n1")
        os.write(2, b"2026-12-02 13:40:00.123456: I tensorflow/core/util/port.cc:153] oneDNN\n")
        mid = out.summary()  # the package stage asks before the build ends
        os.write(1, b"W0000 00:00:1733150000.1 1 file.cc:40] absl says\n"
                    b"To enable the following instructions: AVX2 FMA\n")  # its second line
    end = out.summary()

    assert mid["sources"]["UserWarning from lib"] == {
        "count": 3, "first": ["/x/site-packages/lib/m.py:0: UserWarning: careful 0",
                              "/x/site-packages/lib/m.py:1: UserWarning: careful 1"]}
    assert mid["sources"]["log root"]["first"] == ["WARNING:root:Inference failed for node n1"]
    assert mid["sources"]["tensorflow C++ log"]["count"] == 1
    assert end["sources"]["absl C++ log"]["count"] == 2
    assert "other output" not in end["sources"]
    assert end["count"] == 7
    assert logging.getLogger().handlers == handlers


def test_collector_shows_what_it_held_when_a_bug_ends_the_build(capfd) -> None:
    from edgepack.host.build.noise import ThirdPartyOutput

    with pytest.raises(ZeroDivisionError), ThirdPartyOutput():
        os.write(2, b"native line before the crash\n")
        _ = 1 / 0

    assert "native line before the crash" in capfd.readouterr().err
