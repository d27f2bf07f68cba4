"""Damaged files on the device: a corrupted or missing state file, a half-written or damaged
slot, a damaged outbox database, damaged download records. Every time the agent starts,
reports what it found, and serves a known-good model (one that passes the health gate)."""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from agent_helpers import Watcher, agent_config, publish_desired
from reliability_helpers import CrashableAgent, serves, wait_for

from edgepack.host.fleet.publish import publish_bundle

pytestmark = pytest.mark.broker


def _garbage(p: Path) -> None:
    p.write_bytes(b"\x00\xffnot json at all\x9c" * 7)


def _truncate(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _inconsistent(p: Path) -> None:
    s = json.loads(p.read_text())
    s["active"] = "C"
    p.write_text(json.dumps(s))


def _wrong_types(p: Path) -> None:
    s = json.loads(p.read_text())
    s["slots"] = ["A", "B"]
    s["failed"] = "none"
    p.write_text(json.dumps(s))


def _active_slot(data: Path) -> Path:
    s = json.loads((data / "state.json").read_text())
    return data / "slots" / s["active"]


# (name, damage, expected event reason, who must serve: "new" | "old")
CASES: list[tuple[str, Callable[[Path], None], str, str]] = [
    ("state.json missing", lambda d: (d / "state.json").unlink(), "state_recovered", "new"),
    ("state.json garbage", lambda d: _garbage(d / "state.json"), "state_recovered", "new"),
    ("state.json truncated", lambda d: _truncate(d / "state.json"), "state_recovered", "new"),
    ("state.json inconsistent", lambda d: _inconsistent(d / "state.json"), "state_recovered",
     "new"),
    ("state.json wrong types", lambda d: _wrong_types(d / "state.json"), "state_recovered",
     "new"),
    ("active slot: model truncated", lambda d: _truncate(_active_slot(d) / "model.onnx"),
     "load_failed", "old"),
    ("active slot: manifest gone", lambda d: (_active_slot(d) / "manifest.json").unlink(),
     "load_failed", "old"),
    ("outbox database garbage", lambda d: _garbage(d / "outbox.sqlite"), "outbox_recovered",
     "new"),
    ("outbox database truncated", lambda d: _truncate(d / "outbox.sqlite"), "outbox_recovered",
     "new"),
]


def _half_written(d: Path) -> None:
    """A staging directory left by a kill mid-unpack, and an inactive slot missing files."""
    s = json.loads((d / "state.json").read_text())
    inactive = "B" if s["active"] == "A" else "A"
    tmp = d / "slots" / f".{inactive}.new"
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "model.onnx").write_bytes(b"\x08\x01half")
    (d / "slots" / inactive / "golden.npz").unlink(missing_ok=True)


@pytest.fixture
def installed_device(tmp_path, mosquitto, fleet, rel_bundles, rel_keys):
    """A device that ran v1 then v2 (v2 active, v1 previous), stopped; its data dir saved."""
    url = mosquitto.url
    cfg = agent_config(tmp_path / "dev1", url, fleet, pub=rel_keys.pub,
                       health={"latency_runs": 5, "warmup_runs": 1})
    agent = CrashableAgent(cfg)
    ids = {}
    with Watcher(url, fleet) as w:
        agent.start()
        for v in ("1.0.0", "2.0.0"):
            ids[v] = publish_bundle(rel_bundles.get(v), url, key_path=rel_keys.key, fleet=fleet,
                                    chunk_size=4096)["bundle_id"]
            dep = publish_desired(url, fleet, ids[v], version=v)
            w.wait_event("installed", dep, timeout=30)
    agent.stop()
    data = cfg.parent / "data"
    golden = tmp_path / "golden-data"
    shutil.copytree(data, golden, ignore=shutil.ignore_patterns("agent.sock", "agent.lock"))
    return cfg, data, golden, ids


def test_damaged_files_recover_to_a_known_good_model(installed_device, mosquitto, fleet,
                                                     scenario):
    rec = scenario("damaged state / slot / outbox")
    cfg, data, golden, ids = installed_device
    failures = []
    cases = [*CASES, ("half-written slot + staging leftovers", _half_written, "", "new")]
    for name, damage, reason, who in cases:
        shutil.rmtree(data)
        shutil.copytree(golden, data)
        damage(data)
        want = ids["2.0.0"] if who == "new" else ids["1.0.0"]
        agent = CrashableAgent(cfg)
        ok, why = True, ""
        with Watcher(mosquitto.url, fleet) as w:
            t0 = time.monotonic()
            agent.start()
            try:
                wait_for(lambda want=want: serves(data, want), 30, f"{name}: model served")
                recovery = time.monotonic() - t0
                if reason:
                    w.wait(lambda reason=reason: [e for e in w.events if e.get("reason") == reason],
                           15, f"{name}: an event with reason {reason}")
                w.wait(lambda: len(w.telemetry) >= 1, 10, "telemetry")
                if not agent.alive:
                    ok, why = False, f"{name}: the agent exited"
            except TimeoutError as exc:
                ok, why, recovery = False, str(exc)[:300], None
            if ok and name.startswith("outbox"):
                # the new numbering stays above what the lost database handed out
                seqs = [m["seq"] for m in w.telemetry + w.events]
                with sqlite3.connect(golden / "outbox.sqlite") as db:
                    old = db.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0]
                if min(seqs) <= old:
                    ok, why = False, f"{name}: seq {min(seqs)} reused (old outbox reached {old})"
        agent.stop()
        rec.run(ok, recovery_s=recovery, note=None if ok else why)
        if not ok:
            failures.append(why)
    assert not failures, failures


def test_damaged_download_records(tmp_path, mosquitto, fleet, rel_bundles, rel_keys, scenario):
    """A kill mid-download, then its records damaged (the chunk table, the progress bitmap, the
    partial file's content): the download fetches again what it cannot trust and completes,
    instead of failing every retry the same way or rejecting a good bundle."""
    rec = scenario("damaged download records")
    url = mosquitto.url
    bid = publish_bundle(rel_bundles.get("1.0.0"), url, key_path=rel_keys.key, fleet=fleet,
                         chunk_size=1024)["bundle_id"]
    failures = []
    for what in ("table", "progress", "part"):
        cfg = agent_config(tmp_path / what, url, fleet, pub=rel_keys.pub,
                           transfer={"window": 2, "retry_s": 0.3})
        data = cfg.parent / "data"
        agent = CrashableAgent(cfg)
        with Watcher(url, fleet) as w:
            agent.start(crash_at="downloading", skip=6)
            dep = publish_desired(url, fleet, bid)
            rc = agent.wait_exit(30)
            dl = data / "downloads"
            target = {"table": dl / f"{bid}.table.json", "progress": dl / f"{bid}.progress.json",
                      "part": dl / f"{bid}.part"}[what]
            _garbage(target) if what != "part" else target.write_bytes(
                b"\x00" * target.stat().st_size)  # chunks "on disk" are zeros: a bad disk
            t0 = time.monotonic()
            agent.start()
            ok, why = rc == -9, f"{what}: the agent did not die mid-download ({rc})"
            try:
                w.wait_event("installed", dep, timeout=30)
                started = [e for e in w.events if e["kind"] == "download_started"]
                if what == "part" and started[-1].get("resumed_chunks"):
                    # chunks recorded on disk are checked against the signed table at resume
                    ok, why = False, "part: zeroed chunks were trusted at resume"
                wait_for(lambda data=data: serves(data, bid), 10, "served")
            except TimeoutError as exc:
                ok, why = False, f"{what}: {str(exc)[:300]}"
            rec.run(ok, recovery_s=time.monotonic() - t0, note=None if ok else why)
            if not ok:
                failures.append(why)
        agent.stop()
    assert not failures, failures
