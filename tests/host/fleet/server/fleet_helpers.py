"""Helpers for the fleet tests (a module name no other suite uses)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

__all__ = ["wait_for", "get_json"]


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.1,
             what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def get_json(url: str, *, missing: Any = ..., **kw: Any) -> Any:
    """GET a JSON document; with ``missing``, a 404 returns it instead of raising (for polling
    something the collector has not stored yet)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10, **kw) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404 and missing is not ...:
            return missing
        raise
