"""Fixtures for the host tests: tiny valid bundles, a signing key, an embedded broker."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))


def _tiny_onnx() -> bytes:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input_0", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("output_0", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["input_0"], ["output_0"])], "tiny",
                              [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="edgepack-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.fixture(scope="session")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(fleet.key, fleet.pub)`` for the whole session."""
    from edgepack.host.keys import generate_keys

    priv, pub, _ = generate_keys(tmp_path_factory.mktemp("keys"), "fleet")
    return priv, pub


@pytest.fixture(scope="session")
def make_bundle(tmp_path_factory: pytest.TempPathFactory,
                signing_key: tuple[Path, Path]) -> Callable[..., Path]:
    """``make_bundle(name=, version=, target=)`` -> path of a signed, valid v1 bundle."""
    from edgepack.host.build.package import npz_bytes, write_bundle
    from edgepack.host.keys import load_private_key, sign_bytes

    out = tmp_path_factory.mktemp("bundles")
    model = _tiny_onnx()
    key = load_private_key(signing_key[0])

    def make(name: str = "tiny", version: str = "1.0.0", target: str = "rpi4") -> Path:
        x = np.linspace(-1, 1, 4, dtype=np.float32).reshape(1, 4)
        golden = npz_bytes({"input_0": x, "output_0": np.maximum(x, 0)})
        manifest = {
            "name": name, "version": version, "created": "2025-01-01T00:00:00Z",
            "target": target,
            "model": {"file": "model.onnx", "format": "onnx",
                      "inputs": [{"name": "input_0", "dtype": "float32", "shape": [1, 4]}],
                      "outputs": [{"name": "output_0", "dtype": "float32", "shape": [1, 4]}]},
            "runtime": {"name": "onnxruntime", "min_version": "1.17", "threads": 1},
            "health": {"golden": "golden.npz", "atol": 1e-5, "rtol": 1e-4},
            "budgets": {"p95_latency_ms": 50.0, "peak_rss_mb": 256.0},
        }
        report = json.dumps({"name": name, "version": version}).encode()
        return write_bundle(out / f"{name}-{version}-{target}.edgepack", manifest, model,
                            {"golden.npz": golden, "report.json": report},
                            sign=lambda data: sign_bytes(data, key))

    return make


@pytest.fixture(scope="session")
def embedded_broker():
    """The embedded amqtt broker on a free port for the session."""
    from edgepack.host.fleet.broker import EmbeddedBroker

    with EmbeddedBroker(port=0) as b:
        yield b


@pytest.fixture(params=["mosquitto", "embedded"])
def any_broker(request: pytest.FixtureRequest) -> str:
    """URL of a real Mosquitto, then of the embedded broker."""
    return request.getfixturevalue(request.param if request.param == "mosquitto"
                                   else "embedded_broker").url
