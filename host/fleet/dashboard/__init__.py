"""The fleet dashboard: a JSON API over the fleet database and the static pages that show it.

:class:`~edgepack.host.fleet.server.FleetServer` runs it next to the collector and the rollout
engine (``edgepack fleet serve``).
"""

from __future__ import annotations

from edgepack.host.fleet.dashboard.api import FleetAPI, NotFound
from edgepack.host.fleet.dashboard.server import STATIC_DIR, make_http_server

__all__ = ["FleetAPI", "NotFound", "make_http_server", "STATIC_DIR"]
