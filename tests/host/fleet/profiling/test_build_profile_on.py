"""``edgepack build --profile-on``: the CLI packages every candidate, the device measures them,
and the shipped bundle is the one the device found fastest among those passing its gate."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from edgepack.agent.bundle import read_bundle
from edgepack.agent.signing import load_public_keys
from edgepack.host.cli import main


def test_build_profile_on_ships_what_the_device_chose(built, devices, keys,
                                                     tmp_path: Path) -> None:
    devices.start("pi-bench")
    out = tmp_path / "dist"
    r = CliRunner().invoke(main, [
        "build", str(built.model), "--target", "x86-64-vnni", "--calibration", str(built.calib),
        "--eval", str(built.eval), "--key", str(keys.key), "--out", str(out), "--name", "cnn",
        "--profile-on", "pi-bench", "--broker", devices.broker_url, "--fleet", devices.fleet,
        "--profile-runs", "30", "--profile-timeout", "180",
        "--profile-cache", str(tmp_path / "cache.json"), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    choice = report["device_profile"]
    labels = {c["label"] for c in choice["candidates"]}
    assert {"fp32", "fp16", "QDQ-U8S8-pc", "QOperator-U8S8-pc", "QDQ-U8S8-pt"} <= labels
    winner = next(c for c in choice["candidates"] if c["label"] == choice["winner"])
    passing = [c for c in choice["candidates"] if c["passed"]]
    assert winner["p95_ms"] == min(c["p95_ms"] for c in passing)

    bundle = read_bundle(out / "cnn-1.0.0-x86-64-vnni.edgepack")
    assert bundle.verify(load_public_keys([keys.pub]))
    entry = bundle.manifest["device_profile"]
    assert entry["candidate"] == choice["winner"]
    assert entry["devices"]["pi-bench"]["p95_ms"] == winner["p95_ms"]


def test_profile_on_without_broker_is_a_usage_error(built, keys, tmp_path: Path) -> None:
    r = CliRunner(env={"EDGEPACK_BROKER": None}).invoke(main, [
        "build", str(built.model), "--target", "x86-64-vnni", "--calibration", str(built.calib),
        "--key", str(keys.key), "--out", str(tmp_path / "dist"), "--profile-on", "pi-x"])
    assert r.exit_code == 1
    assert "--broker" in r.output
    assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").iterdir())


def test_profile_on_a_224x224x3_float_model(devices, keys, tmp_path: Path) -> None:
    """Eval samples of 602 KB each (over the 512 KB a job once carried inline) travel as a
    signed target through the chunked transfer; the device gates on its own outputs."""
    from profiling_models import convnet, write_data

    devices.start("pi-big")
    model = tmp_path / "big.onnx"
    model.write_bytes(convnet(channels=4, hw=224, layers=1))
    _, evalp = write_data(model.read_bytes(), tmp_path / "data", n_calib=1, n_eval=8, hw=224)
    out = tmp_path / "dist"
    r = CliRunner().invoke(main, [
        "build", str(model), "--target", "x86-64-vnni", "--quantize", "none",
        "--eval", str(evalp), "--key", str(keys.key), "--out", str(out), "--name", "big",
        "--profile-on", "pi-big", "--broker", devices.broker_url, "--fleet", devices.fleet,
        "--profile-runs", "5", "--profile-timeout", "180",
        "--profile-cache", str(tmp_path / "cache.json"), "--json"])
    assert r.exit_code == 0, r.output
    choice = json.loads(r.output)["device_profile"]
    fp32 = next(c for c in choice["candidates"] if c["label"] == "fp32")
    assert fp32["passed"], fp32
    assert fp32["devices"]["pi-big"]["eval_samples"] >= 2, fp32
    assert read_bundle(out / "big-1.0.0-x86-64-vnni.edgepack").manifest["device_profile"]


def test_profile_on_chooses_between_tflite_candidates(devices, keys, tmp_path: Path) -> None:
    """`--format tflite` with `--profile-on`: fp32, fp16, dynamic-range and int8 TFLite bundles
    are measured in LiteRT on the device, gated on the outputs it computed, and the fastest
    passing one ships; a microcontroller target is refused up front with the reason."""
    import sys

    import numpy as np

    sys.path.insert(0, str(Path(__file__).parents[4] / "examples"))
    from digits import digits_data, train_keras_cnn

    devices.start("pi-lite")
    x_tr, x_te, y_tr, y_te = digits_data()
    train_keras_cnn(x_tr, y_tr, epochs=2, width=8).save(tmp_path / "cnn.keras")
    np.savez(tmp_path / "calib.npz", image=x_tr[:64])
    np.savez(tmp_path / "eval.npz", image=x_te[:64], labels=y_te[:64])
    out = tmp_path / "dist"
    common = ["--calibration", str(tmp_path / "calib.npz"), "--eval", str(tmp_path / "eval.npz"),
              "--key", str(keys.key), "--name", "lite", "--profile-on", "pi-lite",
              "--broker", devices.broker_url, "--fleet", devices.fleet, "--profile-runs", "10",
              "--profile-timeout", "180", "--profile-cache", str(tmp_path / "cache.json")]
    r = CliRunner().invoke(main, ["build", str(tmp_path / "cnn.keras"), "--target",
                                  "x86-64-vnni", "--format", "tflite", "--out", str(out),
                                  *common, "--json"])
    assert r.exit_code == 0, r.output + devices.logs()
    choice = json.loads(r.output)["device_profile"]
    by_label = {c["label"]: c for c in choice["candidates"]}
    assert set(by_label) == {"fp32", "fp16", "dynamic", "int8"}
    assert all(c["devices"]["pi-lite"]["runtime"] == "litert" for c in by_label.values())
    passing = [c for c in by_label.values() if c["passed"]]
    assert by_label["fp32"]["passed"] and choice["winner"] in {c["label"] for c in passing}
    winner = by_label[choice["winner"]]
    assert winner["p95_ms"] == min(c["p95_ms"] for c in passing)
    bundle = read_bundle(out / "lite-1.0.0-x86-64-vnni.edgepack")
    assert bundle.manifest["model"]["format"] == "tflite"
    assert bundle.manifest["device_profile"]["candidate"] == choice["winner"]

    r = CliRunner().invoke(main, ["build", str(tmp_path / "cnn.keras"), "--target", "esp32-s3",
                                  "--out", str(tmp_path / "refused"), *common])
    assert r.exit_code != 0 and "Traceback" not in r.output, r.output
    assert "microcontroller bundles run as C sources" in r.output
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").iterdir())
