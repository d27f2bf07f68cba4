"""Models found in the wild build with the engine: intake folds and upgrades them in pre-flight."""

from __future__ import annotations

import numpy as np
import pytest

from edgepack.agent.bundle import read_bundle


@pytest.mark.parametrize("name", ["old_opset7", "old_opset9", "old_opset11"])
def test_old_opset_graphs_build_with_calibration(onnx_corpus, tmp_path, name):
    import edgepack.host as ep

    art = onnx_corpus[name]
    (inp, x), = art.inputs.items()
    calib = np.repeat(x, 16, axis=0) * np.random.default_rng(0).uniform(
        0.5, 1.5, (16 * len(x),) + x.shape[1:]).astype(x.dtype)
    np.savez(tmp_path / "calib.npz", **{inp: calib})
    res = ep.build(str(art.path), target="x86-64-vnni", calibration=str(tmp_path / "calib.npz"),
                   out=str(tmp_path / "dist"), variants=False)

    steps = res.report.model["preflight"]
    assert res.report.model["source_opset"] == int(name.removeprefix("old_opset"))
    assert any("opset" in s for s in steps), steps
    if name != "old_opset11":  # 7 and 9 compute their weights with constant subgraphs
        assert any("fold" in s for s in steps), steps
    assert res.manifest["optimization"]["mode"] == "int8"
    assert read_bundle(res.path).manifest["model"]["format"] == "onnx"


def test_model_zoo_squeezenet_at_opset_9_builds(light, tmp_path):
    import edgepack.host as ep

    art = light["squeezenet"]
    res = ep.build(str(art.path), target="x86-64-vnni", quantize="fp16",
                   out=str(tmp_path / "dist"))

    m = res.manifest
    assert m["optimization"]["mode"] == "fp16"
    assert res.path.exists() and read_bundle(res.path).manifest["name"] == m["name"]
