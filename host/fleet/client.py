"""A blocking MQTT client for host commands (publish, deploy, status, rollouts) and tests.

Built on :class:`edgepack.agent.mqtt.MqttClient`: paho's network thread only hands messages and
acknowledgements over; every wait has a timeout and raises :class:`BrokerError` when it expires.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from typing import Any

from edgepack.agent.errors import BrokerError
from edgepack.agent.mqtt import BrokerConfig, MqttClient, parse_broker_url

__all__ = ["SyncClient"]


class SyncClient:
    """A blocking MQTT client. Use as a context manager (connects on enter, closes on exit)."""

    def __init__(self, cfg: BrokerConfig | str, client_id: str | None = None,
                 timeout: float = 30.0) -> None:
        self.cfg = parse_broker_url(cfg) if isinstance(cfg, str) else cfg
        self.timeout = timeout
        self._messages: queue.Queue = queue.Queue()
        self._acks: dict[int, threading.Event] = {}
        self._lock = threading.Lock()
        self._client = MqttClient(self.cfg, client_id or f"edgepack-cli-{uuid.uuid4().hex[:8]}",
                                  handler=self._hand_over)

    # paho's network thread: hand over only
    def _hand_over(self, event: tuple) -> None:
        kind = event[0]
        if kind == "message":
            self._messages.put(event[1:])
        elif kind in ("puback", "suback"):
            with self._lock:
                ev = self._acks.setdefault(event[1], threading.Event())
            ev.set()

    def __enter__(self) -> SyncClient:
        self.connect()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def connect(self) -> None:
        self._client.connect()
        self._client.loop_start()
        try:
            self._client.wait_connected()
        except BrokerError:
            self.close()
            raise

    def close(self) -> None:
        self._client.close()

    def _wait(self, mid: int, what: str, timeout: float | None = None) -> None:
        with self._lock:
            ev = self._acks.setdefault(mid, threading.Event())
        if not ev.wait(self.timeout if timeout is None else timeout):
            raise BrokerError(f"broker at {self.cfg.url} did not acknowledge {what} within "
                              f"{self.timeout:g}s")
        with self._lock:
            self._acks.pop(mid, None)

    def publish(self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False,
                wait: bool = True) -> int:
        """Publish; with ``wait`` block until the broker acknowledged it (QoS 1/2)."""
        mid = self._client.publish(topic, payload, qos=qos, retain=retain)
        if wait and qos > 0:
            self._wait(mid, f"the publish to {topic}")
        return mid

    def wait_published(self, mids: list[int]) -> None:
        for mid in mids:
            self._wait(mid, "a publish")

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self._wait(self._client.subscribe(topic, qos), f"the subscription to {topic}")

    def unsubscribe(self, topic: str) -> None:
        self._wait(self._client.unsubscribe(topic), f"unsubscribing {topic}")

    def get(self, timeout: float) -> tuple[str, bytes, bool] | None:
        """Next message ``(topic, payload, retained)`` or None after ``timeout`` seconds."""
        try:
            return self._messages.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return None

    def retained(self, topic_filter: str, settle: float = 0.5) -> dict[str, bytes]:
        """Every retained message under ``topic_filter``: waits until none arrived for ``settle``
        (live messages on the same topics are skipped, and do not keep it waiting)."""
        self.subscribe(topic_filter)
        out: dict[str, bytes] = {}
        deadline = time.monotonic() + self.timeout
        quiet_until = time.monotonic() + settle  # pushed back by each retained message
        while (now := time.monotonic()) < min(deadline, quiet_until):
            m = self.get(min(deadline, quiet_until) - now)
            if m is None:
                break
            topic, payload, was_retained = m
            if not was_retained:  # live traffic does not keep the wait going
                continue
            quiet_until = time.monotonic() + settle
            if payload:
                out[topic] = payload
            else:
                out.pop(topic, None)
        self.unsubscribe(topic_filter)
        return out
