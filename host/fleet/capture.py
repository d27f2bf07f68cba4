"""Sampled capture, host side: ask a device to record (``start``), stop (``stop``, ``purge``)
and send its records (``pull``).

Each request is a release-signed control message of kind ``capture`` for one device, retained
on ``devices/{id}/capture`` (``docs/drift.md`` § Sampled capture; the device side is
:mod:`edgepack.agent.capture`). A pull waits for the device's chunk table, checks its size
against ``max_mb`` before taking a chunk, checks every chunk's sha256 against the table and
the whole against the table's sha256, writes the chunks to disk as they come (never more than
a window of early chunks in memory), and unpacks one npz per record plus ``index.json`` into the
output directory.

What comes back is the device's: its inputs and outputs are only as honest as the device. The
table carries the device identity key's signature when the device has one; :func:`pull` reports
that key id, and with ``device_key=`` (the device's enrollment ``{"keyid", "key"}``) refuses a
table that key did not sign (:class:`~edgepack.host.fleet.identity.ReportVerifier`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
import zipfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgepack.agent.capture import data_topic
from edgepack.agent.errors import EdgepackError, ProtocolError
from edgepack.agent.mqtt import BrokerConfig, parse_broker_url
from edgepack.agent.protocol import Topics
from edgepack.host.fleet.client import SyncClient

__all__ = ["CaptureSent", "PullResult", "parse_until", "pull", "start", "stop"]

DEFAULT_UNTIL_S = 86400
MAX_UNTIL_S = 30 * 86400
STOP_LIFETIME_S = MAX_UNTIL_S  # a stop outlives any start it replaces
_EARLY_CHUNKS = 64  # chunks that arrive before their table, kept in memory at most


@dataclass(frozen=True)
class CaptureSent:
    """A capture request published for a device."""

    device: str
    action: str
    version: int
    expires: int
    topic: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PullResult:
    """What :func:`pull` wrote: ``records`` npz files and ``index`` in ``out``."""

    device: str
    pull_id: str
    out: str
    index: str
    records: int
    bytes: int
    signed_by: str | None
    verified: bool  # the table's signature verified against ``device_key``
    capturing: bool
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def parse_until(until: str | float | datetime | None, now: float | None = None) -> int:
    """Seconds from now until ``until``: a duration (``90m``, ``12h``, ``7d``, seconds) or an
    ISO 8601 time; at most 30 days."""
    now = time.time() if now is None else now
    if until is None:
        return DEFAULT_UNTIL_S
    if isinstance(until, datetime):
        secs = until.timestamp() - now
    elif isinstance(until, (int, float)):
        secs = float(until)
    else:
        text = until.strip()
        units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
        try:
            if text[-1:] in units:
                secs = float(text[:-1]) * units[text[-1]]
            elif text.replace(".", "", 1).isdigit():
                secs = float(text)
            else:
                t = datetime.fromisoformat(text.replace("Z", "+00:00"))
                secs = (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp() - now
        except ValueError:
            raise EdgepackError(f"cannot read `until=` {until!r}: give a duration (90m, 12h, "
                                "7d) or an ISO 8601 time", field="until") from None
    if not 0 < secs <= MAX_UNTIL_S:
        raise EdgepackError(f"`until=` must be in the future and at most 30 days away, not "
                            f"{secs:.0f} s", field="until")
    return int(secs)


def _signer(key: str | os.PathLike | None) -> Any:
    from edgepack.host.fleet.trust import release_signer

    s = release_signer(key)
    if s is None:
        raise EdgepackError("a capture request is signed with the release key: pass `key=` "
                            "(or set EDGEPACK_KEY)", field="key")
    return s


def _send(device: str, request: dict, *, broker: str | BrokerConfig,
          key: str | os.PathLike | None, fleet: str, lifetime_s: float,
          client: SyncClient | None = None) -> CaptureSent:
    from edgepack.host.fleet.trust import sign_capture, signed_version

    topic = Topics(fleet).device(device, "capture")
    signer = _signer(key)
    cfg = parse_broker_url(broker) if isinstance(broker, str) else broker

    def go(c: SyncClient) -> CaptureSent:
        previous = c.retained(topic, settle=0.3).get(topic)
        payload = sign_capture(signer, fleet, device=device, request=request,
                               lifetime_s=lifetime_s, previous=previous)
        c.publish(topic, payload, qos=1, retain=True)
        doc = json.loads(payload)["signed"]
        return CaptureSent(device, request["action"], signed_version(payload),
                           int(datetime.fromisoformat(doc["expires"].replace("Z", "+00:00"))
                               .timestamp()), topic)

    if client is not None:
        return go(client)
    with SyncClient(cfg, timeout=30) as c:
        return go(c)


def start(device: str, *, broker: str | BrokerConfig, key: str | os.PathLike | None = None,
          fleet: str = "default", rate: float = 0.01, max_mb: float = 20.0,
          max_records: int = 10_000, until: str | float | datetime | None = None,
          keep_days: float = 7.0) -> CaptureSent:
    """Ask ``device`` to record a ``rate`` fraction of its inferences (0 < rate ≤ 1) into a ring
    of at most ``max_mb`` MB and ``max_records`` records, until ``until`` (default 24 h); the
    records are deleted ``keep_days`` after that unless pulled and purged sooner."""
    if not 0 < rate <= 1:
        raise EdgepackError(f"`rate=` is a fraction of inferences in (0, 1], not {rate}",
                            field="rate")
    if not 0.001 <= max_mb <= 1024:
        raise EdgepackError(f"`max_mb=` must be between 0.001 and 1024, not {max_mb}",
                            field="max_mb")
    request = {"action": "start", "rate_ppm": max(1, round(rate * 1_000_000)),
               "max_bytes": int(max_mb * 1024 * 1024), "max_records": int(max_records),
               "keep_s": int(keep_days * 86400)}
    return _send(device, request, broker=broker, key=key, fleet=fleet,
                 lifetime_s=parse_until(until))


def stop(device: str, *, broker: str | BrokerConfig, key: str | os.PathLike | None = None,
         fleet: str = "default", purge: bool = False) -> CaptureSent:
    """Ask ``device`` to stop capturing; ``purge`` deletes every record it holds."""
    return _send(device, {"action": "stop", "purge": bool(purge)}, broker=broker, key=key,
                 fleet=fleet, lifetime_s=STOP_LIFETIME_S)


def pull(device: str, *, broker: str | BrokerConfig, out: str | os.PathLike,
         key: str | os.PathLike | None = None, fleet: str = "default", timeout: float = 120.0,
         max_mb: float = 1024.0, chunk_kb: int = 256,
         device_key: Any = None) -> PullResult:
    """Fetch the records ``device`` captured into ``out``: one ``<record>.npz`` each (arrays
    ``input:<name>``, ``output:<name>``, ``__meta__``) and ``index.json``. ``device_key``
    (enrollment object or key) makes an unsigned or foreign-signed table an error."""
    verifier = None
    if device_key is not None:
        from edgepack.host.fleet.identity import ReportVerifier

        verifier = ReportVerifier({device: device_key})
    t0 = time.monotonic()
    topics = Topics(fleet)
    base = data_topic(topics, device)
    table_topic, chunk_prefix = f"{base}/table", f"{base}/chunks/"
    pull_id = uuid.uuid4().hex[:16]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    part = out / f".capture-{pull_id}.part"
    cfg = parse_broker_url(broker) if isinstance(broker, str) else broker
    try:
        with SyncClient(cfg, timeout=max(30.0, timeout)) as c:
            c.subscribe(table_topic)
            c.subscribe(chunk_prefix + "+")
            _send(device, {"action": "pull", "pull_id": pull_id, "chunk_size": chunk_kb * 1024},
                  broker=cfg, key=key, fleet=fleet, lifetime_s=max(600.0, timeout), client=c)
            table = _receive(c, table_topic, chunk_prefix, pull_id, part, device,
                             int(max_mb * 1024 * 1024), time.monotonic() + timeout, verifier)
        index = _unpack(part, out, table)
    finally:
        part.unlink(missing_ok=True)
    sig = table.get("sig") if isinstance(table.get("sig"), dict) else None
    doc = json.loads(index.read_text())
    return PullResult(device, pull_id, str(out), str(index), len(doc["records"]),
                      int(table["bytes"]), sig.get("keyid") if sig else None,
                      verifier is not None, bool(doc.get("capturing")),
                      round(time.monotonic() - t0, 3))


def _check_table(raw: bytes, device: str, pull_id: str, limit: int) -> dict | None:
    try:
        t = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(t, dict) or t.get("pull_id") != pull_id:
        return None  # another pull's table
    size, cs, chunks = t.get("bytes"), t.get("chunk_size"), t.get("chunks")
    if t.get("device_id") != device or not isinstance(size, int) or not isinstance(cs, int) \
            or cs <= 0 or not isinstance(chunks, list) or len(chunks) != -(-size // cs):
        raise ProtocolError(f"device {device} sent a malformed capture chunk table")
    if size > limit:
        raise ProtocolError(f"device {device} offers {size} bytes of capture, over the "
                            f"{limit} byte bound: pass a larger `max_mb=` to take it",
                            field="max_mb")
    return t


def _receive(c: SyncClient, table_topic: str, chunk_prefix: str, pull_id: str, part: Path,
             device: str, limit: int, deadline: float, verifier: Any = None) -> dict:
    table: dict | None = None
    early: dict[int, bytes] = {}
    have: set[int] = set()
    with open(part, "wb") as f:
        os.chmod(part, 0o600)
        while table is None or len(have) < len(table["chunks"]):
            left = deadline - time.monotonic()
            if left <= 0:
                got = f"{len(have)} of {len(table['chunks'])} chunks" if table else "no table"
                raise EdgepackError(f"device {device} did not send its capture within the "
                                    f"timeout ({got}): is it online, and does it hold a "
                                    "capture? Pull again or pass a longer `timeout=`",
                                    field="timeout")
            msg = c.get(min(left, 0.5))
            if msg is None:
                continue
            topic, payload, _ = msg
            if topic == table_topic and table is None:
                table = _check_table(payload, device, pull_id, limit)
                if table is not None and verifier is not None:
                    verifier.verify(table, topic_device=device)  # ReportRefused: not its key
                if table is not None:
                    for i, data in early.items():
                        _write(f, table, i, data, have, device)
                    early.clear()
            elif topic.startswith(chunk_prefix):
                try:
                    i = int(topic[len(chunk_prefix):])
                except ValueError:
                    continue
                if table is not None:
                    _write(f, table, i, payload, have, device)
                elif len(early) < _EARLY_CHUNKS:
                    early[i] = payload
        f.flush()
    h = hashlib.sha256()
    with open(part, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != table["sha256"]:
        raise ProtocolError(f"device {device}'s capture does not match its table's sha256")
    return table


def _write(f: Any, table: dict, i: int, data: bytes, have: set[int], device: str) -> None:
    chunks = table["chunks"]
    if not 0 <= i < len(chunks) or i in have:
        return
    if hashlib.sha256(data).hexdigest() != chunks[i]:
        raise ProtocolError(f"capture chunk {i} from device {device} does not match its table")
    f.seek(i * table["chunk_size"])
    f.write(data)
    have.add(i)


def _unpack(part: Path, out: Path, table: dict) -> Path:
    """One npz per record and ``index.json`` (the device's index plus what the host saw)."""
    records = []
    with zipfile.ZipFile(part) as z:
        doc = json.loads(z.read("index.json"))
        for name in doc.get("records", []):
            base = Path(name).name
            if not base.endswith(".npz") or base != name:
                raise ProtocolError(f"capture record name {name!r} is not a plain file name")
            dest = out / base
            dest.write_bytes(z.read(f"records/{base}"))
            os.chmod(dest, 0o600)
            records.append({"file": base, "bytes": dest.stat().st_size})
    sig = table.get("sig") if isinstance(table.get("sig"), dict) else None
    index = out / "index.json"
    index.write_text(json.dumps({
        **{k: v for k, v in doc.items() if k != "records"}, "records": records,
        "signed_by": sig.get("keyid") if sig else None,
        "note": "captured by the device: only as honest as the device"}, indent=1,
        sort_keys=True))
    return index
