"""A broker outage: telemetry that fits in the outbox is all delivered after the reconnect, in
order; beyond the bound the oldest messages are dropped and the drop counter says exactly how
many.

The issue asks for a 5-minute outage; CI runs 30 s (``EDGEPACK_RELIABILITY_OUTAGE_S``, e.g. 300
for the full one). Two devices live through the same outage: one with room for everything, one
whose outbox (32 KiB) holds only the last few seconds.
"""

from __future__ import annotations

import os
import time

import pytest
from agent_helpers import agent_config
from reliability_helpers import CrashableAgent, Recorder

pytestmark = pytest.mark.broker
OUTAGE_S = float(os.environ.get("EDGEPACK_RELIABILITY_OUTAGE_S", "30"))
INTERVAL_S = 0.1
SMALL_OUTBOX = 32 * 1024


@pytest.mark.slow
def test_broker_outage_outbox_bound(tmp_path, own_mosquitto, fleet, rel_keys, scenario):
    broker = own_mosquitto
    label = f"{OUTAGE_S:g} s" if OUTAGE_S < 120 else f"{OUTAGE_S / 60:g} min"
    rec_in = scenario(f"broker outage {label}, within outbox bound")
    rec_over = scenario(f"broker outage {label}, beyond outbox bound")
    devices = {"dev-roomy": 8 * 1024**2, "dev-small": SMALL_OUTBOX}
    agents = {d: CrashableAgent(agent_config(
        tmp_path / d, broker.url, fleet, device_id=d, pub=rel_keys.pub,
        telemetry={"interval_s": INTERVAL_S, "outbox_max_bytes": size})).start()
        for d, size in devices.items()}
    recs = {d: Recorder(broker.url, fleet, d) for d in devices}
    try:
        for r in recs.values():
            r.__enter__()
        for r in recs.values():
            r.wait(lambda r=r: len(r.telemetry) >= 5, 20, "telemetry")
        time.sleep(1.2)  # autosave_interval 1: the recorders' sessions are on disk
        broker.stop()
        t_down = time.time()
        time.sleep(OUTAGE_S)
        broker.start()
        t_up = time.time()
        results = {}
        for d, r in recs.items():
            # a message created once the backlog was flushed: everything before it has arrived,
            # and its drop counter is final (a message reports the drops before its own)
            last = r.wait(lambda r=r: next((m for m in r.telemetry if m["ts"] > t_up
                                            and m["outbox_pending"] <= 2), None), 60,
                          "telemetry after the outage")
            gaps = r.gaps(upto=last["seq"])
            arrived = [r.arrival[m["seq"]] for m in r.telemetry if t_down < m["ts"] < t_up]
            results[d] = (r, last, gaps, (max(arrived) - t_up) if arrived else None)

        r, last, gaps, recovery = results["dev-roomy"]
        during = [m for m in r.telemetry if t_down + 0.5 < m["ts"] < t_up - 0.5]
        ok = not gaps and r.in_order() and last["outbox_dropped"] == 0 \
            and len(during) >= OUTAGE_S / INTERVAL_S * 0.8
        rec_in.run(ok, lost=len(gaps), recovery_s=recovery,
                   note=f"{len(during)} messages from the outage delivered, "
                   f"{r.duplicates} duplicates dropped")
        assert ok, (len(gaps), r.in_order(), last["outbox_dropped"], len(during))

        r, last, gaps, recovery = results["dev-small"]
        dropped = last["outbox_dropped"]
        contiguous = not gaps or gaps == list(range(gaps[0], gaps[-1] + 1))
        ok = dropped > 0 and len(gaps) == dropped and contiguous and r.in_order()
        rec_over.run(ok, lost=len(gaps) - dropped, dropped=dropped, recovery_s=recovery,
                     note=f"{dropped} oldest messages dropped and counted (outbox "
                     f"{SMALL_OUTBOX // 1024} KiB), {len(gaps)} missing")
        assert ok, (dropped, len(gaps), contiguous, r.in_order())
    finally:
        for r in recs.values():
            r.__exit__(None, None, None)
        for a in agents.values():
            a.stop()
