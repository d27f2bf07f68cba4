"""Broker connections: URL parsing, TLS/credentials, and the one MQTT client wrapper.

:class:`MqttClient` owns one paho client (``CallbackAPIVersion.VERSION2``, MQTT 5 or 3.1.1,
TCP_NODELAY, TLS and credentials from :class:`BrokerConfig`, an optional LWT). Its paho
callbacks only hand events over to a ``handler`` (a ``queue.put``, usually); every paho call
checks its return code and raises at once::

    BrokerError                  (edgepack.agent.errors)
    └── MqttError                a paho call failed; ``rc`` is paho's code, ``op`` the call
        ├── NotConnected         there is no connection to send on (``MQTT_ERR_NO_CONN``)
        └── ConnectionRefused    the broker refused CONNECT, or closed before accepting it

Events handed to ``handler`` (tuples)::

    ("connected", session_present)      ("refused", reason)        ("disconnected", reason)
    ("message", topic, payload, retain) ("puback", mid)            ("suback", mid, codes)

``codes``: the broker's reason code per topic filter of a SUBSCRIBE (``code.is_failure`` when
a filter was refused, e.g. a shared subscription); empty for UNSUBSCRIBE.

:class:`Connection` keeps the agent connected: a connector thread builds a fresh client per
attempt (a new *generation*: every event carries it, so late events of an old connection are
told apart), reconnects with exponential backoff and jitter, and hands events to the agent's
inbox. It speaks MQTT 5 with a Maximum Packet Size (the broker drops bigger messages before they
reach the device) and a session expiry, and falls back to MQTT 3.1.1 for a broker that refuses
5 (then only the broker's own ``message_size_limit`` bounds what arrives). The blocking client of host commands is ``edgepack.host.fleet.client.SyncClient``.
"""

from __future__ import annotations

import contextlib
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from edgepack.agent.errors import BrokerError

__all__ = ["BrokerConfig", "parse_broker_url", "make_client", "no_delay", "backoff_delay",
           "Will", "MqttError", "NotConnected", "ConnectionRefused", "SocketHooks",
           "MqttClient", "Connection", "unsupported_protocol"]

#: topic, payload, qos, retain
Will = tuple[str, bytes, int, bool]
#: CONNACK codes of a broker that does not speak the requested protocol version (3.1.1's 1,
#: MQTT 5's 0x84)
_UNSUPPORTED_PROTOCOL = (1, 0x84)


def unsupported_protocol(rc: Any) -> bool:
    """Whether a CONNACK refusal code says "unsupported protocol version"."""
    return int(getattr(rc, "value", rc or 0)) in _UNSUPPORTED_PROTOCOL
Handler = Callable[[tuple], None]


@dataclass(frozen=True)
class BrokerConfig:
    """Where the broker is and how to authenticate to it."""

    host: str = "127.0.0.1"
    port: int = 1883
    tls: bool = False
    username: str | None = None
    password: str | None = None
    ca: str | None = None  # CA bundle to verify the broker (private CA)
    cert: str | None = None  # client certificate (mutual TLS)
    key: str | None = None  # client private key
    keepalive: int = 30
    connect_timeout: float = 10.0

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker_url(url: str, **overrides: Any) -> BrokerConfig:
    """``mqtt://[user:pass@]host[:1883]`` or ``mqtts://…[:8883]``; keyword overrides win."""
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise BrokerError(f"broker URL {url!r} must start with mqtt:// or mqtts://")
    tls = parts.scheme in ("mqtts", "ssl")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise BrokerError(f"broker URL {url!r} has an invalid port") from None
    if not parts.hostname:
        raise BrokerError(f"broker URL {url!r} has no host")
    cfg = BrokerConfig(host=parts.hostname, port=port, tls=tls,
                       username=unquote(parts.username) if parts.username else None,
                       password=unquote(parts.password) if parts.password else None)
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def backoff_delay(attempt: int, lo: float, hi: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with "equal jitter": in [d/2, d] for d = min(hi, lo * 2**attempt)."""
    d = min(hi, lo * (2 ** max(0, attempt)))
    return (rng or random).uniform(d / 2, d)


def no_delay(client: Any, userdata: Any, sock: Any) -> None:
    """paho ``on_socket_open``: disable Nagle's algorithm.

    Without TCP_NODELAY a SUBSCRIBE or PUBLISH sent right after a burst of PUBACKs waits for the
    peer's delayed ACK (40 ms on Linux): every transfer window would stall that long.
    """
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def make_client(cfg: BrokerConfig, client_id: str, *, clean_session: bool = True,
                will: Will | None = None, reconnect_on_failure: bool = True,
                mqtt5: bool = False) -> Any:
    """A configured paho client (VERSION2 callbacks, MQTT 3.1.1 or 5, TCP_NODELAY), not
    connected. With ``mqtt5`` the session is chosen at connect (clean start, expiry)."""
    import paho.mqtt.client as mqtt

    if mqtt5:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                        protocol=mqtt.MQTTv5, reconnect_on_failure=reconnect_on_failure)
    else:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                        clean_session=clean_session, protocol=mqtt.MQTTv311,
                        reconnect_on_failure=reconnect_on_failure)
    c.on_socket_open = no_delay
    if cfg.username is not None:
        c.username_pw_set(cfg.username, cfg.password)
    if cfg.tls or cfg.ca or cfg.cert:
        c.tls_set(ca_certs=cfg.ca, certfile=cfg.cert, keyfile=cfg.key,
                  cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    if will is not None:
        topic, payload, qos, retain = will
        c.will_set(topic, payload, qos=qos, retain=retain)
    c.max_inflight_messages_set(64)
    c.max_queued_messages_set(0)
    return c


class MqttError(BrokerError):
    """A paho call failed: ``rc`` is paho's return or reason code, ``op`` the call."""

    def __init__(self, message: str, *, rc: Any = None, op: str = "", **context: object) -> None:
        super().__init__(message, op=op or None, rc=None if rc is None else str(rc), **context)
        self.rc = rc
        self.op = op


class NotConnected(MqttError):
    """There is no connection to the broker to send on (it is being re-established)."""


class ConnectionRefused(MqttError):
    """The broker refused CONNECT (credentials, ACL) or closed before accepting it (TLS)."""


class SocketHooks(Protocol):
    """What an external event loop (one selector for many clients) learns about sockets."""

    def opened(self, client: MqttClient, sock: Any) -> None: ...

    def closed(self, client: MqttClient, sock: Any) -> None: ...

    def want_write(self, client: MqttClient) -> None: ...

    def no_write(self, client: MqttClient, sock: Any) -> None: ...


def _check(rc: Any, op: str, cfg: BrokerConfig, what: str, **context: object) -> None:
    if rc == 0:
        return
    import paho.mqtt.client as mqtt

    if rc == mqtt.MQTT_ERR_NO_CONN:
        raise NotConnected(f"{what} failed: not connected to the broker at {cfg.url}", rc=rc,
                           op=op, **context)
    raise MqttError(f"{what} failed (paho rc {rc}: {mqtt.error_string(rc)})", rc=rc, op=op,
                    **context)


class MqttClient:
    """One MQTT connection whose paho calls raise instead of returning codes.

    ``handler`` receives the events listed in the module docstring, from paho's network thread
    (threaded mode: :meth:`loop_start`) or from the caller's loop (external mode: ``sockets``
    given, the caller drives :meth:`loop_read`, :meth:`loop_write` and :meth:`loop_misc`).
    It must only hand them over. With ``mqtt5``, ``clean_session`` is CONNECT's Clean Start,
    ``session_expiry_s``, ``receive_maximum`` and ``maximum_packet_size`` (bytes: the broker
    sends nothing bigger) go in its properties, and
    :attr:`shared_subscriptions` tells, once connected, whether the broker offers ``$share/…``.
    """

    def __init__(self, cfg: BrokerConfig, client_id: str, *, handler: Handler | None = None,
                 clean_session: bool = True, will: Will | None = None,
                 keepalive: int | None = None, reconnect_on_failure: bool = True,
                 sockets: SocketHooks | None = None, mqtt5: bool = False,
                 session_expiry_s: float | None = None,
                 receive_maximum: int | None = None,
                 maximum_packet_size: int | None = None) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self.keepalive = cfg.keepalive if keepalive is None else keepalive
        self.handler: Handler = handler or (lambda event: None)
        self.mqtt5 = mqtt5
        self._clean = clean_session
        self._session_expiry_s = session_expiry_s
        self._receive_maximum = receive_maximum
        self._maximum_packet_size = maximum_packet_size
        #: whether the broker's CONNACK offers MQTT 5 shared subscriptions (``$share/…``)
        self.shared_subscriptions = False
        self._paho = make_client(cfg, client_id, clean_session=clean_session, will=will,
                                 reconnect_on_failure=reconnect_on_failure, mqtt5=mqtt5)
        self._paho.connect_timeout = cfg.connect_timeout
        self._auto_reconnect = reconnect_on_failure
        self._connack = threading.Event()
        self._refusal: str | None = None
        self._refusal_rc: Any = None
        self._refused_by_connack = False
        self._started = False
        self._bind(sockets)

    # ---- paho callbacks: hand over only
    def _bind(self, sockets: SocketHooks | None) -> None:
        c = self._paho

        def on_connect(client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
            if rc.is_failure:
                self._refusal_rc = rc
                self._refused_by_connack = True
                self._refusal = (f"refused the connection: {rc}. Check username/password or "
                                 "certificates.")
                self.handler(("refused", str(rc)))
            else:
                self.shared_subscriptions = self.mqtt5 and \
                    getattr(props, "SharedSubscriptionAvailable", 1) != 0
                self.handler(("connected", bool(getattr(flags, "session_present", False))))
            self._connack.set()

        def on_disconnect(client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
            if not self._auto_reconnect:
                client.loop_stop()  # only sets a flag from this thread: the owner reconnects
            if not self._connack.is_set():  # dropped before CONNACK (e.g. TLS cert refused)
                self._refusal_rc = rc
                self._refusal = (f"closed the connection before accepting it ({rc}): check "
                                 "certificates, CA and credentials")
                self._connack.set()
            self.handler(("disconnected", str(rc)))

        c.on_connect = on_connect
        c.on_disconnect = on_disconnect
        c.on_message = lambda client, u, msg: self.handler(
            ("message", msg.topic, bytes(msg.payload), bool(msg.retain)))
        c.on_publish = lambda client, u, mid, rc, props: self.handler(("puback", mid))
        c.on_subscribe = lambda client, u, mid, codes, props: self.handler(
            ("suback", mid, tuple(codes)))
        c.on_unsubscribe = lambda client, u, mid, *rest: self.handler(("suback", mid, ()))
        if sockets is None:
            return

        def opened(client: Any, userdata: Any, sock: Any) -> None:
            no_delay(client, userdata, sock)
            sockets.opened(self, sock)

        c.on_socket_open = opened
        c.on_socket_close = lambda client, u, sock: sockets.closed(self, sock)
        c.on_socket_register_write = lambda client, u, sock: sockets.want_write(self)
        c.on_socket_unregister_write = lambda client, u, sock: sockets.no_write(self, sock)

    # ---- connection
    def connect(self) -> None:
        """Open the socket and send CONNECT (CONNACK arrives as an event); raises
        :class:`MqttError` when the broker cannot be reached. A second call reconnects."""
        self._connack.clear()
        self._refusal = self._refusal_rc = None
        self._refused_by_connack = False
        try:
            if self._started:
                rc = self._paho.reconnect()
            elif self.mqtt5:
                rc = self._paho.connect(self.cfg.host, self.cfg.port, keepalive=self.keepalive,
                                        clean_start=self._clean,
                                        properties=self._connect_properties())
            else:
                rc = self._paho.connect(self.cfg.host, self.cfg.port, keepalive=self.keepalive)
            self._started = True
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise MqttError(f"cannot reach the broker at {self.cfg.url}: {exc}. Is it running? "
                            "(edgepack broker starts one for a one-machine trial)",
                            op="connect") from None
        _check(rc, "connect", self.cfg, f"connecting to {self.cfg.url}")

    @property
    def refusal_code(self) -> Any:
        """The broker's CONNACK refusal code (None: not refused, or closed before CONNACK)."""
        return self._refusal_rc if self._refused_by_connack else None

    def _connect_properties(self) -> Any:
        if self._session_expiry_s is None and self._receive_maximum is None and \
                self._maximum_packet_size is None:
            return None
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)
        if self._session_expiry_s is not None:
            props.SessionExpiryInterval = int(self._session_expiry_s)
        if self._receive_maximum is not None:  # unacknowledged QoS 1 deliveries we accept
            props.ReceiveMaximum = int(self._receive_maximum)
        if self._maximum_packet_size is not None:  # the broker drops bigger messages for us
            props.MaximumPacketSize = int(self._maximum_packet_size)
        return props

    def wait_connected(self, timeout: float | None = None) -> None:
        """Block until the broker accepted CONNECT (threaded mode); raise if it refused."""
        timeout = self.cfg.connect_timeout if timeout is None else timeout
        if not self._connack.wait(timeout):
            raise MqttError(f"broker at {self.cfg.url} did not answer CONNECT within "
                            f"{timeout:g}s", op="connect")
        if self._refusal is not None:
            raise ConnectionRefused(f"broker at {self.cfg.url} {self._refusal}",
                                    rc=self._refusal_rc, op="connect")

    def loop_start(self) -> None:
        _check(self._paho.loop_start(), "loop_start", self.cfg, "starting the network thread")

    def loop_stop(self) -> None:
        self._paho.loop_stop()

    def disconnect(self) -> None:
        """Send DISCONNECT (no LWT); nothing to do when the connection is already gone."""
        import paho.mqtt.client as mqtt

        rc = self._paho.disconnect()
        if rc != mqtt.MQTT_ERR_NO_CONN:
            _check(rc, "disconnect", self.cfg, "disconnecting")

    def close(self) -> None:
        """Disconnect if connected and stop the network thread; never raises."""
        try:
            with contextlib.suppress(BrokerError, OSError):
                self.disconnect()
        finally:
            self._paho.loop_stop()

    # ---- operations
    def publish(self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False,
                wait: float | None = None) -> int:
        """Queue a message; returns its mid (acknowledged later as a ``puback`` event). With
        ``wait``, block that many seconds for the acknowledgement (threaded mode)."""
        info = self._paho.publish(topic, payload, qos=qos, retain=retain)
        _check(info.rc, "publish", self.cfg, f"publish to {topic}", topic=topic)
        if wait is not None:
            try:
                info.wait_for_publish(timeout=wait)
            except (RuntimeError, ValueError) as exc:
                raise NotConnected(f"publish to {topic} was not sent: {exc}", op="publish",
                                   topic=topic) from None
            if not info.is_published():
                raise MqttError(f"broker at {self.cfg.url} did not acknowledge the publish to "
                                f"{topic} within {wait:g}s", op="publish", topic=topic)
        return info.mid

    def subscribe(self, topics: str | Sequence[str], qos: int = 1) -> int:
        """Send SUBSCRIBE for one or more topic filters; returns its mid (``suback`` event)."""
        items = [topics] if isinstance(topics, str) else list(topics)
        rc, mid = self._paho.subscribe([(t, qos) for t in items])
        _check(rc, "subscribe", self.cfg, f"subscribe to {', '.join(items)}", topic=items[0])
        return mid

    def unsubscribe(self, topics: str | Sequence[str]) -> int:
        items = [topics] if isinstance(topics, str) else list(topics)
        rc, mid = self._paho.unsubscribe(items)
        _check(rc, "unsubscribe", self.cfg, f"unsubscribe from {', '.join(items)}",
               topic=items[0])
        return mid

    # ---- external loop (one selector for many clients)
    def socket(self) -> Any:
        return self._paho.socket()

    def want_write(self) -> bool:
        return bool(self._paho.want_write())

    def loop_read(self, max_packets: int = 1) -> None:
        self._paho.loop_read(max_packets)

    def loop_write(self) -> None:
        self._paho.loop_write()

    def loop_misc(self) -> None:
        self._paho.loop_misc()


class Connection:
    """The agent's connection to its broker, kept up by a connector thread.

    Every attempt is a new :class:`MqttClient` (persistent session, LWT) and a new generation
    ``gen``; its events reach ``inbox`` as ``(kind, gen, *fields)``, plus
    ``("connect_failed", gen, reason)`` when an attempt fails before CONNACK. Between attempts the
    thread waits :func:`backoff_delay`. :meth:`publish`, :meth:`subscribe` and
    :meth:`unsubscribe` are thread-safe and raise :class:`NotConnected` between connections.
    """

    def __init__(self, cfg: BrokerConfig, client_id: str, will: Will, inbox: Any,
                 reconnect_min: float, reconnect_max: float, *, protocol: str = "auto",
                 max_packet_size: int | None = None,
                 session_expiry_s: float = 7 * 86400) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self.will = will
        self.inbox = inbox
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        #: "auto" (5, else 3.1.1), "5" or "3.1.1"
        self.protocol = protocol
        self.max_packet_size = max_packet_size
        self.session_expiry_s = session_expiry_s
        #: the protocol of the last accepted connection ("5", "3.1.1"; None before)
        self.speaking: str | None = None
        self._v311 = protocol == "3.1.1"
        self._v5_worked = False
        self.gen = 0
        self._client: MqttClient | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgepack-connector", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # ---- connector thread
    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            with self._lock:
                self.gen += 1
                gen = self.gen
            ended = threading.Event()
            accepted = threading.Event()

            v5 = not self._v311

            def hand_over(event: tuple, gen: int = gen, ended: threading.Event = ended,
                          accepted: threading.Event = accepted, v5: bool = v5) -> None:
                if event[0] == "connected":
                    self.speaking = "5" if v5 else "3.1.1"
                self.inbox.put((event[0], gen, *event[1:]))
                if event[0] == "connected":
                    accepted.set()
                elif event[0] in ("refused", "disconnected"):
                    ended.set()

            client = MqttClient(self.cfg, self.client_id, handler=hand_over,
                                clean_session=False, will=self.will, reconnect_on_failure=False,
                                mqtt5=v5, session_expiry_s=self.session_expiry_s if v5 else None,
                                maximum_packet_size=self.max_packet_size if v5 else None)
            try:
                client.connect()
            except MqttError as exc:
                self.inbox.put(("connect_failed", gen, str(exc)))
                self._stop.wait(backoff_delay(attempt, self.reconnect_min, self.reconnect_max))
                attempt += 1
                continue
            with self._lock:
                self._client = client
            client.loop_start()
            # a broker that does not speak MQTT 5 may refuse it, hang up or say nothing
            wait = self.cfg.connect_timeout if self._v5_worked or not v5 else \
                min(self.cfg.connect_timeout, 3.0)
            deadline = time.monotonic() + wait
            while not (ended.is_set() or self._stop.is_set() or accepted.is_set()):
                if time.monotonic() > deadline:
                    self.inbox.put(("connect_failed", gen, f"no CONNACK within {wait:g}s"))
                    break
                ended.wait(0.05)
            if accepted.is_set():
                attempt = 0
                self._v5_worked = self._v5_worked or v5
                while not (ended.is_set() or self._stop.is_set()):
                    ended.wait(0.2)
            elif self._fall_back(v5, client):
                with self._lock:
                    self._client = None
                client.close()
                continue
            if self._stop.is_set():
                return  # close() disconnects gracefully
            with self._lock:
                self._client = None
            client.close()
            self._stop.wait(backoff_delay(attempt, self.reconnect_min, self.reconnect_max))
            attempt += 1

    def _fall_back(self, v5: bool, client: MqttClient) -> bool:
        """After a failed attempt: switch to 3.1.1 at once (True) when MQTT 5 looks
        unsupported (refused as such; or, until 5 worked once, no CONNACK at all); a 3.1.1
        attempt without CONNACK makes the next one try 5 again (it was something else)."""
        if self.protocol != "auto" or self._stop.is_set():
            return False
        refused = client.refusal_code
        if v5 and (unsupported_protocol(refused) or (refused is None and not self._v5_worked)):
            self._v311 = True
            self.inbox.put(("connect_failed", self.gen, "the broker does not accept MQTT 5: "
                            "trying MQTT 3.1.1 (only its message_size_limit bounds messages)"))
            return True
        if not v5 and refused is None:
            self._v311 = False
        return False

    # ---- any thread
    def _current(self, what: str) -> tuple[MqttClient, int]:
        with self._lock:
            client, gen = self._client, self.gen
        if client is None:
            raise NotConnected(f"{what}: not connected to the broker at {self.cfg.url}",
                               op=what)
        return client, gen

    def publish(self, topic: str, payload: bytes, qos: int = 1,
                retain: bool = False) -> tuple[int, int]:
        """Queue a message on the current connection; returns ``(gen, mid)``."""
        client, gen = self._current("publish")
        return gen, client.publish(topic, payload, qos=qos, retain=retain)

    def subscribe(self, topics: list[str], qos: int = 1) -> None:
        if topics:
            self._current("subscribe")[0].subscribe(topics, qos)

    def unsubscribe(self, topics: list[str]) -> None:
        if topics:
            self._current("unsubscribe")[0].unsubscribe(topics)

    def close(self, last_will: tuple[str, bytes] | None, connected: bool) -> None:
        """Say goodbye (retained offline state) and disconnect cleanly (no LWT)."""
        self._stop.set()
        with self._lock:
            client = self._client
        if client is not None:
            if connected and last_will is not None:
                with contextlib.suppress(BrokerError):
                    client.publish(last_will[0], last_will[1], qos=1, retain=True, wait=2.0)
            client.close()
        self._thread.join(timeout=5)
