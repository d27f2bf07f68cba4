"""``edgepack fleet simulate``: many simulated devices in one process, for demos and scale tests.

Each device is a real MQTT connection (its own client id, LWT and session) speaking protocol v1
as ``edgepack-agent`` does: a retained birth state (``online``, board, target, groups, runtimes,
active/previous bundle, slot, phase) and the LWT ``{"online": false}``; it follows its own and its
groups' retained desired states (the device's own wins); it fetches a deployed bundle with the
real chunk transfer — the retained ``bundles/{id}/manifest`` message, then windows of retained
chunks, each checked against the chunk table (and the table's signature when trusted keys are
given), the whole file against the bundle id — and reports the install events
(``download_started`` … ``installed``, or ``health_failed`` + ``rolled_back``); it sends plausible
telemetry (latency quantiles from the target's budget, RSS from the model size, CPU, temperature).

A configurable share of devices fails every health check (``fail_rate``); another share installs
but then runs over the bundle's latency and memory budgets (``over_budget_rate``), which a staged
rollout's soak catches. Which devices misbehave is drawn from ``seed``, so runs repeat.

All connections share one thread running a selector over the sockets (the MQTT wrapper's
external-loop mode): thousands of devices cost a few file descriptors and no threads each. The
protocol side of a device (the agent's reconcile, compatibility checks and chunk transfer, a
simulated install and telemetry) is :mod:`edgepack.host.fleet.sim_device`.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import queue
import random
import selectors
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgepack.agent.errors import EdgepackError
from edgepack.agent.mqtt import BrokerConfig, MqttClient, parse_broker_url
from edgepack.agent.protocol import Topics, check_id
from edgepack.host.fleet.sim_device import SimDevice

__all__ = ["Simulator", "SimOptions", "SimDevice"]

log = logging.getLogger("edgepack.simulator")
_MB = 1024 * 1024


@dataclass(frozen=True)
class SimOptions:
    """What to simulate."""

    devices: int = 10
    fleet: str = "default"
    target: str = "rpi4"
    board: str | None = None  # default: the target name
    groups: tuple[str, ...] = ("sim",)
    prefix: str = "sim"  # device ids: {prefix}-0001 …
    start_index: int = 1
    fail_rate: float = 0.0  # share of devices whose health check always fails
    over_budget_rate: float = 0.0  # share running over the bundle's budgets once installed
    interval_s: float = 5.0  # telemetry period
    telemetry_qos: int = 1
    install_s: float = 1.5  # how long the simulated health check takes
    window: int = 8  # chunks per transfer window
    chunk_timeout_s: float = 15.0
    connect_rate: float = 400.0  # new connections per second
    keepalive: int = 60
    trusted_keys: tuple[str, ...] = ()  # public keys to check table_sig (none: not checked)
    seed: int = 0
    clean_session: bool = True
    enroll_db: str | None = None  # fleet database to enroll the devices' keys in at start

    def __post_init__(self) -> None:
        check_id(self.fleet, "fleet name")
        for g in self.groups:
            check_id(g, "group name")
        if self.devices < 1:
            raise ValueError("devices must be at least 1")
        if not (0.0 <= self.fail_rate <= 1.0 and 0.0 <= self.over_budget_rate <= 1.0):
            raise ValueError("fail_rate and over_budget_rate are shares between 0 and 1")
        if self.telemetry_qos not in (0, 1):
            raise ValueError("telemetry_qos must be 0 or 1")


class Simulator:
    """Run ``opts.devices`` simulated devices against a broker until :meth:`stop`."""

    def __init__(self, broker: BrokerConfig | str, options: SimOptions | None = None) -> None:
        self.cfg = parse_broker_url(broker) if isinstance(broker, str) else broker
        self.opts = options or SimOptions()
        self.topics = Topics(self.opts.fleet)
        from edgepack.agent import __version__

        self.agent_version = f"{__version__}-sim"
        self.keys: dict[str, Any] = {}
        if self.opts.trusted_keys:
            from edgepack.agent.signing import load_public_keys

            self.keys = load_public_keys(self.opts.trusted_keys)
        self.base_latency_ms = self._base_latency()
        self.counters: Counter[str] = Counter()
        rng = random.Random(self.opts.seed)
        n = self.opts.devices
        order = list(range(n))
        rng.shuffle(order)
        n_fail = round(self.opts.fail_rate * n)
        n_over = round(self.opts.over_budget_rate * n)
        failing = set(order[:n_fail])
        over = set(order[n_fail:n_fail + n_over])
        width = max(4, len(str(self.opts.start_index + n - 1)))
        self.devices = [
            SimDevice(self, i, f"{self.opts.prefix}-{self.opts.start_index + i:0{width}d}",
                      fails_health=i in failing, over_budget=i in over,
                      rng=random.Random(f"{self.opts.seed}-{i}"))
            for i in range(n)]
        self.by_id = {d.id: d for d in self.devices}
        self._sel = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._posted: list[tuple[Callable[..., None], tuple]] = []
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._pending_writes: set[Any] = set()
        self._blocked: set[Any] = set()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name="edgepack-simulator", daemon=True)
        self._stop = threading.Event()
        self._stopped = threading.Event()

    def _base_latency(self) -> float:
        try:
            from edgepack.agent.profiles import load_profile

            return float(load_profile(self.opts.target).budgets.p95_ms) * 0.12
        except (EdgepackError, AttributeError, ValueError):
            return 12.0

    # ---- public API (any thread)
    def start(self) -> Simulator:
        if self.opts.enroll_db:
            from edgepack.host.fleet.storage import open_store

            with open_store(self.opts.enroll_db) as store:
                self.enroll(store)
        self._thread.start()
        return self

    def enrollments(self) -> list[dict[str, Any]]:
        """Each device's enrollment object (``{"device_id", "keyid", "key", "groups"}``)."""
        return [{**d.identity.enrollment(d.id), "groups": list(self.opts.groups)}
                for d in self.devices]

    def enroll(self, store: Any) -> None:
        """Enroll every device's key, in the simulated groups, in ``store``'s inventory (call
        before :meth:`start`, so the first reports count)."""
        store.inventory.enroll_many(self.opts.fleet, [
            (e["device_id"], e["keyid"], e["key"], e["groups"]) for e in self.enrollments()])

    def stop(self, graceful: bool = True, timeout: float = 15.0) -> None:
        """Disconnect every device: ``graceful`` publishes an offline state first (as a stopping
        agent does); otherwise the sockets just close and the broker sends each LWT."""
        if self._stopped.is_set() or not self._thread.is_alive():
            return
        self._command(lambda: self._shutdown(graceful))
        self._thread.join(timeout)

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def drop(self, device_id: str) -> None:
        """Cut a device's connection without DISCONNECT (the broker publishes its LWT) and keep
        it away until :meth:`revive`."""
        self._command(lambda: self._drop(self.by_id[device_id]))

    def revive(self, device_id: str) -> None:
        def go() -> None:
            d = self.by_id[device_id]
            d.closing = False
            d.attempt = 0
            d.connect()
        self._command(go)

    def online_count(self) -> int:
        return sum(d.connected for d in self.devices)

    def wait_online(self, n: int | None = None, timeout: float = 60.0) -> bool:
        """Block until ``n`` (default: all) devices are connected and announced."""
        want = self.opts.devices if n is None else n
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.online_count() >= want:
                return True
            time.sleep(0.05)
        return False

    def stats(self) -> dict[str, Any]:
        c = dict(self.counters)
        return {"devices": self.opts.devices, "online": self.online_count(),
                "failing_health": sum(d.fails_health for d in self.devices),
                "over_budget": sum(d.over_budget for d in self.devices),
                "telemetry_sent": c.get("telemetry", 0), "counters": c,
                "active": dict(Counter(d.active["version"] if d.active else "none"
                                       for d in self.devices))}

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        """Schedule ``fn`` on the loop thread (call only from the loop thread)."""
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), fn))

    # ---- loop internals
    def _command(self, fn: Callable[[], None]) -> None:
        self._commands.put(fn)
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def post(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop thread after the current step (from the loop thread:
        MQTT callbacks hand their events over this way)."""
        self._posted.append((fn, args))

    # ---- SocketHooks of the MQTT wrapper (loop thread)
    def opened(self, client: MqttClient, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(sock)
        self._sel.register(sock, selectors.EVENT_READ, client)

    def closed(self, client: MqttClient, sock: Any) -> None:
        self._pending_writes.discard(client)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(sock)

    # paho asks for a writable socket after every packet it queues: collect those clients and
    # write once per loop round, asking epoll only when the kernel buffer is full
    def want_write(self, client: MqttClient) -> None:
        self._pending_writes.add(client)

    def no_write(self, client: MqttClient, sock: Any) -> None:
        self._pending_writes.discard(client)
        if client in self._blocked:
            self._blocked.discard(client)
            with contextlib.suppress(KeyError, ValueError):
                self._sel.modify(sock, selectors.EVENT_READ, client)

    def _flush_writes(self) -> None:
        while self._pending_writes:
            batch = list(self._pending_writes)
            self._pending_writes.clear()
            for client in batch:
                client.loop_write()
                sock = client.socket()
                if sock is not None and client.want_write() and client not in self._blocked:
                    self._blocked.add(client)  # kernel buffer full: wait for writability
                    with contextlib.suppress(KeyError, ValueError):
                        self._sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE,
                                         client)
            self._pending_writes -= self._blocked
            self._drain_posted()

    def _run(self) -> None:
        try:
            self._loop()
        except Exception:  # pragma: no cover - a bug: say so, then stop cleanly
            log.exception("simulator loop crashed")
            raise
        finally:
            self._stopped.set()

    def _loop(self) -> None:
        o = self.opts
        spacing = 1.0 / o.connect_rate if o.connect_rate > 0 else 0.0
        for k, d in enumerate(self.devices):
            self.call_later(k * spacing, d.connect)
            offset = k * spacing + 1.0 + d.rng.uniform(0, o.interval_s)
            self.call_later(offset, self._telemetry_timer(d))
        next_misc = time.monotonic() + 1.0
        while not self._stopped.is_set():
            self._flush_writes()
            now = time.monotonic()
            timeout = 0.5
            if self._timers:
                timeout = max(0.0, min(timeout, self._timers[0][0] - now))
            for key, mask in self._sel.select(timeout):
                client = key.data
                if client is None:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                    continue
                if mask & selectors.EVENT_READ:
                    client.loop_read(64)
                if mask & selectors.EVENT_WRITE:
                    client.loop_write()
            self._drain_posted()
            while True:
                try:
                    fn = self._commands.get_nowait()
                except queue.Empty:
                    break
                fn()
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _, _, fn = heapq.heappop(self._timers)
                fn()
                self._drain_posted()
            if now >= next_misc and not self._stop.is_set():
                next_misc = now + 1.0
                for d in self.devices:
                    if d.client is not None and d.client.socket() is not None:
                        d.client.loop_misc()
                    d.tick(now)
                self._drain_posted()
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def _drain_posted(self) -> None:
        while self._posted:
            posted, self._posted = self._posted, []
            for fn, args in posted:
                try:
                    fn(*args)
                except EdgepackError as exc:
                    log.warning("simulated device: %s", exc)

    def _telemetry_timer(self, d: SimDevice) -> Callable[[], None]:
        def fire() -> None:
            if self._stop.is_set():
                return
            d.send_telemetry()
            self.call_later(self.opts.interval_s, fire)
        return fire

    def _drop(self, d: SimDevice) -> None:
        d.closing = True
        d.connected = False
        sock = d.client.socket() if d.client is not None else None
        if sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(sock)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            d.client = None  # the old paho client is abandoned with its socket
            with contextlib.suppress(OSError):
                sock.close()

    def _shutdown(self, graceful: bool) -> None:
        self._stop.set()
        self._timers.clear()
        for d in self.devices:
            if d.client is None:
                d.closing = True
                continue
            was_connected = d.connected
            d.shutdown(graceful)
            if not (graceful and was_connected):
                self._drop(d)
        # give paho a moment to flush the offline states and DISCONNECTs
        deadline = time.monotonic() + 5.0

        def check() -> None:
            if time.monotonic() > deadline:
                for d in self.devices:
                    if d.client is not None and d.client.socket() is not None:
                        self._drop(d)
                self._stopped.set()
            elif any(d.client is not None and d.client.socket() is not None
                     for d in self.devices):
                self.call_later(0.05, check)
            else:
                self._stopped.set()
        self.call_later(0.05, check)

