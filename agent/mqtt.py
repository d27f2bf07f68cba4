"""Broker connections: URL parsing, TLS/credentials, and a small synchronous client.

Paho runs one network thread; callbacks here only hand data over (queues, events). Paho return
codes become :class:`BrokerError` at this boundary.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import unquote, urlsplit

from edgepack.agent.errors import BrokerError

__all__ = ["BrokerConfig", "parse_broker_url", "make_client", "no_delay", "SyncClient"]


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


def no_delay(client: Any, userdata: Any, sock: Any) -> None:
    """paho ``on_socket_open``: disable Nagle's algorithm.

    Without TCP_NODELAY a SUBSCRIBE or PUBLISH sent right after a burst of PUBACKs waits for the
    peer's delayed ACK (40 ms on Linux): every transfer window would stall that long.
    """
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def make_client(cfg: BrokerConfig, client_id: str, *, clean_session: bool = True,
                will: tuple[str, bytes, int, bool] | None = None,
                reconnect_on_failure: bool = True) -> Any:
    """A configured paho client (VERSION2 callbacks, MQTT 3.1.1, TCP_NODELAY), not connected."""
    import paho.mqtt.client as mqtt

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


class SyncClient:
    """A blocking MQTT client for host commands (publish, deploy, status) and tests.

    Use as a context manager; every wait has a timeout and raises BrokerError when it expires.
    """

    def __init__(self, cfg: BrokerConfig | str, client_id: str | None = None,
                 timeout: float = 30.0) -> None:
        self.cfg = parse_broker_url(cfg) if isinstance(cfg, str) else cfg
        self.timeout = timeout
        self._client = make_client(self.cfg, client_id or f"edgepack-cli-{uuid.uuid4().hex[:8]}")
        self._connected = threading.Event()
        self._connect_rc: Any = None
        self._messages: queue.Queue = queue.Queue()
        self._acks: dict[int, threading.Event] = {}
        self._lock = threading.Lock()
        c = self._client
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_unsubscribe = self._on_subscribe
        c.on_disconnect = self._on_disconnect
        self._dropped: Any = None

    # paho callbacks: hand over only
    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self._connect_rc = rc
        self._connected.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, rc: Any,
                       props: Any) -> None:
        if not self._connected.is_set():  # dropped before CONNACK (e.g. TLS cert refused)
            self._dropped = rc
            self._connected.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self._messages.put((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def _ack(self, mid: int) -> None:
        with self._lock:
            ev = self._acks.setdefault(mid, threading.Event())
        ev.set()

    def _on_publish(self, client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        self._ack(mid)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, *rest: Any) -> None:
        self._ack(mid)

    def __enter__(self) -> SyncClient:
        self.connect()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def connect(self) -> None:
        try:
            self._client.connect(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive)
        except (OSError, ssl.SSLError) as exc:
            raise BrokerError(f"cannot reach the broker at {self.cfg.url}: {exc}. Is it running? "
                              "(edgepack broker starts one for a one-machine trial)") from None
        self._client.loop_start()
        if not self._connected.wait(self.cfg.connect_timeout):
            self.close()
            raise BrokerError(f"broker at {self.cfg.url} did not answer CONNECT within "
                              f"{self.cfg.connect_timeout:g}s")
        if self._connect_rc is None and self._dropped is not None:
            self.close()
            raise BrokerError(f"broker at {self.cfg.url} closed the connection before accepting "
                              f"it ({self._dropped}): check certificates, CA and credentials")
        if self._connect_rc is not None and getattr(self._connect_rc, "is_failure", False):
            self.close()
            raise BrokerError(f"broker at {self.cfg.url} refused the connection: "
                              f"{self._connect_rc}. Check username/password or certificates.")

    def close(self) -> None:
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()

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
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != 0:
            raise BrokerError(f"publish to {topic} failed (paho rc {info.rc})", topic=topic)
        if wait and qos > 0:
            self._wait(info.mid, f"the publish to {topic}")
        return info.mid

    def wait_published(self, mids: list[int]) -> None:
        for mid in mids:
            self._wait(mid, "a publish")

    def subscribe(self, topic: str, qos: int = 1) -> None:
        rc, mid = self._client.subscribe(topic, qos)
        if rc != 0:
            raise BrokerError(f"subscribe to {topic} failed (paho rc {rc})", topic=topic)
        self._wait(mid, f"the subscription to {topic}")

    def unsubscribe(self, topic: str) -> None:
        rc, mid = self._client.unsubscribe(topic)
        if rc == 0:
            self._wait(mid, f"unsubscribing {topic}")

    def get(self, timeout: float) -> tuple[str, bytes, bool] | None:
        """Next message ``(topic, payload, retained)`` or None after ``timeout`` seconds."""
        try:
            return self._messages.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return None

    def retained(self, topic_filter: str, settle: float = 0.5) -> dict[str, bytes]:
        """Every retained message under ``topic_filter``: waits until none arrived for ``settle``."""
        self.subscribe(topic_filter)
        out: dict[str, bytes] = {}
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            m = self.get(settle)
            if m is None:
                break
            topic, payload, _ = m
            if payload:
                out[topic] = payload
            else:
                out.pop(topic, None)
        self.unsubscribe(topic_filter)
        return out
