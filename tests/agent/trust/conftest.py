"""Fixtures for the trust tests: a fleet's keys, a device's verifier, a settable clock."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from trust_helpers import DEVICE, FLEET, GROUP, Clock, Pki  # noqa: E402

from edgepack.agent.trust import ControlVerifier, TrustedRoot  # noqa: E402


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def pki(clock: Clock) -> Pki:
    return Pki(clock)


@pytest.fixture
def trust_dir(tmp_path: Path, pki: Pki) -> Path:
    TrustedRoot.install(tmp_path / "trust" / "root.json", pki.root())
    return tmp_path / "trust"


@pytest.fixture
def device(trust_dir: Path, clock: Clock) -> ControlVerifier:
    return ControlVerifier(trust_dir, device_id=DEVICE, fleet=FLEET, groups=[GROUP],
                           clock=clock)
