"""The shape the code keeps: three host wings, no oversized module, paho-free host wings."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 600


def test_no_module_in_host_or_agent_over_600_lines():
    big = {str(p.relative_to(ROOT)): n for p in sorted((ROOT / "host").rglob("*.py"))
           + sorted((ROOT / "agent").rglob("*.py"))
           if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"split these by stage or concern: {big}"


def test_host_is_three_wings_and_a_front_door():
    modules = {p.name for p in (ROOT / "host").glob("*.py")}
    folders = {p.name for p in (ROOT / "host").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == {"build", "fleet", "cli"}, folders
    assert modules <= {"__init__.py", "keys.py"}, modules


def test_the_front_door_names_resolve():
    import edgepack.host as ep

    missing = [name for name in ep.__all__ if getattr(ep, name, None) is None]
    assert not missing, missing
    assert callable(ep.build) and ep.build.__name__ == "edgepack.host.build"
