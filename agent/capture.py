"""Sampled capture: an opt-in, bounded on-disk ring of inference inputs and outputs.

Never on by default. A release-signed control message of kind ``capture`` for this device
(retained on ``devices/{id}/capture``, verified by the trust gate like a desired state) says
what to do (``docs/drift.md`` § Sampled capture):

* ``start``: record a sampled fraction (``rate_ppm``, parts per million) of the inferences the
  agent serves, each as one npz record (``input:<name>``, ``output:<name>`` and a ``__meta__``
  JSON string) in ``{data_dir}/capture/ring``, files 0600. The ring is bounded in bytes and in
  records: the oldest records go first. Capturing stops by itself when the request expires;
  the records left are deleted ``keep_s`` after that (default 7 days);
* ``stop``: capturing stops at once; with ``purge`` every record is deleted;
* ``pull``: the device sends the ring to the host over MQTT, as a chunk table
  (``capture/{id}/table``: sizes and sha256 per chunk, signed by the device identity key when
  it has one) followed by its chunks (``capture/{id}/chunks/{i}``), QoS 1 and not retained, so
  nothing captured stays on the broker. They are outside ``devices/{id}/#`` so that what
  watches a device's reports never receives its captured data. The capture state does not
  change.

A newer message replaces the older one; a replayed, forged, expired or unsigned one is refused by
the gate (an event) and changes nothing. :meth:`Capture.observe` is called by
:meth:`~edgepack.agent.inference.Model.predict` from the serving threads; when capture is off it
costs one attribute check.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import random
import shutil
import threading
import time
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgepack.agent.errors import ProtocolError
from edgepack.agent.trust.privatefile import write_private

__all__ = [
    "ACTIONS",
    "DEFAULT_KEEP_S",
    "MAX_RING_BYTES",
    "CaptureRequest",
    "CaptureRing",
    "Capture",
    "PullMessages",
    "data_topic",
    "parse_request",
    "record_npz",
]

log = logging.getLogger("edgepack.agent.capture")

ACTIONS = ("start", "stop", "pull")
DEFAULT_KEEP_S = 7 * 86400       # records outlive their request by this much, unless purged
MAX_RING_BYTES = 1024 * 1024 * 1024
MAX_RING_RECORDS = 1_000_000
DEFAULT_CHUNK = 256 * 1024
_PPM = 1_000_000


@dataclass(frozen=True)
class CaptureRequest:
    """What a verified capture message asks (``until``: its expiry, unix seconds)."""

    action: str
    version: int
    until: int
    rate_ppm: int = 0
    max_bytes: int = 0
    max_records: int = 0
    keep_s: int = DEFAULT_KEEP_S
    purge: bool = False
    pull_id: str = ""
    chunk_size: int = DEFAULT_CHUNK


def _int(d: Mapping[str, Any], key: str, lo: int, hi: int, default: int | None = None) -> int:
    v = d.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ProtocolError(f"capture request field {key!r} must be an integer in "
                            f"[{lo}, {hi}], not {v!r}", field=key)
    return v


def parse_request(verified: Any) -> CaptureRequest:
    """The request a verified capture message carries (ProtocolError when malformed)."""
    d = verified.fields.get("capture")
    if not isinstance(d, Mapping) or d.get("action") not in ACTIONS:
        raise ProtocolError(f"a capture message needs a 'capture' object whose action is one of "
                            f"{', '.join(ACTIONS)}")
    action = d["action"]
    base = {"action": action, "version": verified.version, "until": verified.expires}
    if action == "start":
        return CaptureRequest(**base, rate_ppm=_int(d, "rate_ppm", 1, _PPM),
                              max_bytes=_int(d, "max_bytes", 1024, MAX_RING_BYTES),
                              max_records=_int(d, "max_records", 1, MAX_RING_RECORDS, 10_000),
                              keep_s=_int(d, "keep_s", 0, 365 * 86400, DEFAULT_KEEP_S))
    if action == "stop":
        return CaptureRequest(**base, purge=d.get("purge") is True)
    pull_id = d.get("pull_id")
    if not isinstance(pull_id, str) or not 0 < len(pull_id) <= 64:
        raise ProtocolError("a capture pull names its 'pull_id' (1 to 64 characters)")
    return CaptureRequest(**base, pull_id=pull_id,
                          chunk_size=_int(d, "chunk_size", 4096, 4 * 1024 * 1024, DEFAULT_CHUNK))


def data_topic(topics: Any, device_id: str) -> str:
    """Where a device sends a pull: ``{prefix}capture/{id}`` (``/table``, ``/chunks/{i}``)."""
    from edgepack.agent.protocol import check_id

    return f"{topics.prefix}capture/{check_id(device_id)}"


class CaptureRing:
    """Records (npz files, 0600) in ``directory``, at most ``max_bytes`` and ``max_records``:
    adding one drops the oldest until both bounds hold."""

    def __init__(self, directory: str | os.PathLike, *, max_bytes: int,
                 max_records: int) -> None:
        self.dir = Path(directory)
        self.max_bytes, self.max_records = max_bytes, max_records
        self.dropped = 0
        self._files: list[tuple[str, int]] = []  # (name, bytes), oldest first
        if self.dir.is_dir():
            for p in sorted(self.dir.glob("*.npz")):
                self._files.append((p.name, p.stat().st_size))
        self._seq = int(self._files[-1][0].split("-")[0]) + 1 if self._files else 0
        self._lock = threading.Lock()

    @property
    def bytes(self) -> int:
        return sum(n for _, n in self._files)

    def __len__(self) -> int:
        return len(self._files)

    def names(self) -> list[str]:
        return [n for n, _ in self._files]

    def add(self, record: bytes) -> bool:
        """Store one record; False when it alone is over the byte bound (not stored)."""
        if len(record) > self.max_bytes:
            self.dropped += 1
            return False
        with self._lock:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            name = f"{self._seq:012d}-{int(time.time() * 1000)}.npz"
            self._seq += 1
            write_private(self.dir / name, record)
            self._files.append((name, len(record)))
            total = self.bytes
            while self._files and (total > self.max_bytes or len(self._files) > self.max_records):
                old, size = self._files.pop(0)
                with contextlib.suppress(FileNotFoundError):
                    (self.dir / old).unlink()
                total -= size
                self.dropped += 1
        return True

    def purge(self) -> None:
        with self._lock:
            shutil.rmtree(self.dir, ignore_errors=True)
            self._files.clear()

    def archive(self, meta: Mapping[str, Any]) -> bytes:
        """Every record and an ``index.json`` in one zip (stored, not compressed)."""
        with self._lock:
            files = list(self._files)
        buf = io.BytesIO()
        index = []
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
            for name, _ in files:
                with contextlib.suppress(FileNotFoundError):
                    z.writestr(f"records/{name}", (self.dir / name).read_bytes())
                    index.append(name)
            z.writestr("index.json", json.dumps({**meta, "records": index}, sort_keys=True))
        return buf.getvalue()


def record_npz(inputs: Mapping[str, Any], outputs: Mapping[str, Any],
               meta: Mapping[str, Any]) -> bytes:
    """One capture record: ``input:<name>``, ``output:<name>`` and ``__meta__`` (JSON)."""
    import numpy as np

    arrays = {f"input:{k}": np.asarray(v) for k, v in inputs.items()}
    arrays.update({f"output:{k}": np.asarray(v) for k, v in outputs.items()
                   if isinstance(v, np.ndarray) or np.isscalar(v)})
    arrays["__meta__"] = np.array(json.dumps(dict(meta), sort_keys=True))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@dataclass(frozen=True)
class PullMessages:
    """What a pull sends: the chunk table (JSON bytes) and the chunks, in order."""

    table: bytes
    chunks: tuple[bytes, ...]


class Capture:
    """The device's capture switch and ring, persisted in ``{data_dir}/capture``."""

    def __init__(self, data_dir: str | os.PathLike, *, device_id: str,
                 clock: Any = time.time) -> None:
        self.root = Path(data_dir) / "capture"
        self.data_dir = Path(data_dir)
        self.device_id = device_id
        self.clock = clock
        self.request: CaptureRequest | None = None  # the start request in force
        self.digest = ""  # sha256 of the last capture message acted on
        self.captured = 0
        self._ring: CaptureRing | None = None
        self._ring_lock = threading.Lock()  # serving threads and the agent loop share the ring
        self._read()

    # ---- state
    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    def _read(self) -> None:
        try:
            doc = json.loads(self.state_path.read_bytes())
        except (OSError, ValueError):
            return
        self.digest = str(doc.get("digest") or "")
        req = doc.get("request")
        if isinstance(req, dict):
            with contextlib.suppress(TypeError):
                self.request = CaptureRequest(**req)
        self.expire()

    def _save(self) -> None:
        doc = {"digest": self.digest,
               "request": asdict(self.request) if self.request is not None else None}
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private(self.state_path, json.dumps(doc, sort_keys=True).encode())

    @property
    def ring(self) -> CaptureRing:
        """The ring with the bounds of the request in force (or of none: nothing is added)."""
        r = self.request
        with self._ring_lock:
            ring = self._ring
            if ring is None or (r is not None and (ring.max_bytes, ring.max_records)
                                != (r.max_bytes, r.max_records)):
                ring = self._ring = CaptureRing(
                    self.root / "ring", max_bytes=r.max_bytes if r else MAX_RING_BYTES,
                    max_records=r.max_records if r else MAX_RING_RECORDS)
            return ring

    @property
    def active(self) -> bool:
        r = self.request
        return r is not None and self.clock() < r.until

    def is_last(self, payload: bytes) -> bool:
        """True for the capture message acted on last (a retained redelivery)."""
        return hashlib.sha256(payload).hexdigest() == self.digest

    def apply(self, req: CaptureRequest, payload: bytes) -> PullMessages | None:
        """Act on a verified request; a pull returns the messages to publish."""
        self.digest = hashlib.sha256(payload).hexdigest()
        out = None
        if req.action == "start":
            self.request = req
            self._ring = None
            log.info("capture on: %.4f%% of inferences, at most %d bytes / %d records, until %s",
                     req.rate_ppm / 1e4, req.max_bytes, req.max_records,
                     time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(req.until)))
        elif req.action == "stop":
            self.request = None
            if req.purge:
                self.ring.purge()
                log.info("capture off; every record purged")
            else:
                log.info("capture off; %d record(s) kept", len(self.ring))
        else:
            out = self.pull(req)
        self._save()
        return out

    def expire(self) -> bool:
        """Turn capture off once its request expired, and delete records past their keep time;
        True when something changed."""
        r = self.request
        now = self.clock()
        if r is None or now < r.until:
            return False
        if now >= r.until + r.keep_s:
            self.ring.purge()
            self.request = None
            self._save()
            return True
        return False

    def receive(self, payload: bytes, gate: Any) -> tuple[CaptureRequest | None,
                                                          PullMessages | None]:
        """Verify (``gate.capture``) and act on one message from ``devices/{id}/capture``:
        ``(request, pull messages)``; ``(None, None)`` for a redelivery of the last one.
        Raises ControlRefused (nothing changes) for a message the device must not act on."""
        from edgepack.agent.trust import ControlRefused, Reason

        if not payload or self.is_last(payload):
            return None, None  # cleared, or the retained message this device acted on
        v = gate.capture(payload)
        try:
            req = parse_request(v)
        except ProtocolError as exc:
            raise ControlRefused(str(exc), reason=Reason.MALFORMED, kind="capture",
                                 version=v.version) from None
        if not v.new:
            return None, None
        return req, self.apply(req, payload)

    def send(self, msgs: PullMessages, link: Any, topics: Any) -> None:
        """Publish a pull (QoS 1, not retained): the table, then the chunks."""
        base = data_topic(topics, self.device_id)
        link.publish(f"{base}/table", msgs.table, qos=1)
        for i, c in enumerate(msgs.chunks):
            link.publish(f"{base}/chunks/{i}", c, qos=1)

    # ---- the serving threads
    def observe(self, feeds: Mapping[str, Any], outputs: Mapping[str, Any],
                bundle_id: str) -> None:
        """Maybe record one inference (sampled at the request's rate)."""
        r = self.request
        if r is None or self.clock() >= r.until or random.randrange(_PPM) >= r.rate_ppm:
            return
        try:
            rec = record_npz(feeds, outputs, {"ts": round(self.clock(), 3),
                                              "bundle_id": bundle_id,
                                              "device_id": self.device_id})
            if self.ring.add(rec):
                self.captured += 1
        except (OSError, ValueError, TypeError) as exc:  # serving goes on without capture
            log.warning("capture record not stored: %s", exc)

    # ---- pull
    def pull(self, req: CaptureRequest) -> PullMessages:
        """The ring as one zip, cut into chunks, and the chunk table that describes them."""
        ring = self.ring
        data = ring.archive({"device_id": self.device_id, "pull_id": req.pull_id,
                             "pulled_at": int(self.clock()), "dropped": ring.dropped,
                             "capturing": self.active})
        size = req.chunk_size
        chunks = tuple(data[i:i + size] for i in range(0, len(data), size))
        table: dict[str, Any] = {
            "kind": "capture", "device_id": self.device_id, "pull_id": req.pull_id,
            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "chunk_size": size, "chunks": [hashlib.sha256(c).hexdigest() for c in chunks],
            "records": len(ring), "ts": int(self.clock())}
        identity = self._identity()
        if identity is not None:
            table = identity.sign(table)
        return PullMessages(json.dumps(table, sort_keys=True).encode(), chunks)

    def _identity(self) -> Any:
        from edgepack.agent.identity import IDENTITY_FILE, DeviceIdentity

        if not (self.data_dir / IDENTITY_FILE).exists():
            return None
        try:
            return DeviceIdentity.load(self.data_dir)
        except Exception as exc:  # noqa: BLE001 - an unreadable key: send unsigned, say so
            log.warning("capture table not signed: %s", exc)
            return None
