"""``edgepack publish``: put a bundle on the broker as retained chunks plus a signed chunk table.

Order matters: every chunk is published (retained, QoS 1) and acknowledged by the broker before
the retained ``bundles/{id}/manifest`` message, so a device that sees the manifest can fetch
every chunk. Publishing is idempotent: when the broker already retains the same manifest message
(same chunks, same signature), nothing is sent again.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from edgepack.agent.bundle import Bundle, read_bundle
from edgepack.agent.errors import ProtocolError
from edgepack.agent.mqtt import BrokerConfig, parse_broker_url
from edgepack.agent.protocol import Topics, chunk_table_payload, decode, encode
from edgepack.agent.signing import canonical_json
from edgepack.host.fleet.client import SyncClient

__all__ = ["publish", "PublishResult", "publish_bundle", "manifest_message",
           "DEFAULT_CHUNK_SIZE"]

DEFAULT_CHUNK_SIZE = 256 * 1024
_BATCH = 64  # publishes awaiting PUBACK at a time
_COMPARED = ("bundle_id", "bytes", "chunk_size", "chunks", "manifest", "signature", "table_sig")


def _chunk_size_for(target: str) -> int:
    try:
        from edgepack.agent.profiles import load_profile

        return int(load_profile(target).transfer.chunk_kb) * 1024
    except Exception:  # noqa: BLE001 - a custom target without a shipped profile
        return DEFAULT_CHUNK_SIZE


def manifest_message(bundle: Bundle | str | os.PathLike, *, chunk_size: int,
                     sign: Callable[[bytes], dict] | None = None) -> tuple[dict, list[bytes]]:
    """The ``bundles/{id}/manifest`` message body (without ``ts``) and the chunks."""
    if not isinstance(bundle, Bundle):
        bundle = read_bundle(bundle)
    data = Path(bundle.path).read_bytes()
    if hashlib.sha256(data).hexdigest() != bundle.bundle_id:
        raise ProtocolError(f"{bundle.path} changed while it was being read; try again")
    chunks = [data[i:i + chunk_size] for i in range(0, len(data), chunk_size)]
    hashes = [hashlib.sha256(c).hexdigest() for c in chunks]
    table = chunk_table_payload(bundle.bundle_id, len(data), chunk_size, hashes)
    msg = {**table, "manifest": bundle.manifest, "signature": bundle.signature,
           "table_sig": sign(canonical_json(table)) if sign is not None else None}
    return msg, chunks


@dataclass(frozen=True)
class PublishResult:
    """What :func:`publish` did: the bundle, how it was cut (``chunk_size`` bytes, ``chunks``),
    where (``fleet``, manifest ``topic``, ``broker``), whether the chunk table is ``signed`` (by
    ``key_id``), whether the broker held it already (``skipped``) and how long it took."""

    bundle_id: str
    name: str
    version: str
    target: str
    bytes: int
    chunk_size: int
    chunks: int
    fleet: str
    topic: str
    broker: str
    signed: bool
    key_id: str | None
    skipped: bool = False
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def publish_bundle(bundle_path: str | os.PathLike, broker: str | BrokerConfig, *,
                   key_path: str | os.PathLike | None = None, fleet: str = "default",
                   chunk_size: int | None = None, timeout: float = 60.0,
                   force: bool = False) -> dict[str, Any]:
    """:func:`publish` with the result as a dict (the form scripts and tests have used)."""
    return publish(bundle_path, broker=broker, key=key_path, fleet=fleet,
                   chunk_size=chunk_size, timeout=timeout, force=force).to_json()


def publish(bundle: str | os.PathLike, *, broker: str | BrokerConfig,
            key: str | os.PathLike | None = None, fleet: str = "default",
            chunk_size: int | None = None, timeout: float = 60.0,
            force: bool = False) -> PublishResult:
    """Publish a bundle file for devices to fetch; return what was done.

    ``key`` is the fleet's Ed25519 private key: it signs the chunk table (``table_sig``),
    which devices check before fetching a single chunk. Without it devices refuse the bundle
    unless they run with ``allow_unsigned = true``. ``chunk_size`` (bytes) defaults to the
    bundle target's ``transfer.chunk_kb``; ``force`` publishes again what the broker holds.
    """
    started = time.monotonic()
    b = read_bundle(bundle)
    size = chunk_size or _chunk_size_for(b.target)
    if size <= 0:
        raise ProtocolError("chunk size must be positive: pass a positive `chunk_size=`",
                            field="chunk_size")
    from edgepack.host.keys import signer

    sign, _ = signer(key)
    msg, chunks = manifest_message(b, chunk_size=size, sign=sign)
    topics = Topics(fleet)
    bid = b.bundle_id
    manifest_topic = topics.bundle_manifest(bid)
    cfg = parse_broker_url(broker) if isinstance(broker, str) else broker
    result = PublishResult(
        bundle_id=bid, name=b.name, version=b.version, target=b.target,
        bytes=msg["bytes"], chunk_size=size, chunks=len(chunks), fleet=fleet,
        topic=manifest_topic, broker=cfg.url, signed=msg["table_sig"] is not None,
        key_id=msg["table_sig"]["key_id"] if msg["table_sig"] else None)
    with SyncClient(cfg, timeout=timeout) as client:
        existing = client.retained(manifest_topic, settle=0.3).get(manifest_topic)
        old: dict | None = None
        if existing:
            try:
                old = decode(existing, "retained bundle manifest")
            except ProtocolError:
                old = None
        if not force and old is not None and all(old.get(k) == msg.get(k) for k in _COMPARED):
            return replace(result, skipped=True,
                           seconds=round(time.monotonic() - started, 3))
        pending: list[int] = []
        for i, chunk in enumerate(chunks):
            pending.append(client.publish(topics.bundle_chunk(bid, i), chunk, qos=1, retain=True,
                                          wait=False))
            if len(pending) >= _BATCH:
                client.wait_published(pending)
                pending = []
        client.wait_published(pending)
        if old is not None and isinstance(old.get("chunks"), list):
            # an earlier publish with smaller chunks left more retained chunks: clear them
            stale = [client.publish(topics.bundle_chunk(bid, i), b"", qos=1, retain=True,
                                    wait=False) for i in range(len(chunks), len(old["chunks"]))]
            client.wait_published(stale)
        client.publish(manifest_topic, encode(msg), qos=1, retain=True)
    return replace(result, seconds=round(time.monotonic() - started, 3))
