"""Tools of the reliability suite: a fault-injecting TCP proxy, a deduplicating recorder of a
device's messages, agents with a crash point, on-disk invariants, and the results file that
``tests/reliability/report.py`` turns into one table.

Agents, bundles, configs and deploys come from ``tests/agent/agent_helpers.py``; brokers from
``tests/brokers.py``. Nothing here depends on pytest fixtures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent_helpers import AgentProcess, Watcher
from brokers import Mosquitto

from edgepack.agent.installer import SLOTS, STATE_SCHEMA
from edgepack.agent.mqtt import make_client

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(os.environ.get("EDGEPACK_RELIABILITY_RESULTS",
                              ROOT / ".reliability" / "results.json"))


# --------------------------------------------------------------------------- results
@dataclass
class Scenario:
    """Runs of one scenario: failures, data lost, worst recovery time (seconds)."""

    name: str
    runs: int = 0
    failures: int = 0
    lost: int = 0  # messages/data lost without being accounted for
    dropped: int = 0  # dropped by design and counted (outbox bound)
    recovery_s: float | None = None
    notes: list[str] = field(default_factory=list)

    def run(self, ok: bool, *, lost: int = 0, dropped: int = 0, recovery_s: float | None = None,
            note: str | None = None) -> bool:
        self.runs += 1
        self.failures += 0 if ok else 1
        self.lost += lost
        self.dropped += dropped
        if recovery_s is not None:
            self.recovery_s = max(self.recovery_s or 0.0, recovery_s)
        if note and note not in self.notes:
            self.notes.append(note)
        save_scenario(self)
        return ok


def save_scenario(s: Scenario) -> None:
    """Merge one scenario into the results file (written after every run: a crash keeps it)."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    ignore = RESULTS.parent / ".gitignore"
    if RESULTS.parent.name == ".reliability" and not ignore.exists():
        ignore.write_text("*\n")
    import fcntl

    # several pytest workers (xdist) merge into the same file: one at a time
    with open(RESULTS.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            doc = json.loads(RESULTS.read_text())
        except (OSError, ValueError):
            doc = {}
        doc.setdefault("scenarios", {})[s.name] = {
            "runs": s.runs, "failures": s.failures, "lost": s.lost, "dropped": s.dropped,
            "recovery_s": None if s.recovery_s is None else round(s.recovery_s, 2),
            "notes": s.notes, "ts": time.time()}
        tmp = RESULTS.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(doc, indent=1))  # scenarios in the order the suite ran them
        os.replace(tmp, RESULTS)


# --------------------------------------------------------------------------- agents
class CrashableAgent(AgentProcess):
    """An agent process; ``crash_at`` sets ``EDGEPACK_TEST_CRASH_AT`` (see agent/crashpoint.py)."""

    prefix: tuple[str, ...] = ()  # e.g. ("ip", "netns", "exec", NS): run it elsewhere

    def start(self, crash_at: str | None = None, skip: int = 0) -> CrashableAgent:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("EDGEPACK_TEST_CRASH_AT", None)
        if crash_at:
            env.update(EDGEPACK_TEST_CRASH_AT=crash_at, EDGEPACK_TEST_CRASH_SKIP=str(skip))
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, sys.executable, "-m", "edgepack.agent.daemon", "--config",
                 str(self.config),
                 "--log-level", "debug"], stdout=log, stderr=subprocess.STDOUT, env=env,
                stdin=subprocess.DEVNULL)
        return self

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout) if self.proc else None
        except subprocess.TimeoutExpired:
            return None


def check_disk_state(data_dir: Path, allowed: set[str | None]) -> tuple[bool, str, str | None]:
    """The invariants a kill must never break: ``(ok, why, active bundle id)``.

    state.json parses and has the schema; the active slot (if any) holds a complete bundle whose
    model matches its hash and whose slot.json names the bundle the state file names; that
    bundle is one of ``allowed`` (old or new; None when nothing was ever installed).
    """
    from edgepack.agent.installer import Installer

    path = data_dir / "state.json"
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return False, f"state.json unreadable: {exc}", None
    if state.get("schema") != STATE_SCHEMA:
        return False, f"state.json schema {state.get('schema')!r}", None
    active = state.get("active")
    if active is None:
        return (None in allowed), "no active slot", None
    if active not in SLOTS:
        return False, f"active slot {active!r}", None
    entry = (state.get("slots") or {}).get(active)
    if not entry:
        return False, f"active slot {active} has no entry", None
    bid = entry.get("bundle_id")
    inst = Installer.__new__(Installer)
    inst.root = data_dir
    if not inst.slot_intact(active):
        return False, f"active slot {active} is not intact", bid
    try:
        slot_json = json.loads((data_dir / "slots" / active / "slot.json").read_text())
    except (OSError, ValueError) as exc:
        return False, f"slot.json unreadable: {exc}", bid
    if slot_json.get("bundle_id") != bid:
        return False, "slot.json and state.json disagree", bid
    outbox = data_dir / "outbox.sqlite"
    if outbox.exists():
        import sqlite3

        try:
            with contextlib.closing(sqlite3.connect(outbox)) as db:
                check = db.execute("PRAGMA quick_check").fetchone()[0]
        except sqlite3.Error as exc:
            check = str(exc)
        if check != "ok":
            return False, f"outbox database damaged: {check}", bid
    if bid not in allowed:
        return False, f"active bundle {bid[:12]} is neither the old nor the new one", bid
    return True, "ok", bid


def serves(data_dir: Path, bundle_id: str) -> bool:
    """The agent's endpoint answers with ``bundle_id`` and a prediction (tiny test model)."""
    import numpy as np

    from edgepack.agent.errors import EdgepackError
    from edgepack.agent.inference import Client

    client = Client(f"unix:{data_dir / 'agent.sock'}")
    try:
        return client.info()["bundle_id"] == bundle_id and client.predict(
            {"x": np.zeros((1, 64), np.float32)})["logits"].shape == (1, 10)
    except EdgepackError:  # not listening (yet), or no bundle
        return False


# --------------------------------------------------------------------------- recorder
class Recorder(Watcher):
    """A device's messages as a collector sees them: persistent session (QoS 1 messages queued
    while it is away), duplicates dropped on ``(device_id, seq)`` and counted."""

    def __init__(self, broker_url: str, fleet: str, device_id: str = "dev1") -> None:
        super().__init__(broker_url, fleet, device_id)
        self.duplicates = 0
        self.conflicts = 0  # a seq seen again on a different message: a seq reused
        self.seen: dict[tuple[str, int], float] = {}
        self.order: list[int] = []  # seqs in first-arrival order
        self.arrival: dict[int, float] = {}
        self._client = make_client(self.cfg, f"rec-{uuid.uuid4().hex[:8]}", clean_session=False)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(0.1, 0.5)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        leaf = msg.topic.rsplit("/", 1)[1]
        if not msg.payload or leaf == "desired":  # tests write garbage there
            return
        doc = json.loads(msg.payload)
        with self._cond:
            if leaf in ("events", "telemetry"):
                key = (doc.get("device_id"), doc.get("seq"))
                if key in self.seen:
                    self.duplicates += 1
                    self.conflicts += self.seen[key] != doc.get("ts")
                    return
                self.seen[key] = doc.get("ts")
                self.order.append(doc["seq"])
                self.arrival[doc["seq"]] = time.time()
            {"events": self.events, "telemetry": self.telemetry,
             "state": self.states}.get(leaf, []).append(doc)
            self._cond.notify_all()

    def in_order(self) -> bool:
        with self._cond:
            return self.order == sorted(self.order)

    def gaps(self, upto: int | None = None) -> list[int]:
        """Seqs never received between the first one seen and ``upto`` (default: last seen)."""
        with self._cond:
            if not self.order:
                return []
            hi = upto if upto is not None else max(self.order)
            have = set(self.order)
            return [s for s in range(min(self.order), hi + 1) if s not in have]


# --------------------------------------------------------------------------- brokers
def kill9_broker(broker: Mosquitto) -> None:
    """SIGKILL the broker (no goodbye to anyone), then start it again on the same port."""
    if broker.proc is not None and broker.proc.poll() is None:
        broker.proc.send_signal(signal.SIGKILL)
        broker.proc.wait(10)
    broker.proc = None
    broker.start()


# --------------------------------------------------------------------------- fault proxy
class FaultProxy:
    """An asyncio TCP proxy (own thread and loop) between an agent and its broker.

    Faults, all switchable at run time from any thread:

    * ``delay_s``: one-way latency added to every segment, both directions (a delay line: the
      throughput stays, each byte arrives ``delay_s`` later);
    * ``stall(seconds)``: nothing moves either way, then everything resumes (TCP would buffer
      and retransmit: nothing is lost);
    * ``reset()``: every connection is aborted with an RST, both sides;
    * ``blackhole(True)``: packets vanish without a FIN or RST: existing connections are frozen
      forever (half-open: only a keepalive can notice), new connections get through the TCP
      handshake but never see a byte (as when SYN-ACKs come from a middlebox); ``False`` ends
      the partition for new connections.
    """

    def __init__(self, upstream_port: int, host: str = "127.0.0.1",
                 listen: str = "127.0.0.1") -> None:
        self.upstream = (host, upstream_port)
        self.listen = listen
        self.delay_s = 0.0
        self.connections = 0
        self.resets = 0
        self._stall_until = 0.0
        self._hole = False
        self._pairs: list[_Pair] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="fault-proxy")
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"mqtt://{self.listen}:{self.port}"

    async def _listen(self) -> asyncio.AbstractServer:
        return await asyncio.start_server(self._accept, self.listen, 0)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self._hole:
            pair = _Pair(writer, None, frozen=True)
            self._pairs.append(pair)
            return  # never read, never answer, never close (until the proxy closes)
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        pair = _Pair(writer, up_w)
        self._pairs.append(pair)
        await asyncio.gather(self._pipe(reader, up_w, pair), self._pipe(up_r, writer, pair),
                             return_exceptions=True)
        with contextlib.suppress(ValueError):
            self._pairs.remove(pair)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    pair: _Pair) -> None:
        line: asyncio.Queue = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await line.get()
                if data is None:
                    break
                await self._gate(pair, due)
                dst.write(data)
                await dst.drain()
            with contextlib.suppress(OSError, RuntimeError):
                if dst.can_write_eof():
                    dst.write_eof()

        task = asyncio.ensure_future(deliver())
        try:
            while True:
                await self._gate(pair, 0.0)
                data = await src.read(65536)
                await self._gate(pair, 0.0)
                line.put_nowait((time.monotonic() + self.delay_s, data or None))
                if not data:
                    break
            await task
        except (OSError, asyncio.CancelledError):
            task.cancel()
            pair.abort()

    async def _gate(self, pair: _Pair, due: float) -> None:
        while True:
            if pair.frozen:
                await asyncio.sleep(3600)
                continue
            now = time.monotonic()
            wait = max(due - now, self._stall_until - now)
            if wait <= 0:
                return
            await asyncio.sleep(min(wait, 0.05))

    # ---- controls (any thread)
    def stall(self, seconds: float) -> None:
        self._stall_until = time.monotonic() + seconds

    def reset(self) -> None:
        """RST every connection (SO_LINGER 0), both directions."""
        def _do() -> None:
            for pair in list(self._pairs):
                pair.abort(rst=True)
            self._pairs.clear()
        self.resets += 1
        self._loop.call_soon_threadsafe(_do)

    def blackhole(self, on: bool) -> None:
        def _do() -> None:
            self._hole = on
            if on:
                for pair in self._pairs:
                    pair.frozen = True
        self._loop.call_soon_threadsafe(_do)

    def close(self) -> None:
        async def _shutdown() -> None:
            self._server.close()
            for pair in list(self._pairs):
                pair.abort(rst=True)
            self._pairs.clear()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(_shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


class _Pair:
    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter | None, *,
                 frozen: bool = False) -> None:
        self.writers = [w for w in (client, upstream) if w is not None]
        self.frozen = frozen

    def abort(self, rst: bool = False) -> None:
        for w in self.writers:
            sock = w.get_extra_info("socket")
            if rst and sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.transport.abort()


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, step: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(step)
