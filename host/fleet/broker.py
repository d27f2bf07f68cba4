"""An embedded MQTT broker for a one-machine trial: amqtt in its own thread and asyncio loop.

``edgepack broker`` runs it in the foreground; tests, ``make demo`` and notebooks use
:class:`EmbeddedBroker` as a context manager. It speaks MQTT 3.1.1 (all edgepack's core protocol
needs), keeps retained messages in memory (bundle chunks and manifests of tens of MB included),
allows anonymous clients and listens on loopback unless told otherwise: it is for trials and
development. It speaks MQTT 3.1.1 only, so clients cannot ask it for a Maximum Packet Size;
``max_message_bytes=`` (e.g. :data:`MAX_MESSAGE_BYTES`, 4 MiB like the shipped Mosquitto
configuration's ``max_packet_size``) makes it drop every bigger message instead of passing it on.
By default it sets no limit (a trial may publish a bundle as one chunk of tens of MB). Production fleets use Mosquitto with TLS client certificates and the ACL in
``firmware_configs/mosquitto/``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import threading
from concurrent.futures import Future
from typing import Any

from edgepack.agent.errors import BrokerError

__all__ = ["EmbeddedBroker", "is_loopback", "MAX_MESSAGE_BYTES"]

_log = logging.getLogger(__name__)
#: a message size limit for the embedded broker (1 MiB chunks and control messages fit)
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


def _cannot_listen(host: str, port: int, exc: OSError) -> BrokerError:
    return BrokerError(f"the embedded broker cannot listen on {host}:{port}: "
                       f"{exc.strerror or exc}. Is another broker running there? Pick another "
                       "`port=`.", field="port")


def is_loopback(host: str) -> bool:
    """True when ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _broker_class(max_message_bytes: int | None = None) -> type:
    """amqtt's Broker, mended where it breaks edgepack's protocol, with a message size limit.

    amqtt 0.12 sends, to every client that connects, the retained messages of every topic filter
    *any* session has subscribed to (it loops over all subscriptions, not the session's own). A
    device would receive other devices' desired states and every bundle's chunks. Retained
    messages are only sent for filters the session itself holds.
    """
    from amqtt.broker import Broker

    class _Broker(Broker):
        async def _handle_message_delivery(self, client_session: Any, handler: Any,
                                           wait_deliver: Any) -> bool:
            message = wait_deliver.result()
            data = getattr(message, "data", None)
            if max_message_bytes is not None and data is not None and \
                    len(data) > max_message_bytes:
                _log.warning("dropped a message of %d bytes on %s from %s (over %d)", len(data),
                             message.topic, client_session.client_id, max_message_bytes)
                return True  # not passed on, not retained; the client stays connected
            return await super()._handle_message_delivery(client_session, handler,
                                                          wait_deliver)

        async def _publish_retained_messages_for_subscription(
                self, subscription: tuple[str, int], session: Any) -> None:
            holders = self._subscriptions.get(subscription[0], [])
            if any(s.client_id == session.client_id for s, _ in holders):
                await super()._publish_retained_messages_for_subscription(subscription, session)

    return _Broker


class EmbeddedBroker:
    """amqtt running in a daemon thread; ``start()``/``stop()`` or ``with EmbeddedBroker(...)``.

    ``port=0`` picks a free port; read the chosen one from :attr:`port` (or :attr:`url`) after
    ``start()``. Retained messages live in memory and vanish on ``stop()``.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 1883, *,
                 start_timeout: float = 10.0,
                 max_message_bytes: int | None = None) -> None:
        self.host = host
        self.port = port
        self.max_message_bytes = max_message_bytes
        self.start_timeout = start_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None
        self._stopped: asyncio.Event | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"mqtt://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> EmbeddedBroker:
        """Bind the listener and serve; returns once clients can connect. BrokerError if not."""
        if self.running:
            return self
        self.port = _check_bind(self.host, self.port)
        started: Future = Future()
        self._thread = threading.Thread(target=self._run, args=(started,),
                                        name=f"edgepack-broker-{self.port}", daemon=True)
        self._thread.start()
        try:
            started.result(timeout=self.start_timeout)
        except TimeoutError:
            self.stop()
            raise BrokerError(f"the embedded broker did not start on {self.host}:{self.port} "
                              f"within {self.start_timeout:g}s") from None
        except OSError as exc:
            self._thread.join(5)
            self._thread = None
            raise _cannot_listen(self.host, self.port, exc) from None
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Disconnect every client, drop retained messages and join the thread."""
        loop, thread = self._loop, self._thread
        if loop is not None and self._stopped is not None and thread and thread.is_alive():
            loop.call_soon_threadsafe(self._stopped.set)
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                raise BrokerError(f"the embedded broker on port {self.port} did not stop "
                                  f"within {timeout:g}s")
        self._thread = None
        self._loop = None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the broker stops (``stop()`` from another thread); False on timeout."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- the broker thread ------------------------------------------------------------------

    def _run(self, started: Future) -> None:
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(_quiet_disconnects)
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(started))
        except BaseException as exc:  # reported to start(); the thread must not die silently
            if not started.done():
                started.set_exception(exc)
            else:
                _log.exception("embedded broker crashed")
        finally:
            loop.close()

    async def _serve(self, started: Future) -> None:
        Broker = _broker_class(self.max_message_bytes)  # noqa: N806 - a class
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}",
                                      "max_connections": -1}},
            # Only anonymous auth: the packet/event loggers would format every message (20 MB
            # chunks included) and the $SYS plugin publishes noise nobody reads here.
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin":
                        {"allow_anonymous": True}},
        }
        self._stopped = asyncio.Event()
        broker = Broker(config, loop=asyncio.get_running_loop())
        try:
            await broker.start()
        except Exception as exc:
            cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
            started.set_exception(cause)
            return
        self._broker = broker
        started.set_result(None)
        try:
            await self._stopped.wait()
        finally:
            try:
                await asyncio.wait_for(broker.shutdown(), 10)
            except Exception:  # shutting down anyway; a half-closed client must not hang us
                _log.warning("embedded broker shutdown was not clean", exc_info=True)
            self._broker = None


def _quiet_disconnects(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """A client that hangs up during CONNECT (a refused MQTT 5 attempt falling back to 3.1.1,
    a port probe) makes the broker library raise from its connection callback; that is the
    client's business, not a broker fault worth a traceback on the operator's terminal."""
    exc = context.get("exception")
    if isinstance(exc, (ConnectionError, OSError)) and "client_connected" in str(
            context.get("message", "")):
        _log.debug("client went away during CONNECT: %s", exc)
        return
    loop.default_exception_handler(context)


def _check_bind(host: str, port: int) -> int:
    """The port to use (a free one for 0); a clear error when it is taken or not ours."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's server does
        try:
            s.bind((host, port))
        except OSError as exc:
            raise _cannot_listen(host, port, exc) from None
        return s.getsockname()[1]
