"""Fetch a published bundle from the broker, one window of retained chunks at a time.

A :class:`Transfer` is a state machine driven by the agent loop: it never blocks and never
touches the network itself. The loop feeds it messages (:meth:`Transfer.on_message`), connection
changes and clock ticks; it asks the loop to subscribe/unsubscribe through a :class:`Link`
(whose calls raise :class:`BrokerError` when they cannot be sent) and hands verified chunks to a
:class:`~edgepack.agent.chunkstore.ChunkStore`: on disk for the agent (the file names below),
in memory for the fleet simulator.

Algorithm (``docs/protocol.md`` § Transfer):

1. subscribe ``bundles/{id}/manifest``; the retained message must arrive within
   ``manifest_timeout_s``. Check the chunk table's signature (``table_sig``) against the trusted
   keys, the size limit and free disk space, and give the caller a chance to refuse early
   (``precheck``: target, runtime, downgrade), before a single chunk is fetched;
2. repeat: subscribe the next ``window`` missing chunks, write each arriving chunk whose sha256
   matches the signed table at ``index * chunk_size`` in ``{id}.part``; when the window is
   complete, fsync the file, record the bitmap in ``{id}.progress.json`` (atomically) and
   unsubscribe. A window that is not complete within ``chunk_timeout_s`` (while connected) is
   requested again, twice, then the transfer fails;
3. after the last window, sha256 of the whole file must equal the bundle id.

A chunk that does not match the signed table rejects the bundle at once: retained data is wrong
on the broker, and asking again would return the same bytes. After an agent restart the bitmap
says what is on disk, so at most the window in flight is fetched twice; after a broker outage
the agent still knows which chunks of the window arrived and asks only for the others.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from edgepack.agent.chunkstore import ChunkStore, DiskChunks, chunk_length
from edgepack.agent.crashpoint import crash_point
from edgepack.agent.errors import (
    BrokerError,
    BundleError,
    EdgepackError,
    ProtocolError,
    SignatureError,
    TransferError,
)
from edgepack.agent.protocol import ChunkTable, Topics, parse_chunk_table
from edgepack.agent.signing import canonical_json, verify_detached

__all__ = ["Link", "Rejected", "Transfer", "TransferStats"]

_MB = 1024 * 1024


class Rejected(EdgepackError):
    """The bundle must not be installed (bad signature, tampered chunk, too large…): final."""

    def __init__(self, message: str, *, reason: str, **context: object) -> None:
        super().__init__(message, **context)
        self.reason = reason


class Link(Protocol):
    """What a transfer needs from the agent's MQTT connection."""

    def subscribe(self, topics: list[str], qos: int = 1) -> object:
        """Send SUBSCRIBE; raise :class:`BrokerError` when it cannot be sent."""

    def unsubscribe(self, topics: list[str]) -> object: ...


@dataclass
class TransferStats:
    """Counters of one transfer (across agent restarts where noted)."""

    chunks_total: int = 0
    chunks_done: int = 0
    resumed_from: int = 0  # chunks already on disk when this process started the transfer
    received: int = 0  # chunk messages handled by this process, duplicates included
    written: int = 0  # chunks written by this process
    duplicates: int = 0
    requests: int = 0  # window subscriptions sent (re-requests included)
    timeouts: int = 0
    interruptions: int = 0  # disconnects during the transfer
    bytes: int = 0
    chunk_size: int = 0
    window: int = 0
    started: float = field(default_factory=time.monotonic)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "started"}
        d["seconds"] = round(time.monotonic() - self.started, 3)
        return d


class Transfer:
    """Download one bundle into ``store`` (default: ``DiskChunks`` in ``directory``, the
    result ``directory/{bundle_id}.edgepack``)."""

    def __init__(self, bundle_id: str, *, topics: Topics, link: Link,
                 directory: Path | None = None, store: ChunkStore | None = None,
                 keys: Mapping[str, Any], allow_unsigned: bool = False, window: int = 8,
                 chunk_timeout_s: float = 30.0, manifest_timeout_s: float = 30.0,
                 max_bundle_mb: float = 1024.0, min_free_mb: float = 64.0,
                 precheck: Callable[[ChunkTable], None] | None = None,
                 on_progress: Callable[[Transfer], None] | None = None,
                 on_started: Callable[[Transfer], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.bundle_id = bundle_id
        self.topics = topics
        if store is None:
            if directory is None:
                raise TypeError("Transfer needs `directory=` or `store=`")
            store = DiskChunks(bundle_id, Path(directory), min_free_mb=min_free_mb)
        self.store = store
        self.link = link
        self.keys = keys
        self.allow_unsigned = allow_unsigned
        self.window = window
        self.chunk_timeout_s = chunk_timeout_s
        self.manifest_timeout_s = manifest_timeout_s
        self.max_bundle_mb = max_bundle_mb
        self.min_free_mb = min_free_mb
        self.precheck = precheck
        self.on_progress = on_progress
        self.on_started = on_started
        self.clock = clock
        self.state = "new"  # new | manifest | chunks | done | failed
        self.error: EdgepackError | None = None
        self.table: ChunkTable | None = None
        self.stats = TransferStats(window=window)
        self._connected = False
        self._deadline: float | None = None
        self._have = bytearray()
        self._inflight: list[int] = []
        self._attempts = 0
        self._chunk_prefix = f"{topics.prefix}bundles/{bundle_id}/chunks/"
        self._manifest_topic = topics.bundle_manifest(bundle_id)

    # ---- files (of a DiskChunks store)
    @property
    def part_path(self) -> Path:
        return self.store.part_path  # type: ignore[attr-defined]

    @property
    def progress_path(self) -> Path:
        return self.store.progress_path  # type: ignore[attr-defined]

    @property
    def result_path(self) -> Path:
        return self.store.result_path  # type: ignore[attr-defined]

    @property
    def done(self) -> bool:
        return self.state in ("done", "failed")

    def cleanup(self) -> None:
        """Remove every file of this transfer (after install, rejection, or cancel)."""
        self.store.cleanup()

    # ---- driving
    def start(self, connected: bool) -> None:
        """Begin (or resume from disk)."""
        self._connected = connected
        try:
            self._start()
        except OSError as exc:  # disk full or failing: worth a retry later, not a crash
            self._fail(self._disk_error(exc))

    def _start(self) -> None:
        if self.store.finished():
            self.state = "done"
            return
        saved = self.store.saved_table()
        if saved is not None:
            try:
                parse_chunk_table(saved, expected_id=self.bundle_id)
            except ProtocolError:
                # a damaged record (torn write, failing disk) would fail every retry the same
                # way: forget the partial download and fetch the manifest again
                self.store.discard()
                saved = None
        if saved is not None:
            try:
                self._accept_table(saved, from_disk=True)
            except EdgepackError as exc:
                self._fail(exc)
            return
        self.state = "manifest"
        self._subscribe([self._manifest_topic])
        self._deadline = self.clock() + self.manifest_timeout_s

    def on_connected(self) -> None:
        """The broker is back (maybe restarted): ask again for what is still missing."""
        self._connected = True
        if self.state == "manifest":
            self._subscribe([self._manifest_topic])
            self._deadline = self.clock() + self.manifest_timeout_s
        elif self.state == "chunks":
            missing = [i for i in self._inflight if not self._has(i)]
            if missing:
                self._subscribe([self._chunk_topic(i) for i in missing])
            self._deadline = self.clock() + self.chunk_timeout_s

    def on_disconnected(self) -> None:
        if self._connected and self.state in ("manifest", "chunks"):
            self.stats.interruptions += 1
        self._connected = False
        self._deadline = None  # a silent broker is not the bundle's fault: wait for reconnect

    def cancel(self) -> None:
        """Stop (a newer desired state arrived, or shutdown); files stay for a later resume."""
        self._unsubscribe_current()
        self.store.keep(self._have)
        self.store.close()
        if not self.done:
            self.state = "failed"
            self.error = TransferError("transfer cancelled", bundle_id=self.bundle_id)

    def wants(self, topic: str) -> bool:
        return topic == self._manifest_topic or topic.startswith(self._chunk_prefix)

    def on_message(self, topic: str, payload: bytes) -> None:
        if self.done:
            return
        try:
            if topic == self._manifest_topic:
                if self.state == "manifest":
                    self._on_manifest(payload)
            elif topic.startswith(self._chunk_prefix) and self.state == "chunks":
                self._on_chunk(topic[len(self._chunk_prefix):], payload)
        except EdgepackError as exc:
            self._fail(exc)
        except OSError as exc:  # disk full, I/O error: worth a retry later, not a crash
            self._fail(self._disk_error(exc))

    def _disk_error(self, exc: OSError) -> TransferError:
        return TransferError(f"cannot write bundle {self.bundle_id[:12]} to {self.store.where}: "
                             f"{exc}. "
                             "The download resumes from what is on disk once the disk has room.",
                             bundle_id=self.bundle_id)

    def tick(self) -> None:
        """Check timeouts (call at least every second)."""
        if self.done or self._deadline is None or not self._connected:
            return
        if self.clock() < self._deadline:
            return
        self.stats.timeouts += 1
        if self.state == "manifest":
            self._fail(TransferError(
                f"bundle {self.bundle_id[:12]} is not published on the broker (no retained "
                f"{self._manifest_topic} within {self.manifest_timeout_s:g}s). Publish it with "
                "'edgepack publish', then deploy again.", bundle_id=self.bundle_id,
                topic=self._manifest_topic))
            return
        self._attempts += 1
        missing = [i for i in self._inflight if not self._has(i)]
        if self._attempts > 2:
            self._fail(TransferError(
                f"chunks {_ranges(missing)} of bundle {self.bundle_id[:12]} did not arrive within "
                f"{self.chunk_timeout_s:g}s (asked 3 times). Is the bundle still published? "
                "Re-publish it with 'edgepack publish'.", bundle_id=self.bundle_id))
            return
        self._subscribe([self._chunk_topic(i) for i in missing])  # re-SUBSCRIBE resends retained
        self._deadline = self.clock() + self.chunk_timeout_s

    # ---- manifest
    def _on_manifest(self, payload: bytes) -> None:
        if not payload:
            raise TransferError(f"bundle {self.bundle_id[:12]} was unpublished (its retained "
                                "manifest was cleared)", bundle_id=self.bundle_id)
        try:
            table = parse_chunk_table(payload, expected_id=self.bundle_id)
        except ProtocolError as exc:
            raise Rejected(f"the published manifest message is malformed: {exc}",
                           reason="malformed", bundle_id=self.bundle_id) from None
        self._unsubscribe([self._manifest_topic])
        self._accept_table(payload, table=table)

    def _accept_table(self, raw: bytes, *, table: ChunkTable | None = None,
                      from_disk: bool = False) -> None:
        table = table or parse_chunk_table(raw, expected_id=self.bundle_id)
        self._check_table(table)
        if self.precheck is not None:
            self.precheck(table)
        self.table = table
        n = len(table.chunks)
        self.stats.chunks_total = n
        self.stats.bytes = table.bytes
        self.stats.chunk_size = table.chunk_size
        if from_disk:
            self._have = self.store.resume(table)
        else:
            self.store.begin(raw, table)
            self._have = bytearray((n + 7) // 8)
        done = sum(1 for i in range(n) if self._has(i))
        self.stats.chunks_done = self.stats.resumed_from = done
        self.state = "chunks"
        if self.on_started is not None:
            self.on_started(self)
        self._next_window()

    def _check_table(self, table: ChunkTable) -> None:
        if table.table_sig is not None and (self.keys or not self.allow_unsigned):
            try:
                verify_detached(canonical_json(table.signed_part()), table.table_sig, self.keys,
                                what="chunk table")
            except SignatureError as exc:
                raise Rejected(str(exc), reason="signature", bundle_id=self.bundle_id) from None
        elif table.table_sig is None and not self.allow_unsigned:
            raise Rejected(f"bundle {self.bundle_id[:12]} was published without a chunk table "
                           "signature; publish it with --key, or set allow_unsigned = true "
                           "(development only)", reason="signature", bundle_id=self.bundle_id)
        if table.bytes > self.max_bundle_mb * _MB:
            raise Rejected(f"bundle {self.bundle_id[:12]} is {table.bytes / _MB:.1f} MB, over this "
                           f"device's limit of {self.max_bundle_mb:g} MB (transfer.max_bundle_mb)",
                           reason="too_large", bundle_id=self.bundle_id)

    # ---- chunks
    def _chunk_topic(self, i: int) -> str:
        return f"{self._chunk_prefix}{i}"

    def _has(self, i: int) -> bool:
        return bool(self._have[i >> 3] >> (i & 7) & 1)

    def _set(self, i: int) -> None:
        self._have[i >> 3] |= 1 << (i & 7)

    def _next_window(self) -> None:
        assert self.table is not None
        n = len(self.table.chunks)
        self._inflight = []
        for i in range(n):
            if not self._has(i):
                self._inflight.append(i)
                if len(self._inflight) >= self.window:
                    break
        if not self._inflight:
            self._complete()
            return
        self._attempts = 0
        self._subscribe([self._chunk_topic(i) for i in self._inflight])
        self._deadline = self.clock() + self.chunk_timeout_s

    def _on_chunk(self, suffix: str, payload: bytes) -> None:
        assert self.table is not None
        try:
            i = int(suffix)
        except ValueError:
            return
        n = len(self.table.chunks)
        if not 0 <= i < n:
            return
        self.stats.received += 1
        if not payload:
            return  # a retained chunk being cleared: the timeout decides
        if self._has(i):
            self.stats.duplicates += 1
            return
        size = chunk_length(self.table, i)
        if len(payload) != size or hashlib.sha256(payload).hexdigest() != self.table.chunks[i]:
            raise Rejected(
                f"chunk {i} of bundle {self.bundle_id[:12]} does not match the signed chunk "
                "table: the data on the broker was altered or corrupted. Nothing was installed; "
                "re-publish the bundle.", reason="tampered", bundle_id=self.bundle_id)
        self.store.write(i, i * self.table.chunk_size, payload)
        self._set(i)
        self.stats.written += 1
        self.stats.chunks_done += 1
        crash_point("downloading")
        if all(self._has(j) for j in self._inflight):
            self.store.checkpoint(self._have)
            self._unsubscribe([self._chunk_topic(j) for j in self._inflight])
            if self.on_progress is not None:
                self.on_progress(self)
            self._next_window()

    def _complete(self) -> None:
        assert self.table is not None
        digest = self.store.complete(self.table)
        if digest != self.bundle_id:
            raise Rejected(f"the downloaded file hashes to {digest[:12]}, not to the bundle id "
                           f"{self.bundle_id[:12]}: the signed chunk table does not describe this "
                           "bundle. Re-publish it.", reason="tampered", bundle_id=self.bundle_id)
        self._deadline = None
        self.state = "done"

    # ---- plumbing
    def _subscribe(self, topics: list[str]) -> None:
        if not (topics and self._connected):
            return
        try:
            self.link.subscribe(topics)
        except BrokerError:  # the connection dropped: on_connected() asks again
            return
        self.stats.requests += 1

    def _unsubscribe(self, topics: list[str]) -> None:
        if topics and self._connected:
            with contextlib.suppress(BrokerError):  # a dropped connection forgets them anyway
                self.link.unsubscribe(topics)

    def _unsubscribe_current(self) -> None:
        if self.state == "manifest":
            self._unsubscribe([self._manifest_topic])
        elif self.state == "chunks":
            self._unsubscribe([self._chunk_topic(i) for i in self._inflight])

    def _close(self) -> None:
        self.store.close()

    def _fail(self, exc: EdgepackError) -> None:
        self._unsubscribe_current()
        if isinstance(exc, (Rejected, BundleError)):
            self.store.discard()
        else:
            self.store.keep(self._have)  # keep what arrived of the window for the next attempt
        self.store.close()
        self.state = "failed"
        self.error = exc
        self._deadline = None


def _ranges(indices: list[int]) -> str:
    if not indices:
        return "-"
    out, start, prev = [], indices[0], indices[0]
    for i in indices[1:] + [None]:  # type: ignore[list-item]
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(out)
