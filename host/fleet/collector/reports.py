"""Build reports of published bundles: each new bundle's retained chunks are fetched once,
checked, and its ``report.json`` stored for the bundle page (and its drift reference,
``drift.json``, for judging the devices' drift windows)."""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
import uuid
from typing import Any

from edgepack.agent.errors import EdgepackError, ProtocolError
from edgepack.agent.mqtt import BrokerConfig
from edgepack.agent.protocol import Topics
from edgepack.host.fleet.storage import Store

__all__ = ["ReportFetcher", "fetch_members", "fetch_report"]

_REPORT, _DRIFT = "report.json", "drift.json"

log = logging.getLogger("edgepack.collector")


class ReportFetcher:
    """A thread that fetches the report of every bundle it is told of, once."""

    def __init__(self, cfg: BrokerConfig, store: Store, *, max_bytes: int) -> None:
        self.cfg = cfg
        self.store = store
        self.max_bytes = max_bytes
        self._queue: queue.Queue = queue.Queue()
        self._seen: set[tuple[str, str]] = set()
        self._thread = threading.Thread(target=self._run, name="edgepack-collector-reports",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def want(self, fleet: str, table: dict) -> None:
        """Fetch the report of this bundle unless asked already (called by the writer)."""
        key = (fleet, table["bundle_id"])
        if key not in self._seen:
            self._seen.add(key)
            self._queue.put((fleet, table))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            fleet, table = item
            bid = table["bundle_id"]
            try:
                time.sleep(0.2)  # let the writer store the bundle row first
                row = self.store.bundles.get(fleet, bid)
                has_report = row is not None and (row.report is not None or row.report_error)
                if has_report and self.store.drift.reference(fleet, bid) is not None:
                    continue
                members, error = fetch_members(self.cfg, fleet, table, (_REPORT, _DRIFT),
                                               max_bytes=self.max_bytes)
                for _ in range(20):
                    if self.store.bundles.get(fleet, bid) is not None:
                        break
                    time.sleep(0.25)
                if not has_report:
                    report, why = _report(members, error)
                    self.store.bundles.set_report(fleet, bid, report, why)
                _store_reference(self.store, fleet, bid, members, error)
            except Exception as exc:  # noqa: BLE001 - a report is a nicety: never stop for it
                log.warning("cannot read the build report of bundle %s: %s", bid[:12], exc)
                self._seen.discard((fleet, bid))


def _report(members: dict[str, bytes], error: str | None) -> tuple[Any, str | None]:
    if error:
        return None, error
    if _REPORT not in members:
        return None, "the bundle has no report.json"
    try:
        return json.loads(members[_REPORT]), None
    except ValueError as exc:
        return None, f"unreadable bundle: {exc}"


def _store_reference(store: Store, fleet: str, bundle_id: str, members: dict[str, bytes],
                     error: str | None) -> None:
    """Keep the bundle's drift.json (checked), or record that it has none or why not."""
    from edgepack.host.fleet.drift import load_reference

    if error:
        store.drift.set_reference(fleet, bundle_id, None, None, error)
        return
    raw = members.get(_DRIFT)
    if raw is None:
        store.drift.set_reference(fleet, bundle_id, None, None)
        return
    try:
        ref = load_reference(raw)
    except EdgepackError as exc:
        store.drift.set_reference(fleet, bundle_id, None, None, f"unreadable drift.json: {exc}")
        return
    store.drift.set_reference(fleet, bundle_id, ref.id, raw.decode())


def fetch_report(cfg: BrokerConfig, fleet: str, table: dict, *, max_bytes: int,
                 timeout: float = 60.0) -> tuple[Any, str | None]:
    """Fetch a published bundle's retained chunks, check them, read ``report.json``.

    Returns ``(report, None)`` or ``(None, why not)``.
    """
    members, error = fetch_members(cfg, fleet, table, (_REPORT,), max_bytes=max_bytes,
                                   timeout=timeout)
    return _report(members, error)


def fetch_members(cfg: BrokerConfig, fleet: str, table: dict, names: tuple[str, ...], *,
                  max_bytes: int, timeout: float = 60.0) -> tuple[dict[str, bytes], str | None]:
    """Fetch a published bundle's retained chunks, check them, read the members ``names``
    it has (hash-checked against its manifest).

    Returns ``(members, None)`` or ``({}, why not)``.
    """
    import tempfile
    import zipfile

    from edgepack.agent.bundle import read_bundle
    from edgepack.agent.protocol import parse_chunk_table
    from edgepack.host.fleet.client import SyncClient

    try:
        t = parse_chunk_table(json.dumps(table).encode(), expected_id=table.get("bundle_id"))
    except ProtocolError as exc:
        return {}, f"malformed manifest message: {exc}"
    if t.bytes > max_bytes:
        return {}, f"bundle is {t.bytes} bytes, over the {max_bytes} byte fetch limit"
    prefix = f"{Topics(fleet).prefix}bundles/{t.bundle_id}/chunks/"
    chunks: dict[int, bytes] = {}
    with SyncClient(cfg, client_id=f"edgepack-reports-{uuid.uuid4().hex[:8]}",
                    timeout=timeout) as c:
        c.subscribe(prefix + "+")
        deadline = time.monotonic() + timeout
        while len(chunks) < len(t.chunks) and (left := deadline - time.monotonic()) > 0:
            m = c.get(min(left, 1.0))
            if m is None:
                continue
            topic, payload, _ = m
            if not topic.startswith(prefix):
                continue
            try:
                i = int(topic[len(prefix):])
            except ValueError:
                continue
            if 0 <= i < len(t.chunks) and hashlib.sha256(payload).hexdigest() == t.chunks[i]:
                chunks[i] = payload
    if len(chunks) < len(t.chunks):
        return {}, f"only {len(chunks)} of {len(t.chunks)} chunks are on the broker"
    data = b"".join(chunks[i] for i in range(len(t.chunks)))
    if hashlib.sha256(data).hexdigest() != t.bundle_id:
        return {}, "the chunks do not add up to the bundle id"
    with tempfile.NamedTemporaryFile(suffix=".edgepack") as f:
        f.write(data)
        f.flush()
        try:
            b = read_bundle(f.name, bundle_id=t.bundle_id)
            have = set(b.member_names())
            return {n: b.read_member(n) for n in names if n in have}, None
        except (EdgepackError, ValueError, zipfile.BadZipFile) as exc:
            return {}, f"unreadable bundle: {exc}"
