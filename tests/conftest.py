"""Shared fixtures: a real Mosquitto per session, unique topics (fleets) per test."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from brokers import Mosquitto, start_mosquitto  # noqa: E402


@pytest.fixture(scope="session")
def mosquitto() -> Mosquitto:
    """One real Mosquitto broker on a free loopback port for the whole session."""
    broker = start_mosquitto()
    yield broker
    broker.stop()


@pytest.fixture
def fleet() -> str:
    """A fleet name no other test uses, so retained messages never leak between tests."""
    return f"t{uuid.uuid4().hex[:12]}"
