"""The fleet database on SQLite and on a real PostgreSQL: what the collector writes, how it reads."""

from __future__ import annotations

import sqlite3
import time

import pytest

from edgepack.host.fleet.storage import Batch, StorageError, open_store

BID = "ab" * 32


def _state(online: bool = True, **kw) -> dict:
    return {"online": online, "board": "rpi4", "target": "rpi4", "agent_version": "0.1.0",
            "groups": ["g1", "g2"], "slot": "A", "phase": "idle",
            "active": {"bundle_id": BID, "name": "kws", "version": "1.2.0", "slot": "A"},
            "ts": time.time(), **kw}


def _telemetry(ts: float, p95: float = 12.0) -> dict:
    return {"ts": ts, "window_s": 30, "inferences": 100, "errors": 1,
            "latency_ms": {"p50": 8.0, "p95": p95, "p99": 20.0, "max": 31.0},
            "rss_mb": 80.5, "peak_rss_mb": 90.0, "cpu_percent": 12.5, "temperature_c": 51.0,
            "disk_free_mb": 1000.0, "uptime_s": 77.0, "bundle_id": BID, "outbox_dropped": 0}


def test_state_lwt_telemetry_events_desired(db_url):
    now = time.time()
    with open_store(db_url) as s:
        b = Batch()
        b.states.append(("f", "dev1", now, _state()))
        b.telemetry += [("f", "dev1", now, _telemetry(now - 2)),
                        ("f", "dev1", now, _telemetry(now - 1, p95=14.0)),
                        ("f", "dev1", now, _telemetry(now - 1, p95=14.0))]  # outbox resend
        b.events.append(("f", "dev1", now, {"kind": "installed", "deployment_id": "dep-1",
                                            "bundle_id": BID, "detail": "ok", "ts": now - 1}))
        b.desired += [("f", "device", "dev1", now, {"deployment_id": "dep-1", "bundle_id": BID,
                                                    "name": "kws", "version": "1.2.0",
                                                    "ts": now}),
                      ("f", "group", "g1", now, {"deployment_id": "dep-0", "bundle_id": BID,
                                                 "name": "kws", "version": "1.1.0", "ts": now})]
        b.bundles.append(("f", now, {"bundle_id": BID, "bytes": 10, "chunk_size": 10,
                                     "chunks": ["cd" * 32], "manifest": {
                                         "name": "kws", "version": "1.2.0", "target": "rpi4",
                                         "budgets": {"p95_ms": 50}},
                                     "table_sig": {"key_id": "k1"}, "ts": now}))
        s.write_batch(b)
        d = s.devices.get("f", "dev1")
        assert d.online is True and d.board == "rpi4" and d.groups == ("g1", "g2")
        assert (d.bundle_id, d.bundle_name, d.bundle_version) == (BID, "kws", "1.2.0")
        assert d.telemetry["p95"] == 14.0  # the newest report
        assert len(s.telemetry.series("f", "dev1")) == 2  # the duplicate was stored once
        assert s.telemetry.series("f", "dev1")[0].p95 == 12.0  # oldest first
        ev = s.events.list("f", deployment_id="dep-1")
        assert [e.kind for e in ev] == ["installed"] and ev[0].body["detail"] == "ok"
        assert {(x.scope, x.name) for x in s.desired.list("f")} == {("device", "dev1"),
                                                                    ("group", "g1")}
        assert s.bundles.get("f", BID).signed_by == "k1"
        s.bundles.set_report("f", BID, {"speedup": 2.5})
        assert s.bundles.get("f", BID).report == {"speedup": 2.5}

        # the LWT says only {"online": false}: presence changes, the rest is kept
        s.write_batch(Batch(states=[("f", "dev1", now + 5, {"online": False,
                                                            "reason": "connection lost"})],
                            desired=[("f", "group", "g1", now + 5, None)]))
        d = s.devices.get("f", "dev1")
        assert d.online is False and d.offline_reason == "connection lost"
        assert d.board == "rpi4" and d.bundle_version == "1.2.0"
        assert d.online_changed == pytest.approx(now + 5) and d.last_seen >= now + 5
        assert [x.scope for x in s.desired.list("f")] == ["device"]
        # back online
        s.write_batch(Batch(states=[("f", "dev1", now + 9, _state())]))
        assert s.devices.get("f", "dev1").online is True
        assert s.fleets() == ["f"]
        stats = s.telemetry.stats("f", ["dev1"], since=0, bundle_id=BID)
        assert stats["dev1"].n == 2 and stats["dev1"].p95 == 14.0


def test_retention_and_leases(db_url):
    now = time.time()
    with open_store(db_url) as s:
        old, new = now - 10 * 86400, now - 60
        s.write_batch(Batch(telemetry=[("f", "d", old, _telemetry(old)),
                                       ("f", "d", new, _telemetry(new))],
                            events=[("f", "d", old, {"kind": "error", "ts": old}),
                                    ("f", "d", new, {"kind": "installed", "ts": new})]))
        assert s.prune(telemetry_before=now - 7 * 86400, events_before=now - 7 * 86400) == \
            {"telemetry": 1, "events": 1}
        assert s.telemetry.count("f") == 1 and len(s.events.list("f")) == 1
        assert s.meta.acquire_lease("rollouts", "a", 30)
        assert s.meta.acquire_lease("rollouts", "a", 30)  # renewal
        assert not s.meta.acquire_lease("rollouts", "b", 30)
        s.meta.release_lease("rollouts", "a")
        assert s.meta.acquire_lease("rollouts", "b", 30)


def test_open_errors(tmp_path):
    with pytest.raises(StorageError, match="does not exist"):
        open_store(f"sqlite:///{tmp_path}/missing/dir/fleet.db")
    with pytest.raises(StorageError, match="neither"):
        open_store("mysql://x@y/z")
    with pytest.raises(StorageError, match="in-memory"):
        open_store("sqlite://")
    # a database written by a newer edgepack is refused, not misread
    url = f"sqlite:///{tmp_path}/fleet.db"
    open_store(url).close()
    conn = sqlite3.connect(tmp_path / "fleet.db")
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(StorageError, match="newer"):
        open_store(url)
    # a bare path works too, and the file is in WAL mode
    s = open_store(str(tmp_path / "other.db"))
    with s.db.connection() as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    s.close()
