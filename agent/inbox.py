"""The agent loop's inbox: what the connection, the profiler and signals hand over, bounded.

Events (``("connected", gen, …)``, ``("puback", gen, mid)``, …) are always kept: they are few
and the loop's bookkeeping depends on them. Received messages (``("message", gen, topic,
payload, retain)``) are bounded two ways:

* **keep-latest topics** (the desired states, downgrade authorizations, freshness): a message
  replaces the one of the same topic still waiting, in its place in the queue — a burst of
  desired states costs one verification, and only the newest is acted on;
* everything else (chunks, profile jobs) counts against ``max_messages`` and ``max_bytes``;
  past either, new messages are shed and counted (:attr:`dropped`). A shed chunk is fetched
  again when its window times out; a keep-latest message is never shed.

``get``/``get_nowait``/``put`` behave like :class:`queue.Queue`'s (``queue.Empty``).
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Iterable

__all__ = ["Inbox"]


class Inbox:
    """A bounded queue with keep-latest topics (see the module docstring)."""

    def __init__(self, *, max_bytes: int = 32 * 1024 * 1024, max_messages: int = 10_000) -> None:
        self.max_bytes = max_bytes
        self.max_messages = max_messages
        #: messages shed because the inbox was full (reported in telemetry)
        self.dropped = 0
        #: keep-latest messages replaced by a newer one before the loop took them
        self.replaced = 0
        self._items: deque[tuple] = deque()
        self._latest: dict[str, tuple] = {}
        self._keep_latest: frozenset[str] = frozenset()
        self._bytes = 0
        self._messages = 0
        self._cond = threading.Condition()

    def keep_latest(self, topics: Iterable[str]) -> None:
        """Topics whose waiting message a newer one replaces."""
        with self._cond:
            self._keep_latest = frozenset(topics)

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def put(self, item: tuple) -> None:
        with self._cond:
            if item[0] == "message":
                topic, payload = item[2], item[3]
                if topic in self._keep_latest:
                    if self._latest.get(topic) is not None:
                        self.replaced += 1
                        self._latest[topic] = item
                        return  # the waiting one's place in the queue carries the newest
                    self._latest[topic] = item
                    item = ("latest", item[1], topic)
                elif self._messages >= self.max_messages or \
                        self._bytes + len(payload) > self.max_bytes:
                    self.dropped += 1
                    return
                else:
                    self._messages += 1
                    self._bytes += len(payload)
            self._items.append(item)
            self._cond.notify()

    def get(self, block: bool = True, timeout: float | None = None) -> tuple:
        with self._cond:
            if not self._items and block:
                self._cond.wait(timeout)
            if not self._items:
                raise queue.Empty
            item = self._items.popleft()
            if item[0] == "latest":
                return self._latest.pop(item[2])
            if item[0] == "message":
                self._messages -= 1
                self._bytes -= len(item[3])
            return item

    def get_nowait(self) -> tuple:
        return self.get(block=False)
