"""The fleet dashboard: a JSON API over the fleet database and the static pages that show it.

:class:`FleetServer` is what ``edgepack fleet serve`` runs: the collector, the rollout engine and
the HTTP server (dashboard, ``/api/…``, ``/metrics``) in one process.
"""

from __future__ import annotations

from edgepack.host.fleet.dashboard.api import FleetAPI, NotFound
from edgepack.host.fleet.dashboard.server import STATIC_DIR, FleetServer, make_http_server

__all__ = ["FleetServer", "FleetAPI", "NotFound", "make_http_server", "STATIC_DIR"]
