"""Fixtures for the reliability and security suite.

Reuses the agent suite's helpers (tests/agent/agent_helpers.py) and the host suite's shipped
Mosquitto + private PKI (tests/host/fleet/deploy/shipped_mosquitto.py, host_pki.py) instead of copies.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

_TESTS = Path(__file__).resolve().parents[1]
for _p in (_TESTS / "agent", _TESTS / "host" / "fleet" / "deploy", Path(__file__).parent):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from agent_helpers import Keys, build_bundle  # noqa: E402
from brokers import Mosquitto, start_mosquitto  # noqa: E402
from reliability_helpers import Scenario  # noqa: E402


@pytest.fixture(scope="session")
def rel_keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(tmp_path_factory.mktemp("rel-keys"))


class Bundles:
    """Tiny signed bundles, built once per session and variant."""

    def __init__(self, root: Path, keys: Keys) -> None:
        self.root, self.keys = root, keys
        self._cache: dict[tuple, Path] = {}

    def get(self, version: str = "1.0.0", *, signer: str | None = "fleet", hidden: int = 32,
            name: str = "tiny") -> Path:
        k = (version, signer, hidden, name)
        if k not in self._cache:
            private = {"fleet": self.keys.private, "other": self.keys.other_private,
                       None: None}[signer]
            self._cache[k] = build_bundle(
                self.root / f"{name}-{version}-{signer}-{hidden}.edgepack", name=name,
                version=version, key=private, hidden=hidden, seed=int(version.split(".")[0]))
        return self._cache[k]

    def medium(self, version: str = "1.0.0") -> Path:
        """About 1 MB of incompressible weights: ~64 chunks of 16 KiB."""
        return self.get(version, hidden=4000)


@pytest.fixture(scope="session")
def rel_bundles(tmp_path_factory: pytest.TempPathFactory, rel_keys: Keys) -> Bundles:
    return Bundles(tmp_path_factory.mktemp("rel-bundles"), rel_keys)


@pytest.fixture
def scenario() -> Iterator[callable]:
    """``scenario(name)`` -> a :class:`Scenario` whose runs end up in the results file."""
    made: dict[str, Scenario] = {}

    def get(name: str) -> Scenario:
        if name not in made:
            made[name] = Scenario(name)
        return made[name]

    yield get


@pytest.fixture
def own_mosquitto() -> Iterator[Mosquitto]:
    """A Mosquitto of this test alone (it gets killed): keeps retained messages and sessions
    across restarts, like a production broker."""
    store = Path(tempfile.mkdtemp(prefix="edgepack-rel-mosq-"))
    store.chmod(0o777)  # mosquitto started as root drops to its own user
    broker = start_mosquitto(extra_conf=f"persistence true\npersistence_location {store}/\n"
                             "autosave_interval 1\n")
    yield broker
    broker.stop()
    shutil.rmtree(store, ignore_errors=True)
