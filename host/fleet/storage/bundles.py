"""The ``bundles`` table: manifests of published bundles (from the retained manifest messages)
and their build reports once fetched."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from edgepack.host.fleet.storage.db import Cursor, Database, dumps, integer, loads, num, text

__all__ = ["BundleRecord", "Bundles"]


@dataclass(frozen=True)
class BundleRecord:
    """A published bundle. ``report`` and ``report_error`` are loaded by :meth:`Bundles.get`
    only (reports can be large)."""

    fleet: str
    bundle_id: str
    name: str | None = None
    version: str | None = None
    target: str | None = None
    bytes: int | None = None
    chunk_size: int | None = None
    chunks: int | None = None
    signed_by: str | None = None
    manifest: dict[str, Any] = field(default_factory=dict)
    report: Any = None
    report_error: str | None = None
    published: float | None = None
    first_seen: float | None = None

    @classmethod
    def from_row(cls, r: dict[str, Any]) -> BundleRecord:
        return cls(**{**r, "manifest": loads(r.get("manifest")) or {},
                      "report": loads(r.get("report"))})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Bundles:
    """Reads and writes of the ``bundles`` table."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def write(self, cur: Cursor, fleet: str, received: float, table: dict) -> None:
        """Store a retained manifest message (the chunk table with the bundle's manifest)."""
        manifest = table.get("manifest") if isinstance(table.get("manifest"), dict) else {}
        sig = table.get("table_sig") if isinstance(table.get("table_sig"), dict) else None
        chunks = table.get("chunks")
        cur.execute(
            "INSERT INTO bundles (fleet, bundle_id, name, version, target, bytes, chunk_size, "
            "chunks, signed_by, manifest, published, first_seen) VALUES "
            "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (fleet, bundle_id) DO UPDATE SET "
            "name = excluded.name, version = excluded.version, target = excluded.target, "
            "bytes = excluded.bytes, chunk_size = excluded.chunk_size, chunks = excluded.chunks, "
            "signed_by = excluded.signed_by, manifest = excluded.manifest, "
            "published = excluded.published",
            (fleet, text(table.get("bundle_id"), 64), text(manifest.get("name")),
             text(manifest.get("version")), text(manifest.get("target")),
             integer(table.get("bytes")), integer(table.get("chunk_size")),
             len(chunks) if isinstance(chunks, list) else None,
             text(sig.get("key_id")) if sig else None, dumps(manifest),
             num(table.get("ts")), received))

    def add(self, fleet: str, table: dict, report: Any = None) -> None:
        """Record a bundle the host published itself (its manifest message and build report)."""
        with self._db.transaction() as cur:
            self.write(cur, fleet, time.time(), table)
        if report is not None:
            self.set_report(fleet, table["bundle_id"], report)

    def set_report(self, fleet: str, bundle_id: str, report: Any,
                   error: str | None = None) -> None:
        """Store a bundle's build report (``report.json``), or why it could not be read."""
        self._db.execute("UPDATE bundles SET report = ?, report_error = ? WHERE fleet = ? AND "
                         "bundle_id = ?", (dumps(report) if report is not None else None, error,
                                           fleet, bundle_id))

    def list(self, fleet: str) -> list[BundleRecord]:
        """Bundles of ``fleet``, newest first (without their reports)."""
        return [BundleRecord.from_row(r) for r in self._db.query(
            "SELECT fleet, bundle_id, name, version, target, bytes, chunk_size, chunks, "
            "signed_by, published, first_seen, manifest FROM bundles WHERE fleet = ? "
            "ORDER BY first_seen DESC", (fleet,))]

    def get(self, fleet: str, bundle_id: str) -> BundleRecord | None:
        row = self._db.query_one("SELECT * FROM bundles WHERE fleet = ? AND bundle_id = ?",
                                 (fleet, bundle_id))
        return BundleRecord.from_row(row) if row else None
