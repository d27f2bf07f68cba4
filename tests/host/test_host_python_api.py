"""docs/python-api.md runs exactly as written: every ```python block, in order, as one script.

The page assumes the digits example files in the working folder, a broker at $EDGEPACK_BROKER
and a device ``pi-kitchen`` (group ``kitchen``) running the agent. The test provides those with
real parts: a Mosquitto, the example model, and an ``edgepack-agent`` process that trusts the key
the page's first block generates.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "tests" / "agent"))

from agent_helpers import AgentProcess, agent_config  # noqa: E402
from brokers import start_mosquitto  # noqa: E402

from edgepack.host.fleet.provision import write_enrollment  # noqa: E402

pytestmark = pytest.mark.broker

DOC = ROOT / "docs" / "python-api.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_python_api_page_runs_as_written(tmp_path, monkeypatch, capsys):
    from digits import write_digits_example

    blocks = _blocks()
    assert len(blocks) >= 5 and "ep.build(" in blocks[0]
    write_digits_example(tmp_path, epochs=4)
    broker = start_mosquitto()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EDGEPACK_BROKER", broker.url)
    agent = None
    namespace: dict = {"__name__": "python_api_doc"}
    try:
        for i, block in enumerate(blocks):
            if agent is None and "ep.publish(" in block:
                # the device the page assumes, trusting the key the page generated
                cfg = agent_config(tmp_path / "pi-kitchen", broker.url, "default",
                                   device_id="pi-kitchen", pub=tmp_path / "keys" / "fleet.pub",
                                   target="rpi4", groups=["kitchen"])
                write_enrollment(cfg.parent / "data", "pi-kitchen", ["kitchen"],
                                 cfg.parent / "enrollment.json")  # what `agent init` does
                agent = AgentProcess(cfg, tmp_path / "agent.log").start()
            exec(compile(block, f"{DOC.name} block {i + 1}", "exec"), namespace)
    finally:
        if agent is not None:
            agent.stop()
        broker.stop()

    out = capsys.readouterr().out
    res = namespace["res"]
    assert res.path.exists() and res.path.name == "digits-1.0.0-rpi4.edgepack"
    assert "build refused:" in out and "`calibration=`" in out
    assert namespace["dep"].active is True
    assert namespace["figures"]["latency_ms"]["p95"] > 0
    assert namespace["dev"].bundle_name == "digits"
    assert namespace["status"].rollout.state == "aborted"
    assert (tmp_path / "keys" / "fleet.key").stat().st_mode & 0o077 == 0
