"""Fixtures for the agent tests: keys, tiny bundles built on demand, extra brokers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from agent_helpers import TARGET, AmqttBroker, Keys, build_bundle  # noqa: E402


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    """The fleet key pair devices trust, and another one they do not."""
    return Keys(tmp_path_factory.mktemp("keys"))


class Bundles:
    """Build test bundles lazily, once per session and variant."""

    def __init__(self, root: Path, keys: Keys) -> None:
        self.root = root
        self.keys = keys
        self._cache: dict[tuple, Path] = {}

    def get(self, version: str = "1.0.0", *, name: str = "tiny", target: str = TARGET,
            signer: str | None = "fleet", broken: bool = False, large: bool = False,
            budgets: dict | None = None, seed: int | None = None) -> Path:
        key = (version, name, target, signer, broken, large, repr(budgets), seed)
        if key not in self._cache:
            private = {"fleet": self.keys.private, "other": self.keys.other_private,
                       None: None}[signer]
            label = f"{name}-{version}-{target}-{signer}-{int(broken)}-{int(large)}-{len(self._cache)}"
            self._cache[key] = build_bundle(
                self.root / f"{label}.edgepack", name=name, version=version, target=target,
                key=private, broken=broken, budgets=budgets,
                # ~20 MB of float32 weights that do not compress: a realistic transfer
                hidden=78_000 if large else 32,
                seed=seed if seed is not None else int(version.split(".")[0]))
        return self._cache[key]


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Bundles:
    return Bundles(tmp_path_factory.mktemp("bundles"), keys)


@pytest.fixture(scope="module")
def amqtt_broker() -> AmqttBroker:
    broker = AmqttBroker().start()
    yield broker
    broker.stop()
