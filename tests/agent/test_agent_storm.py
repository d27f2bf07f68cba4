"""A storm of junk on every topic a device listens to, on a real Mosquitto against a real agent
process: the agent keeps running and reporting, writes a bounded number of events, evicts no
genuine queued telemetry (a 2 MiB outbox) and keeps its memory bounded."""

from __future__ import annotations

import pytest
from agent_helpers import AgentProcess, Watcher, agent_config

from edgepack.agent.mqtt import MqttClient, parse_broker_url
from edgepack.agent.protocol import Topics

pytestmark = pytest.mark.broker

JUNK = 20_000


def test_junk_storm_is_counted_not_stored(tmp_path, mosquitto, fleet, keys):
    import psutil

    cfg = agent_config(tmp_path / "dev", mosquitto.url, fleet, pub=keys.pub, groups=["g1"],
                       telemetry={"interval_s": 0.5, "outbox_max_bytes": 2 * 1024 * 1024})
    agent = AgentProcess(cfg).start()
    t = Topics(fleet)
    topics = [t.desired("dev1"), t.group_desired("g1"), t.downgrade("dev1"), t.freshness,
              t.jobs("dev1")]
    try:
        with Watcher(mosquitto.url, fleet) as w:
            w.wait(lambda: len(w.telemetry) >= 2, 30, "telemetry before the storm")
            rss_before = psutil.Process(agent.proc.pid).memory_info().rss
            events_before = len(w.events)
            results: list[tuple] = []  # the device's answers to (junk) profile jobs
            sender = MqttClient(parse_broker_url(mosquitto.url), f"{fleet}-junk",
                                handler=lambda e: results.append(e) if e[0] == "message"
                                else None)
            sender.connect()
            sender.loop_start()
            sender.wait_connected()
            sender.subscribe(t.results("dev1"))
            for i in range(JUNK):
                # JSON, so the test's watcher (on devices/dev1/#) can read it too
                body = b"[%d]" % i if i % 3 == 0 else b'{"kind": "desired", "n": %d}' % i
                sender.publish(topics[i % len(topics)], body, qos=0)
            sender.publish(topics[0], b'"last"', qos=1, wait=30)
            # the agent gets through the storm and reports it in telemetry
            seen = w.wait(lambda: next(
                (x for x in reversed(w.telemetry) if sum((x.get("control_refused") or {})
                                                         .values()) + x["inbox"]["replaced"]
                 + x["inbox"]["dropped"] >= 100), None), 60, "the storm counted in telemetry")
            n = len(w.telemetry)
            w.wait(lambda: len(w.telemetry) >= n + 3, 30, "telemetry after the storm")
            peak = psutil.Process(agent.proc.pid).memory_info().rss
            after = w.telemetry[-1]
            assert agent.alive
            # bounded events: one per topic and reason a minute, not one per junk message
            storm_events = w.events[events_before:]
            assert len(storm_events) <= 40, [e["kind"] for e in storm_events]
            # junk jobs (not v2 control messages: refused as unsigned) are counted, not answered
            junk_jobs = sum(n for k, n in after["control_refused"].items() if k.startswith("job_"))
            assert junk_jobs > 100, after["control_refused"]
            assert len(results) <= 10, len(results)  # not one refusal per junk job
            sender.close()
            # no genuine queued telemetry or event was evicted from the 2 MiB outbox
            assert after["outbox_dropped"] == 0
            # the burst on keep-latest topics collapsed before verification
            assert seen["inbox"]["replaced"] > 0
            assert (peak - rss_before) < 64 * 1024 * 1024, (rss_before, peak)
    finally:
        assert agent.stop() == 0, agent.log_text()[-3000:]
