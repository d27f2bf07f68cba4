"""The agent's health gate accepts the TFLite bundles the host builds (int8/uint8 model I/O)."""

from __future__ import annotations

import pytest

from edgepack.agent.bundle import read_bundle
from edgepack.agent.errors import InstallError
from edgepack.agent.health import check_model, run_health_check


def _check(result, tmp_path):
    # In a child process, as the agent runs it: this test process holds TensorFlow, whose
    # memory would count against the bundle's RSS budget.
    slot = read_bundle(result.path).extract(tmp_path / "slot")
    return run_health_check(slot)


def test_uint8_io_bundle_passes_the_device_health_check(coral_build, tmp_path):
    report = _check(coral_build, tmp_path)
    assert read_bundle(coral_build.path).manifest["health"]["quantized_io"] is True
    assert report.passed, report.failures


def test_tflm_bundle_is_refused_by_the_python_agent_with_a_reason(esp32_build, tmp_path):
    # Microcontrollers run the C sources in the bundle, not the Python agent.
    slot = read_bundle(esp32_build.path).extract(tmp_path / "slot")
    with pytest.raises(InstallError, match="not supported by the Python agent"):
        check_model(slot)


def test_corrupted_golden_fails_the_device_health_check(coral_build, tmp_path):
    import numpy as np

    slot = read_bundle(coral_build.path).extract(tmp_path / "slot")
    with np.load(slot / "golden.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["output_0"] = (255 - arrays["output_0"].astype(np.int64)).astype(
        arrays["output_0"].dtype)  # every expected value far from what the model says
    np.savez(slot / "golden.npz", **arrays)
    report = run_health_check(slot)
    assert not report.passed
    assert any("cosine" in f for f in report.failures)
