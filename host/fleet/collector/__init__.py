"""The fleet collector: subscribes to what devices publish and stores it.

Modules by concern: :mod:`.subscription` (the broker session and its subscriptions),
:mod:`.inbox` (the hand-over to the writer), :mod:`.messages` (topics and payloads to a batch),
:mod:`.collector` (the writer, retries, retention, counters), :mod:`.reports` (build reports of
published bundles), :mod:`.lag` (ingest lag statistics).
"""

from __future__ import annotations

from edgepack.host.fleet.collector.collector import Collector
from edgepack.host.fleet.collector.lag import LagStats
from edgepack.host.fleet.collector.options import CollectorOptions, default_client_id
from edgepack.host.fleet.collector.reports import fetch_report

__all__ = ["Collector", "CollectorOptions", "LagStats", "default_client_id", "fetch_report"]
