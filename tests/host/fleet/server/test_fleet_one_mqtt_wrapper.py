"""paho is set up in one place: only ``agent/mqtt.py`` imports it; the agent, the collector, the
simulator and the host commands all go through its :class:`MqttClient`."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[4]
WRAPPER = Path("agent/mqtt.py")


def _paho_uses(path: Path) -> list[str]:
    """``line: what`` for every paho import (top level or inside a function) and every
    ``"paho.…"`` module name handed to an importer."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [node.value] if node.value.startswith("paho.") else []
        found += [f"{node.lineno}: {n}" for n in names if n == "paho" or n.startswith("paho.")]
    return found


def test_only_the_wrapper_imports_paho() -> None:
    sources = sorted(p for wing in ("host", "agent") for p in (ROOT / wing).rglob("*.py"))
    assert len(sources) > 50 and ROOT / WRAPPER in sources  # the scan sees the real tree
    uses = {str(p.relative_to(ROOT)): u for p in sources if (u := _paho_uses(p))}
    assert set(uses) == {str(WRAPPER)}, uses
    assert any("paho.mqtt.client" in u for u in uses[str(WRAPPER)])
