"""The agent checks signatures in a child process, so it never holds ``cryptography``."""

from __future__ import annotations

import base64
import subprocess
import sys

import pytest

from edgepack.agent import signing
from edgepack.agent.errors import SignatureError


def _sig_doc(private, data: bytes) -> dict:
    from edgepack.host.keys import sign_bytes

    return sign_bytes(data, private)


def test_child_check_accepts_good_and_refuses_changed_data(keys, monkeypatch) -> None:
    trusted = signing.load_public_keys([keys.pub])
    doc = _sig_doc(keys.private, b"manifest bytes")
    monkeypatch.setattr(signing, "_check", signing._check_in_child)  # as in the agent
    assert signing.verify_detached(b"manifest bytes", doc, trusted) == keys.key_id
    with pytest.raises(SignatureError, match="does not verify"):
        signing.verify_detached(b"manifest bytez", doc, trusted)
    raw = base64.b64decode(doc["sig"])
    assert signing._check_in_child(trusted[keys.key_id].raw, raw, b"manifest bytes")


def test_public_key_parsing_matches_cryptography(keys) -> None:
    from cryptography.hazmat.primitives import serialization

    ours = signing.load_public_key(keys.pub)
    theirs = serialization.load_pem_public_key(keys.pub.read_bytes())
    assert signing.key_id(ours) == signing.key_id(theirs) == keys.key_id


def test_private_key_passed_as_public_is_a_clear_error(keys) -> None:
    with pytest.raises(SignatureError, match="not the private .key"):
        signing.load_public_key(keys.key)


def test_importing_the_agent_bundle_reader_does_not_load_cryptography() -> None:
    code = ("import sys, edgepack.agent.bundle, edgepack.agent.signing, edgepack.agent.transfer;"
            "print('cryptography' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"


def test_child_ignores_modules_planted_in_the_working_directory(keys, tmp_path, monkeypatch):
    """A ``json.py`` planted in the working directory (or on PYTHONPATH) that exits 0 would
    turn an all-zero signature into "verified": the children run isolated (``-I``)."""
    trusted = signing.load_public_keys([keys.pub])
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "json.py").write_text("import sys\nsys.exit(0)\n")
    monkeypatch.chdir(planted)
    monkeypatch.setenv("PYTHONPATH", str(planted))
    assert not signing._check_in_child(trusted[keys.key_id].raw, b"\0" * 64, b"manifest bytes")
    # the same planted module does take over a child run without -I: the test is meaningful
    r = subprocess.run([sys.executable, "-m", "edgepack.agent.signing"], input=b"{}",
                       capture_output=True, timeout=60)
    assert r.returncode == 0


def test_health_and_measure_children_run_isolated() -> None:
    import inspect

    from edgepack.agent import health, profiler

    assert '"-I", "-m", "edgepack.agent.health"' in inspect.getsource(health.HealthCheck)
    assert '"-I", "-m", "edgepack.agent.measure"' in inspect.getsource(profiler)
