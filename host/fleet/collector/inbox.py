"""The hand-over between paho's network thread and the collector's writer: an unbounded queue
whose depth both sides keep, so the subscriber can shed telemetry past a limit and callers can
wait until everything received is stored."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

__all__ = ["Inbox"]


class Inbox:
    """Messages received and not yet stored."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self.depth = 0
        self.busy = False  # the writer holds messages it took but has not stored yet

    def put(self, item: Any) -> None:
        self._queue.put(item)
        with self._lock:
            self.depth += 1

    def take(self, most: int, timeout: float) -> list[Any]:
        """Up to ``most`` messages, waiting ``timeout`` for the first; marks the writer busy."""
        try:
            first = self._queue.get(timeout=timeout)
        except queue.Empty:
            return []
        self.busy = True  # before the depth drops, so wait_idle never sees a gap
        items = [first]
        get = self._queue.get_nowait
        try:
            while len(items) < most:
                items.append(get())
        except queue.Empty:
            pass
        with self._lock:
            self.depth -= len(items)
        return items

    def wait_idle(self, timeout: float) -> bool:
        """Block until every message put so far is stored (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.depth == 0 and not self.busy:
                return True
            time.sleep(0.01)
        return False
