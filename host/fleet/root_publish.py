"""Publish a fleet's root metadata chain where devices find it: retained, one topic per version.

Every version ``N`` kept in the keys folder (``{N}.root.json``, written by ``keys init`` and
``keys rotate``) is retained on ``edgepack/v1/{fleet}/root/{N}``. A device subscribes
``root/+`` on every connect and walks from the version it trusts, one version at a time
(``RootChain`` in agent/trust/root.py); a device several rotations behind finds every step.
Root metadata is public (it holds public keys only), so publishing it grants nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.agent.mqtt import BrokerConfig, parse_broker_url
from edgepack.agent.protocol import Topics
from edgepack.agent.trust.errors import KeyFileError
from edgepack.agent.trust.root import ROOT_TOPIC, TrustedRoot
from edgepack.host.fleet.client import SyncClient
from edgepack.host.fleet.keyring import root_history

__all__ = ["RootPublication", "publish_root", "root_topic"]


@dataclass(frozen=True)
class RootPublication:
    """The root versions :func:`publish_root` retained, and where."""

    fleet: str
    broker: str
    versions: tuple[int, ...]
    topics: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"fleet": self.fleet, "broker": self.broker, "versions": list(self.versions),
                "topics": list(self.topics)}


def root_topic(fleet: str, version: int) -> str:
    """``edgepack/v1/{fleet}/root/{version}``."""
    return Topics(fleet).prefix + ROOT_TOPIC.format(version=int(version))


def publish_root(keys_dir: str | os.PathLike, *, broker: str | BrokerConfig,
                 fleet: str = "default", timeout: float = 30.0) -> RootPublication:
    """Retain every root version of ``keys_dir`` on its ``root/{N}`` topic (QoS 1).

    Each version must verify with its own root threshold before it leaves the host (a
    half-signed root from an unfinished ceremony is refused here, not on every device).
    """
    chain = root_history(keys_dir)
    if not chain:
        raise KeyFileError(f"no root metadata in {keys_dir}: make the fleet's keys with "
                           "`keys init` first", path=keys_dir, field="keys_dir")
    payloads = []
    for version, path in chain:
        data = Path(path).read_bytes()
        TrustedRoot.check(data)
        payloads.append((root_topic(fleet, version), data))
    cfg = parse_broker_url(broker) if isinstance(broker, str) else broker
    with SyncClient(cfg, timeout=timeout) as client:
        for topic, data in payloads:
            client.publish(topic, data, qos=1, retain=True)
    return RootPublication(fleet, cfg.url, tuple(v for v, _ in chain),
                           tuple(t for t, _ in payloads))
