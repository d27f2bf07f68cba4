"""Test-only fault injection: SIGKILL the agent at a named point of an install.

``EDGEPACK_TEST_CRASH_AT=<point>`` makes the agent send itself SIGKILL (exactly what ``kill -9``
does: no cleanup, no atexit, no flush) the ``EDGEPACK_TEST_CRASH_SKIP + 1``-th time it reaches
``<point>``. The reliability suite (``tests/reliability``) uses it to prove that a kill at every
install state leaves the old or the new bundle running, never neither. Without the variable every
call is a no-op (one environment lookup); never set it on a device.

Points, in install order: ``downloading`` (a chunk written, its progress not yet recorded),
``verifying`` (download complete), ``staging`` (slot half unpacked), ``staged``,
``health_checking`` (health child running), ``committing`` (passed, state not yet switched),
``committed`` (state switched, model not yet served, ``installed`` not yet reported).
"""

from __future__ import annotations

import os
import signal

__all__ = ["POINTS", "crash_point"]

POINTS = ("downloading", "verifying", "staging", "staged", "health_checking", "committing",
          "committed")
_ENV = "EDGEPACK_TEST_CRASH_AT"
_reached: dict[str, int] = {}


def crash_point(name: str) -> None:
    """SIGKILL this process here if ``EDGEPACK_TEST_CRASH_AT`` names this point (tests only)."""
    if os.environ.get(_ENV) != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] > int(os.environ.get("EDGEPACK_TEST_CRASH_SKIP", "0") or 0):
        os.kill(os.getpid(), signal.SIGKILL)
