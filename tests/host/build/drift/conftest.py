"""Fixtures for the drift reference tests: the digits CNN and its reference profile."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[3] / "agent" / "drift"))

from drift_models import DigitsCnn, digits_cnn  # noqa: E402


@pytest.fixture(scope="session")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> DigitsCnn:
    """The digits CNN (real onnxruntime session) and the reference made from its own data."""
    return digits_cnn(tmp_path_factory.mktemp("drift-cnn"))
