"""Fixtures for the profiling tests: keys, candidate bundles built by ``edgepack build`` for
x86-64-vnni (one per quantization scheme, plus a fast but wrong one), and local agents standing
in for devices (real processes, real Mosquitto)."""

from __future__ import annotations

import re
import sys
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[2] / "agent"))

from agent_helpers import AgentProcess, Watcher, agent_config  # noqa: E402
from profiling_models import convnet, tiny_convnet, write_data  # noqa: E402

TARGET = "x86-64-vnni"


@dataclass(frozen=True)
class Keys:
    key: Path
    pub: Path
    other_key: Path


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    from edgepack.host.keys import generate_keys

    root = tmp_path_factory.mktemp("keys")
    key, pub, _ = generate_keys(root, "fleet")
    other, _, _ = generate_keys(root, "other")
    return Keys(key, pub, other)


def scheme_profile(out: Path, *, fmt: str = "QDQ", activation: str = "uint8",
                   weight: str = "int8", per_channel: bool = True) -> Path:
    """The shipped x86-64-vnni profile with another default int8 scheme: ``build()`` with
    ``variants=False`` then builds exactly that candidate."""
    text = (resources.files("edgepack.targets") / f"{TARGET}.toml").read_text()
    block = (f'[quantization.scheme]\nformat = "{fmt}"\nactivation_type = "{activation}"\n'
             f'weight_type = "{weight}"\nper_channel = {str(per_channel).lower()}\n\n')
    text, n = re.subn(r"\[quantization\.scheme\]\n(?:[a-z_]+ = .*\n)+\n", block, text)
    assert n == 1, "the x86-64-vnni profile no longer has a [quantization.scheme] block"
    out.write_text(text)
    return out


@dataclass(frozen=True)
class Built:
    """Candidate bundles and what the pipeline holds when it calls choose_on_devices."""

    model: Path
    calib: Path
    eval: Path
    bundles: dict[str, Path]  # label → bundle
    prepared: object  # PreparedModel of the fp32 model
    evalset: object
    reference: object  # fp32 Outputs on evalset


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Built:
    """fp32, QDQ U8S8, QDQ S8S8 (each built by build() with variants off) and a ``broken``
    candidate: a much smaller net with the same inputs and outputs, fast and wrong."""
    from edgepack.host.build import build
    from edgepack.host.build.convert_onnx import prepare_onnx
    from edgepack.host.build.data import load_dataset
    from edgepack.host.build.validate import Session, run_outputs

    root = tmp_path_factory.mktemp("candidates")
    model = root / "cnn.onnx"
    model.write_bytes(convnet())
    broken = root / "broken" / "cnn.onnx"
    broken.parent.mkdir()
    broken.write_bytes(tiny_convnet())
    calib, evalp = write_data(model.read_bytes(), root / "data")
    common = dict(target=TARGET, eval=str(evalp), name="cnn", key=str(keys.key),
                  variants=False)
    plans = {
        "fp32": dict(model=str(model), quantize="none", out=str(root / "fp32"), **common),
        "QDQ-U8S8-pc": dict(
            model=str(model), quantize="int8", calibration=str(calib), out=str(root / "u8"),
            **{**common, "target": str(scheme_profile(root / "u8s8.toml"))}),
        "QDQ-S8S8-pc": dict(
            model=str(model), quantize="int8", calibration=str(calib), out=str(root / "s8"),
            **{**common, "target": str(scheme_profile(root / "s8s8.toml", activation="int8"))}),
        "broken": dict(model=str(broken), quantize="none", out=str(root / "broken-out"),
                       **common),
    }
    bundles = {label: build(**cfg).path for label, cfg in plans.items()}
    prepared = prepare_onnx(model, opset=17, batch=1, target=TARGET)
    evalset = load_dataset(evalp, prepared.inputs, what="eval")
    reference = run_outputs(Session(prepared.model_bytes, 1), evalset, 1)
    return Built(model, calib, evalp, bundles, prepared, evalset, reference)


class Devices:
    """Start local agents (one process each) in a fleet; stop them all at teardown."""

    def __init__(self, root: Path, broker_url: str, fleet: str, keys: Keys) -> None:
        self.root = root
        self.broker_url = broker_url
        self.fleet = fleet
        self.keys = keys
        self.procs: dict[str, AgentProcess] = {}

    def start(self, device_id: str, *, board: str = "x86-gateway", **overrides: object
              ) -> AgentProcess:
        cfg = agent_config(self.root / device_id, self.broker_url, self.fleet,
                           device_id=device_id, pub=self.keys.pub, board=board, target=TARGET,
                           **overrides)
        with Watcher(self.broker_url, self.fleet, device_id) as w:
            proc = AgentProcess(cfg).start()
            self.procs[device_id] = proc
            w.wait_state(lambda s: s.get("online") is True, timeout=30)
        time.sleep(0.3)  # the job subscription follows the birth message on the same link
        return proc

    def stop(self) -> None:
        for p in self.procs.values():
            p.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {d}\n{p.log_text()[-4000:]}" for d, p in self.procs.items())


@pytest.fixture
def devices(tmp_path: Path, mosquitto: object, fleet: str, keys: Keys) -> Devices:
    d = Devices(tmp_path / "devices", mosquitto.url, fleet, keys)  # type: ignore[attr-defined]
    yield d
    d.stop()


@pytest.fixture
def cache_path(tmp_path: Path) -> Path:
    return tmp_path / f"profiles-{uuid.uuid4().hex[:6]}.json"
