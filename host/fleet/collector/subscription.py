"""The collector's broker side: one persistent MQTT session with its subscriptions, kept
alive across broker restarts.

Subscriptions, per fleet (all QoS 1, one persistent session with a stable client id):

* ``devices/+/telemetry`` and ``devices/+/events`` — through an MQTT 5 *shared subscription*
  (``$share/<group>/…``) when the broker offers one, so several collectors split a fleet's
  traffic; a plain subscription otherwise (MQTT 3.1.1 brokers such as the embedded one, or
  ``shared="off"``);
* ``devices/+/state``, ``devices/+/desired``, ``groups/+/desired`` and ``bundles/+/manifest`` —
  always plain: these are retained, and a broker never sends retained messages to a shared
  subscription. Every collector keeps the full presence picture; state writes are idempotent.

The connection is an :class:`~edgepack.agent.mqtt.MqttClient`; its network thread only
timestamps each message and puts it in the :class:`Inbox` (or sheds it, see :meth:`_hand_over`).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable

from edgepack.agent.errors import BrokerError
from edgepack.agent.mqtt import BrokerConfig, MqttClient, MqttError, backoff_delay
from edgepack.agent.protocol import Topics
from edgepack.host.fleet.collector.inbox import Inbox
from edgepack.host.fleet.collector.options import CollectorOptions

__all__ = ["Subscriber", "MAXIMUM_PACKET_SIZE"]

log = logging.getLogger("edgepack.collector")

#: unacknowledged QoS 1 deliveries the collector accepts at once (MQTT 5 Receive Maximum)
_RECEIVE_MAXIMUM = 65535
#: MQTT 5 Maximum Packet Size: every message the collector reads is at most 1 MiB (protocol.md);
#: the broker drops bigger ones before they reach this process's memory
MAXIMUM_PACKET_SIZE = 1088 * 1024


class Subscriber:
    """Keeps the collector subscribed to its fleets; :meth:`run` in a thread, :meth:`stop`."""

    def __init__(self, cfg: BrokerConfig, client_id: str, opts: CollectorOptions,
                 inbox: Inbox, dropped: Counter) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self.opts = opts
        self.topics = {f: Topics(f) for f in opts.fleets}
        self.inbox = inbox
        self.dropped = dropped
        self.connects = 0
        self.connected = False
        self.protocol: str | None = None
        self.shared_active = False
        self._stop = threading.Event()
        self._client: MqttClient | None = None
        self._client_lock = threading.Lock()
        self._force_v311 = opts.shared == "off"
        self._v5_worked = False

    def stop(self) -> None:
        """Disconnect (the broker keeps our session) and end :meth:`run`."""
        self._stop.set()
        with self._client_lock:
            client = self._client
        if client is not None:
            with contextlib.suppress(BrokerError, OSError):
                client.disconnect()

    def _subscriptions(self, shared: bool) -> list[tuple[str, bool]]:
        """``(filter, is_shared)`` for every fleet."""
        subs = []
        for t in self.topics.values():
            for leaf in ("telemetry", "events"):
                f = t.all_devices(leaf)
                subs.append((f"$share/{self.opts.share_group}/{f}", True) if shared
                            else (f, False))
            subs += [(t.all_devices("state"), False), (t.all_devices("desired"), False),
                     (f"{t.prefix}groups/+/desired", False),
                     (f"{t.prefix}bundles/+/manifest", False)]
        return subs

    def run(self) -> None:
        """Connect, subscribe, reconnect with backoff; until :meth:`stop`."""
        attempt = 0
        while not self._stop.is_set():
            v5 = not self._force_v311
            outcome = self._session(v5)
            if self._stop.is_set():
                break
            if outcome == "ok":
                attempt = 0
            elif outcome == "v5_refused" and self.opts.shared == "auto":
                log.info("broker at %s refused MQTT 5: using MQTT 3.1.1 and plain "
                         "subscriptions", self.cfg.url)
                self._force_v311 = True
                continue
            self._stop.wait(backoff_delay(attempt, self.opts.reconnect_min_s,
                                          self.opts.reconnect_max_s))
            attempt += 1

    def _hand_over(self, events: queue.SimpleQueue) -> Callable[[tuple], None]:
        """The client's handler (network thread): messages to the inbox, the rest to ``events``."""
        inbox, dropped, queue_max = self.inbox, self.dropped, self.opts.queue_max

        def hand_over(event: tuple) -> None:
            if event[0] != "message":
                events.put(event)
                return
            _, topic, payload, retain = event
            # the bound on memory while the database is away: shed telemetry, keep the rest
            if inbox.depth >= queue_max and topic.endswith("/telemetry"):
                dropped["queue_full"] += 1
                return
            inbox.put((time.time(), topic, payload, retain))

        return hand_over

    def _session(self, v5: bool) -> str:
        """One connection from CONNECT to disconnect: ``ok``, ``failed`` or ``v5_refused``."""
        events: queue.SimpleQueue = queue.SimpleQueue()
        client = MqttClient(self.cfg, self.client_id, handler=self._hand_over(events), mqtt5=v5,
                            clean_session=False, session_expiry_s=self.opts.session_expiry_s,
                            receive_maximum=_RECEIVE_MAXIMUM,
                            maximum_packet_size=MAXIMUM_PACKET_SIZE if v5 else None,
                            reconnect_on_failure=False)
        try:
            client.connect()
        except MqttError as exc:
            log.warning("%s", exc)
            return "failed"
        with self._client_lock:
            self._client = client
        try:
            client.loop_start()
            # a broker that does not speak MQTT 5 may just hang up, or say nothing at all
            probe = v5 and self.opts.shared == "auto" and not self._v5_worked
            try:
                client.wait_connected(min(self.cfg.connect_timeout, 3.0) if probe
                                      else self.cfg.connect_timeout)
            except MqttError as exc:
                if v5 and _v5_unsupported(exc, events):
                    return "v5_refused"
                log.warning("the collector could not connect: %s", exc)
                return "failed"
            shared = v5 and self.opts.shared != "off" and client.shared_subscriptions
            self.protocol = "5" if v5 else "3.1.1"
            self._v5_worked = self._v5_worked or v5
            if not self._subscribe(client, events, shared):
                if not shared:
                    return "failed"
                log.info("broker at %s refused shared subscriptions: subscribing plainly",
                         self.cfg.url)
                self._unsubscribe_shared(client)
                if not self._subscribe(client, events, False):
                    return "failed"
                shared = False
            self.shared_active = shared
            self.connected = True
            self.connects += 1
            log.info("collector connected to %s (MQTT %s%s) for fleet(s) %s", self.cfg.url,
                     self.protocol, ", shared subscription" if shared else "",
                     ", ".join(self.opts.fleets))
            while not self._stop.is_set():
                try:
                    event = events.get(timeout=0.2)
                except queue.Empty:
                    continue
                if event[0] == "disconnected":
                    if not self._stop.is_set():
                        log.warning("collector lost the broker at %s (%s); reconnecting",
                                    self.cfg.url, event[1])
                    break
            return "ok"
        finally:
            self.connected = False
            with self._client_lock:
                self._client = None
            client.close()

    def _subscribe(self, client: MqttClient, events: queue.SimpleQueue, shared: bool) -> bool:
        """Subscribe to every filter; True once the broker granted them all."""
        try:
            mid = client.subscribe([f for f, _ in self._subscriptions(shared)])
        except BrokerError:
            return False
        deadline = time.monotonic() + self.cfg.connect_timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                event = events.get(timeout=left)
            except queue.Empty:
                break
            if event[0] == "disconnected":
                return False
            if event[0] == "suback" and event[1] == mid:
                return not any(code.is_failure for code in event[2])
        return False

    def _unsubscribe_shared(self, client: MqttClient) -> None:
        shared = [f for f, s in self._subscriptions(True) if s]
        with contextlib.suppress(BrokerError):
            client.unsubscribe(shared)


def _v5_unsupported(exc: MqttError, events: queue.SimpleQueue) -> bool:
    """Whether a failed MQTT 5 CONNECT means the broker does not speak MQTT 5: it hung up or
    stayed silent before CONNACK, or its CONNACK said "unsupported protocol version"."""
    answered = False
    while True:
        try:
            answered = answered or events.get_nowait()[0] == "refused"
        except queue.Empty:
            break
    return not answered or int(getattr(exc.rc, "value", 0)) in (1, 0x84)
