"""Transfer and installer state machines, driven by hand (a fake broker, a fake clock)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgepack.agent.bundle import read_bundle
from edgepack.agent.errors import TransferError
from edgepack.agent.installer import Installer
from edgepack.agent.protocol import Topics, encode
from edgepack.agent.signing import load_public_keys
from edgepack.agent.states import Phase
from edgepack.agent.transfer import Rejected, Transfer
from edgepack.host.fleet.publish import manifest_message


class FakeBroker:
    """Retained messages; a subscription delivers the matching ones (like MQTT)."""

    def __init__(self) -> None:
        self.retained: dict[str, bytes] = {}
        self.subscribes: list[list[str]] = []
        self.transfer: Transfer | None = None
        self.deliver = True

    def subscribe(self, topics: list[str], qos: int = 1) -> bool:
        self.subscribes.append(list(topics))
        if self.deliver:
            for t in topics:
                if t in self.retained:
                    self.transfer.on_message(t, self.retained[t])
        return True

    def unsubscribe(self, topics: list[str]) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _publish(broker: FakeBroker, bundle: Path, keys, fleet="f", chunk_size=1024, sign=True):
    from edgepack.host.keys import sign_bytes

    b = read_bundle(bundle)
    msg, chunks = manifest_message(b, chunk_size=chunk_size, sign=(
        lambda d: sign_bytes(d, keys.private)) if sign else None)
    t = Topics(fleet)
    broker.retained[t.bundle_manifest(b.bundle_id)] = encode(msg)
    for i, c in enumerate(chunks):
        broker.retained[t.bundle_chunk(b.bundle_id, i)] = c
    return b.bundle_id, len(chunks)


def _transfer(tmp_path, broker, bid, keys, clock=None, **kw) -> Transfer:
    tr = Transfer(bid, topics=Topics("f"), directory=tmp_path / "dl", link=broker,
                  keys=load_public_keys([keys.pub]), window=kw.pop("window", 3),
                  chunk_timeout_s=5, manifest_timeout_s=5, min_free_mb=0,
                  clock=clock or Clock(), **kw)
    broker.transfer = tr
    return tr


def test_transfer_fetches_window_by_window(tmp_path, bundles, keys):
    broker = FakeBroker()
    bid, n = _publish(broker, bundles.get("1.0.0"), keys)
    tr = _transfer(tmp_path, broker, bid, keys)
    tr.start(connected=True)
    assert tr.state == "done", tr.error
    assert read_bundle(tr.result_path).bundle_id == bid
    assert tr.stats.written == n == tr.stats.received
    chunk_subs = broker.subscribes[1:]
    assert all(len(s) <= 3 for s in chunk_subs) and len(chunk_subs) == -(-n // 3)
    assert not tr.part_path.exists() and not tr.progress_path.exists()


def test_transfer_resumes_from_disk_losing_at_most_the_window(tmp_path, bundles, keys):
    broker = FakeBroker()
    bid, n = _publish(broker, bundles.get("1.0.0"), keys)
    # deliver two windows and a half, then "crash"
    delivered = []
    orig = FakeBroker.subscribe

    def partial(self, topics, qos=1):
        self.subscribes.append(list(topics))
        for t in topics:
            if t in self.retained and len(delivered) < 7:
                delivered.append(t)
                self.transfer.on_message(t, self.retained[t])
        return True

    FakeBroker.subscribe = partial
    try:
        tr = _transfer(tmp_path, broker, bid, keys)
        tr.start(connected=True)
    finally:
        FakeBroker.subscribe = orig
    assert tr.state == "chunks" and tr.stats.chunks_done == 6
    tr._close()  # the process dies here: nothing else is written
    broker2 = FakeBroker()
    broker2.retained = broker.retained
    tr2 = _transfer(tmp_path, broker2, bid, keys)
    tr2.start(connected=True)
    assert tr2.state == "done" and tr2.stats.resumed_from == 6
    assert tr2.stats.written == n - 6  # only chunk 6 (the window in flight) came twice
    assert broker2.subscribes[0] != [Topics("f").bundle_manifest(bid)]  # table read from disk


def test_tampered_chunk_is_rejected(tmp_path, bundles, keys):
    broker = FakeBroker()
    bid, n = _publish(broker, bundles.get("1.0.0"), keys)
    broker.retained[Topics("f").bundle_chunk(bid, 2)] = b"x" * 1024
    tr = _transfer(tmp_path, broker, bid, keys)
    tr.start(connected=True)
    assert tr.state == "failed" and isinstance(tr.error, Rejected)
    assert tr.error.reason == "tampered" and "chunk 2" in str(tr.error)
    assert not tr.part_path.exists() and not tr.result_path.exists()


@pytest.mark.parametrize("case", ["unsigned", "other_key", "too_large", "precheck"])
def test_table_checks_refuse_before_any_chunk(tmp_path, bundles, keys, case):
    from edgepack.host.keys import sign_bytes

    broker = FakeBroker()
    bid, n = _publish(broker, bundles.get("1.0.0"), keys, sign=case != "unsigned")
    if case == "other_key":
        t = Topics("f").bundle_manifest(bid)
        msg = json.loads(broker.retained[t])
        from edgepack.agent.protocol import chunk_table_payload
        from edgepack.agent.signing import canonical_json

        table = chunk_table_payload(bid, msg["bytes"], msg["chunk_size"], msg["chunks"])
        msg["table_sig"] = sign_bytes(canonical_json(table), keys.other_private)
        broker.retained[t] = encode(msg)
    kw = {}
    if case == "too_large":
        kw["max_bundle_mb"] = 0.001

    def precheck(table):
        raise Rejected("wrong target", reason="target")

    if case == "precheck":
        kw["precheck"] = precheck
    tr = _transfer(tmp_path, broker, bid, keys, **kw)
    tr.start(connected=True)
    assert tr.state == "failed" and isinstance(tr.error, Rejected), tr.error
    assert len(broker.subscribes) == 1  # the manifest only: not one chunk was requested


def test_timeouts_re_request_then_fail(tmp_path, bundles, keys):
    broker = FakeBroker()
    bid, n = _publish(broker, bundles.get("1.0.0"), keys)
    clock = Clock()
    tr = _transfer(tmp_path, broker, bid, keys, clock=clock)
    chunk0 = Topics("f").bundle_chunk(bid, 0)
    saved = broker.retained.pop(chunk0)
    tr.start(connected=True)
    assert tr.state == "chunks"
    tr.on_disconnected()  # offline time does not count
    clock.now += 100
    tr.tick()
    assert tr.state == "chunks"
    tr.on_connected()
    for _ in range(2):
        clock.now += 6
        tr.tick()
        assert tr.state == "chunks"
    clock.now += 6
    tr.tick()
    assert tr.state == "failed" and isinstance(tr.error, TransferError)
    assert "chunks 0" in str(tr.error)
    assert tr.stats.timeouts == 3 and tr.stats.interruptions == 1
    broker.retained[chunk0] = saved  # a later attempt (new Transfer) resumes
    tr2 = _transfer(tmp_path, broker, bid, keys)
    tr2.start(connected=True)
    assert tr2.state == "done" and tr2.stats.resumed_from == 2


def test_manifest_timeout(tmp_path, keys):
    clock = Clock()
    broker = FakeBroker()
    tr = _transfer(tmp_path, broker, "a" * 64, keys, clock=clock)
    tr.start(connected=True)
    clock.now += 6
    tr.tick()
    assert tr.state == "failed" and "edgepack publish" in str(tr.error)


# ---------------------------------------------------------------- installer
def _commit(inst: Installer, slot: str, **kw):
    """staged → health_checking → committed (the health check itself is not the point)."""
    inst.advance(Phase.HEALTH_CHECKING)
    return inst.commit(slot, **kw)


def test_install_commit_rollback_and_state_file(tmp_path, bundles):
    inst = Installer(tmp_path / "data")
    b1, b2 = read_bundle(bundles.get("1.0.0")), read_bundle(bundles.get("2.0.0"))
    assert inst.active is None and inst.inactive_slot() == "A"
    s1 = inst.stage(b1, "dep1")
    assert inst.phase == "staged" and inst.active is None
    _commit(inst, s1.slot)
    assert inst.active.bundle_id == b1.bundle_id and inst.active.slot == "A"
    s2 = inst.stage(b2, "dep2")
    assert s2.slot == "B" and inst.active.slot == "A"
    _commit(inst, "B")
    assert inst.active.version == "2.0.0" and inst.previous.version == "1.0.0"
    on_disk = json.loads((tmp_path / "data" / "state.json").read_text())
    assert on_disk["active"] == "B" and on_disk["previous"] == "A"
    assert not list((tmp_path / "data").glob(".*tmp"))
    back = inst.rollback("crash_loop", "test")
    assert back.version == "1.0.0" and inst.previous is None
    assert inst.is_failed("dep2", b2.bundle_id)["kind"] == "crash_loop"
    assert inst.slot_intact("A")
    # a fresh Installer reads the same state
    assert Installer(tmp_path / "data").active.bundle_id == b1.bundle_id


def test_boot_counts_crashes_and_rolls_back(tmp_path, bundles):
    inst = Installer(tmp_path / "data")
    b1, b2 = read_bundle(bundles.get("1.0.0")), read_bundle(bundles.get("2.0.0"))
    _commit(inst, inst.stage(b1, "dep1").slot, now=100.0)
    _commit(inst, inst.stage(b2, "dep2").slot, now=200.0)
    r = inst.boot(crash_window_s=60, max_crashes=2, now=210.0)
    assert not r.unclean and r.rolled_back is None  # first start after install: clean
    r = Installer(tmp_path / "data").boot(crash_window_s=60, max_crashes=2, now=220.0)
    assert r.unclean and r.crashes == 1 and r.rolled_back is None
    inst = Installer(tmp_path / "data")
    r = inst.boot(crash_window_s=60, max_crashes=2, now=230.0)
    assert r.rolled_back.bundle_id == b2.bundle_id and inst.active.bundle_id == b1.bundle_id
    inst.clean_exit()
    r = Installer(tmp_path / "data").boot(crash_window_s=60, max_crashes=2, now=240.0)
    assert not r.unclean


def test_crash_outside_the_window_is_not_counted(tmp_path, bundles):
    inst = Installer(tmp_path / "data")
    _commit(inst, inst.stage(read_bundle(bundles.get("1.0.0")), "d").slot, now=100.0)
    inst.boot(crash_window_s=60, max_crashes=1, now=101.0)
    r = Installer(tmp_path / "data").boot(crash_window_s=60, max_crashes=1, now=500.0)
    assert r.unclean and r.crashes == 0 and r.rolled_back is None


def test_interrupted_install_is_reset_and_old_slot_stays(tmp_path, bundles):
    inst = Installer(tmp_path / "data")
    b1, b2 = read_bundle(bundles.get("1.0.0")), read_bundle(bundles.get("2.0.0"))
    _commit(inst, inst.stage(b1, "dep1").slot)
    inst.stage(b2, "dep2")
    inst.advance(Phase.HEALTH_CHECKING)
    r = Installer(tmp_path / "data").boot(crash_window_s=1, max_crashes=3)
    assert r.interrupted.phase == "health_checking" and r.interrupted.candidate.bundle_id == \
        b2.bundle_id
    inst = Installer(tmp_path / "data")
    assert inst.phase == "idle" and inst.active.bundle_id == b1.bundle_id
