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
    assert {"fp32", "fp16", "QDQ-U8S8-pc", "QDQ-S8S8-pc"} <= labels
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
