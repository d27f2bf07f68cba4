"""Outbox (bounded, ordered, persistent) and telemetry figures: pure logic, no broker."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from edgepack.agent.outbox import Outbox
from edgepack.agent.telemetry import (
    LatencyStats,
    SystemSampler,
    decode_throttled,
    percentile,
    read_temperature,
)


def test_outbox_keeps_order_and_survives_reopen(tmp_path):
    box = Outbox(tmp_path / "o.sqlite", max_bytes=1 << 20)
    seqs = [box.put("t/a", {"n": i}) for i in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    rows = box.peek(3)
    assert [json.loads(r.payload)["n"] for r in rows] == [0, 1, 2]
    assert [json.loads(r.payload)["seq"] for r in rows] == [1, 2, 3]
    box.ack(rows[0].id)
    box.close()
    box = Outbox(tmp_path / "o.sqlite", max_bytes=1 << 20)
    assert len(box) == 4
    assert [json.loads(r.payload)["n"] for r in box.peek(10)] == [1, 2, 3, 4]
    assert [json.loads(r.payload)["n"] for r in box.peek(10, after_id=rows[2].id)] == [3, 4]
    assert box.put("t/a", {"n": 5}) == 6  # seq keeps counting across restarts
    box.close()


def test_outbox_drops_oldest_and_counts(tmp_path):
    box = Outbox(tmp_path / "o.sqlite", max_bytes=4096)
    for i in range(100):
        box.put("t/x", {"n": i, "pad": "x" * 100})
    assert box.size_bytes <= 4096
    kept = [json.loads(r.payload)["n"] for r in box.peek(1000)]
    assert kept == list(range(100 - len(kept), 100))  # the newest survive, in order
    assert box.dropped == 100 - len(kept) > 0
    box.close()
    assert Outbox(tmp_path / "o.sqlite", max_bytes=4096).dropped == 100 - len(kept)


def test_outbox_raw_bytes_and_qos(tmp_path):
    box = Outbox(tmp_path / "o.sqlite")
    box.put("t/raw", b"\x00\x01", qos=0, retain=True)
    (row,) = box.peek(1)
    assert row.payload == b"\x00\x01" and row.qos == 0 and row.retain


@pytest.mark.parametrize("q", [0, 50, 90, 95, 99, 100])
def test_percentile_matches_numpy(q):
    xs = sorted(np.random.default_rng(0).exponential(3.0, 257).tolist())
    assert percentile(xs, q) == pytest.approx(np.percentile(xs, q))
    assert percentile([], q) == 0.0


def test_latency_stats_windows_and_threads():
    s = LatencyStats(max_samples=100)

    def work():
        for i in range(1000):
            s.record(float(i % 10))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s.record_error()
    w = s.drain()
    assert w.inferences == 4000 and w.errors == 1 and w.max == 9.0
    assert w.mean == pytest.approx(4.5) and 0 <= w.p50 <= 9 and w.p99 <= 9
    assert set(w.latency()) == {"p50", "p95", "p99", "max", "mean"}
    w2 = s.drain()
    assert w2.inferences == 0 and w2.p95 == 0.0
    assert s.total_inferences == 4000


def test_throttled_flags():
    f = decode_throttled(0x50005)
    assert f["under_voltage"] and f["throttled"] and not f["freq_capped"]
    assert f["under_voltage_occurred"] and f["throttled_occurred"] and f["raw"] == "0x50005"


def test_temperature_prefers_the_cpu_zone(tmp_path):
    for name, kind, milli in (("thermal_zone0", "gpu-thermal", 70000),
                              ("thermal_zone1", "cpu-thermal", 51234)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "type").write_text(kind + "\n")
        (tmp_path / name / "temp").write_text(f"{milli}\n")
    assert read_temperature(str(tmp_path)) == pytest.approx(51.234)
    assert read_temperature(str(tmp_path / "none")) is None


def test_system_sample_has_every_field(tmp_path):
    sample = SystemSampler(tmp_path).sample()
    for key in ("rss_mb", "peak_rss_mb", "cpu_percent", "temperature_c", "throttled",
                "disk_free_mb", "uptime_s", "mem_available_mb"):
        assert key in sample
    assert sample["peak_rss_mb"] >= sample["rss_mb"] * 0.5 > 0 and sample["disk_free_mb"] > 0
