"""How the collector subscribes, batches, retains and recovers."""

from __future__ import annotations

import hashlib
import socket
from dataclasses import dataclass

from edgepack.agent.protocol import check_id

__all__ = ["CollectorOptions", "default_client_id"]


def default_client_id(fleets: tuple[str, ...], db_url: str = "") -> str:
    """A client id stable across restarts of the same collector (so its session persists)."""
    h = hashlib.sha256(f"{socket.gethostname()}|{','.join(fleets)}|{db_url}".encode())
    return f"edgepack-collector-{h.hexdigest()[:12]}"


@dataclass(frozen=True)
class CollectorOptions:
    """How the collector subscribes, batches, retains and recovers."""

    fleets: tuple[str, ...] = ("default",)
    client_id: str | None = None  # default: stable per host, fleets and database
    shared: str = "auto"  # auto: MQTT 5 shared subscription if offered; on; off
    share_group: str = "edgepack"
    session_expiry_s: int = 7 * 86400  # how long the broker keeps our session while we are away
    batch_max: int = 5000
    queue_max: int = 500_000  # messages held while the database is away (~250 MB)
    telemetry_retention_s: float | None = 7 * 86400.0
    events_retention_s: float | None = 90 * 86400.0
    prune_every_s: float = 600.0
    fetch_reports: bool = True
    report_max_bytes: int = 256 * 1024 * 1024
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    heartbeat_s: float = 10.0

    def __post_init__(self) -> None:
        if self.shared not in ("auto", "on", "off"):
            raise ValueError("shared must be auto, on or off")
        for f in self.fleets:
            check_id(f, "fleet name")
        check_id(self.share_group, "share group")
