"""Peak RSS of a real agent process when one oversized message (64 MB by default) is published
on its desired-state topic, on a real Mosquitto (``message_size_limit 0``: the broker takes it):

* ``3.1.1`` — the agent forced to MQTT 3.1.1 (no Maximum Packet Size): the message is read
  into memory before any size check;
* ``auto`` — the default: MQTT 5 with ``max_packet_kb`` (1088 KiB), so the broker drops the
  message for this client.

    .venv/bin/python bench/agent_packet_limit.py [--mb 64]

Prints one JSON line per protocol: VmHWM (peak RSS, MB) before and after, and the growth.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT / "tests", ROOT / "tests" / "agent"):  # brokers, agent_helpers
    sys.path.insert(0, str(_p))

from agent_helpers import AgentProcess, Watcher, agent_config  # noqa: E402
from brokers import start_mosquitto  # noqa: E402

from edgepack.agent.mqtt import MqttClient, parse_broker_url  # noqa: E402
from edgepack.agent.protocol import Topics  # noqa: E402


def _hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmHWM")


def measure(protocol: str, mb: int, broker_url: str, work: Path) -> dict:
    fleet = f"b{uuid.uuid4().hex[:10]}"
    cfg = agent_config(work / protocol, broker_url, fleet, broker={"protocol": protocol},
                       telemetry={"interval_s": 0.5})
    agent = AgentProcess(cfg).start()
    try:
        with Watcher(broker_url, fleet) as w:
            w.wait(lambda: len(w.telemetry) >= 3, 60, "telemetry")
            before = _hwm_mb(agent.proc.pid)
            sender = MqttClient(parse_broker_url(broker_url), f"{fleet}-big")
            sender.connect()
            sender.loop_start()
            sender.wait_connected()
            topic = Topics(fleet).desired("dev1")
            sender.publish(topic, b'{"junk": "' + b"a" * (mb * 1_000_000) + b'"}', qos=1,
                           wait=120)
            sender.publish(topic, b'{"after": 1}', qos=1, wait=30)
            sender.close()
            n = len(w.telemetry)
            w.wait(lambda: len(w.telemetry) >= n + 6, 120, "telemetry after the message")
            after = _hwm_mb(agent.proc.pid)
        return {"protocol": protocol, "message_mb": mb, "peak_rss_before_mb": round(before, 1),
                "peak_rss_after_mb": round(after, 1), "growth_mb": round(after - before, 1),
                "refused": w.telemetry[-1].get("control_refused")}
    finally:
        agent.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=int, default=64)
    args = p.parse_args(argv)
    broker = start_mosquitto()
    try:
        with tempfile.TemporaryDirectory(prefix="edgepack-bench-") as tmp:
            for protocol in ("3.1.1", "auto"):
                print(json.dumps(measure(protocol, args.mb, broker.url, Path(tmp))), flush=True)
    finally:
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
