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

paho's network thread only timestamps each message and puts it in the :class:`Inbox`.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import ssl
import threading
import time
from collections import Counter
from typing import Any

from edgepack.agent.mqtt import BrokerConfig
from edgepack.agent.protocol import Topics
from edgepack.host.fleet.collector.inbox import Inbox
from edgepack.host.fleet.collector.options import CollectorOptions

__all__ = ["Subscriber"]

log = logging.getLogger("edgepack.collector")


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
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._force_v311 = opts.shared == "off"
        self._v5_worked = False

    def stop(self) -> None:
        """Disconnect (the broker keeps our session) and end :meth:`run`."""
        self._stop.set()
        with self._client_lock:
            client = self._client
        if client is not None:
            with contextlib.suppress(Exception):
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

    def _make_client(self, v5: bool) -> Any:
        import paho.mqtt.client as mqtt

        cfg = self.cfg
        if v5:
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                            protocol=mqtt.MQTTv5)
        else:
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                            clean_session=False, protocol=mqtt.MQTTv311)
        if cfg.username is not None:
            c.username_pw_set(cfg.username, cfg.password)
        if cfg.tls or cfg.ca or cfg.cert:
            c.tls_set(ca_certs=cfg.ca, certfile=cfg.cert, keyfile=cfg.key,
                      cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        c.max_inflight_messages_set(64)
        c.max_queued_messages_set(0)
        return c

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
            delay = min(self.opts.reconnect_max_s, self.opts.reconnect_min_s * 2 ** attempt)
            attempt += 1
            self._stop.wait(random.uniform(delay / 2, delay))

    def _session(self, v5: bool) -> str:
        """One connection from CONNECT to disconnect: ``ok``, ``failed`` or ``v5_refused``."""
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        events: queue.SimpleQueue = queue.SimpleQueue()
        inbox = self.inbox
        client = self._make_client(v5)

        def on_connect(c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
            events.put(("connack", rc, props))

        def on_disconnect(c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
            c.loop_stop()  # only sets a flag from this thread: we reconnect ourselves
            events.put(("disconnect", rc, None))

        def on_subscribe(c: Any, u: Any, mid: int, rcs: Any, props: Any) -> None:
            events.put(("suback", mid, rcs))

        queue_max = self.opts.queue_max
        dropped = self.dropped

        def on_message(c: Any, u: Any, msg: Any) -> None:
            # the bound on memory while the database is away: shed telemetry, keep the rest
            if inbox.depth >= queue_max and msg.topic.endswith("/telemetry"):
                dropped["queue_full"] += 1
                return
            inbox.put((time.time(), msg.topic, msg.payload, msg.retain))

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        try:
            if v5:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = int(self.opts.session_expiry_s)
                props.ReceiveMaximum = 65535
                client.connect(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive,
                               clean_start=False, properties=props)
            else:
                client.connect(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive)
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.warning("cannot reach the broker at %s: %s", self.cfg.url, exc)
            return "failed"
        with self._client_lock:
            self._client = client
        client.loop_start()
        try:
            # a broker that does not speak MQTT 5 may just hang up, or say nothing at all
            probe = v5 and self.opts.shared == "auto" and not self._v5_worked
            kind, rc, props = self._next_event(
                events, min(self.cfg.connect_timeout, 3.0) if probe else self.cfg.connect_timeout)
            if kind != "connack" or getattr(rc, "is_failure", False):
                if v5 and (kind != "connack" or int(getattr(rc, "value", 0)) in (1, 0x84)):
                    return "v5_refused"  # dropped before CONNACK / unsupported protocol version
                log.warning("broker at %s refused the collector: %s", self.cfg.url, rc)
                return "failed"
            shared = v5 and self.opts.shared != "off"
            if shared and props is not None and \
                    getattr(props, "SharedSubscriptionAvailable", 1) == 0:
                shared = False
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
                    kind, rc, _ = events.get(timeout=0.2)
                except queue.Empty:
                    continue
                if kind == "disconnect":
                    if not self._stop.is_set():
                        log.warning("collector lost the broker at %s (%s); reconnecting",
                                    self.cfg.url, rc)
                    break
            return "ok"
        finally:
            self.connected = False
            with self._client_lock:
                self._client = None
            with contextlib.suppress(Exception):
                client.disconnect()
            client.loop_stop()

    def _next_event(self, events: queue.SimpleQueue, timeout: float) -> tuple[str, Any, Any]:
        try:
            return events.get(timeout=timeout)
        except queue.Empty:
            return ("timeout", None, None)

    def _subscribe(self, client: Any, events: queue.SimpleQueue, shared: bool) -> bool:
        subs = self._subscriptions(shared)
        rc, mid = client.subscribe([(f, 1) for f, _ in subs])
        if rc != 0:
            return False
        deadline = time.monotonic() + self.cfg.connect_timeout
        while (left := deadline - time.monotonic()) > 0:
            kind, got, rcs = self._next_event(events, left)
            if kind == "disconnect":
                return False
            if kind == "suback" and got == mid:
                codes = [int(getattr(r, "value", r)) for r in rcs]
                return all(c < 0x80 for c in codes)
        return False

    def _unsubscribe_shared(self, client: Any) -> None:
        shared = [f for f, s in self._subscriptions(True) if s]
        with contextlib.suppress(Exception):
            client.unsubscribe(shared)
