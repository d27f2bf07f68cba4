"""bench/agent.py's memory part against the agent as it is: the protocol v2 signing work in a
process of its own (a real device key, a real release-signed desired state) and the report."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]
for _p in (ROOT / "bench", ROOT / "tests" / "agent"):  # bench's modules, agent_helpers
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))


@pytest.fixture(scope="module")
def signer(tmp_path_factory):
    from agent_helpers import build_bundle
    from agent_memory import signer_process

    from edgepack.host.keys import generate_keys, load_private_key

    work = tmp_path_factory.mktemp("agent-bench")
    key, pub, _ = generate_keys(work / "keys", "fleet")
    bundle = build_bundle(work / "tiny.edgepack", key=load_private_key(key))
    return signer_process(SimpleNamespace(work=work, key=key, pub=pub), bundle, runs=1)


def test_the_signing_stack_runs_in_a_process_of_its_own(signer):
    (first, before), (what, after) = signer["steps"]
    assert first == "python" and "1 desired state checked" in what
    assert after["VmRSS"] > before["VmRSS"] > 0
    assert signer["runs"] == 1 and signer["child_ms"] > 0


def test_the_report_shows_the_goal_the_signing_stack_and_its_alternatives(signer):
    from agent_memory import LADDER, SIGNING_STACK
    from agent_report import render

    def rss(mb: float) -> dict:
        return {"VmRSS": mb, "VmHWM": mb, "RssAnon": mb / 2, "RssFile": mb / 2}

    ladder = [["bare", rss(70.0)]] + [[g, rss(71.0 + k)] for k, g in enumerate(LADDER)]
    mem = {"bare": rss(70.0), "agent_after_install": {**rss(96.0), "cryptography_mapped": True},
           "agent_after_restart": rss(95.0), "ladder": ladder}
    mem["over_bare_mb"] = {"agent_after_install": 26.0, "agent_after_restart": 25.0}
    res = {"env": {"date": "2026-12-02", "cpu": "cpu", "cpus": 2, "python": "3.11",
                   "onnxruntime": "1", "mosquitto": "mosquitto", "threads": 2},
           "models": {"digits": {"memory": mem, "report_signed_by": "ab" * 16}},
           "signer": signer, "failed": {}}
    text = render(res)
    assert "96.0 (+26.0) MISS" in text
    assert f"+{len(SIGNING_STACK):.2f} MB" in text  # one MB per ladder step in this fake
    assert "True; abababababababab" in text and "resident helper" in text
    assert "cryptography (exceptions, serialization, ed25519)" in text
