"""Helpers the host tests import (a uniquely named module: every test folder has a conftest)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def publish_manifest_only(broker_url: str, fleet: str, bundle_path: Path,
                          chunk_size: int = 64 * 1024) -> str:
    """Publish just the retained ``bundles/{id}/manifest`` message of a bundle; return its id.

    Enough for ``deploy`` by id (which never fetches chunks); the real publisher lives in
    ``edgepack.host.fleet.publish``.
    """
    from edgepack.agent.bundle import read_bundle
    from edgepack.agent.protocol import Topics, chunk_table_payload, encode
    from edgepack.host.fleet.client import SyncClient

    b = read_bundle(bundle_path)
    data = bundle_path.read_bytes()
    chunks = [hashlib.sha256(data[i:i + chunk_size]).hexdigest()
              for i in range(0, len(data), chunk_size)]
    msg = {**chunk_table_payload(b.bundle_id, len(data), chunk_size, chunks),
           "manifest": b.manifest, "signature": b.signature}
    with SyncClient(broker_url, timeout=10) as c:
        c.publish(Topics(fleet).bundle_manifest(b.bundle_id), encode(msg), retain=True)
    return b.bundle_id
