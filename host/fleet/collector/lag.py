"""Ingest lag: how long a message took from the device (or from the collector's receipt) to a
committed transaction."""

from __future__ import annotations

import threading
from collections import deque

__all__ = ["LagStats", "LAG_BUCKETS"]

LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class LagStats:
    """Lag in seconds: cumulative histogram for Prometheus, recent values for quantiles."""

    def __init__(self, recent: int = 200_000) -> None:
        self._lock = threading.Lock()
        self.buckets = [0] * len(LAG_BUCKETS)
        self.count = 0
        self.sum = 0.0
        self.max = 0.0
        self._recent: deque[float] = deque(maxlen=recent)

    def add_many(self, values: list[float]) -> None:
        if not values:
            return
        with self._lock:
            for v in values:
                v = max(0.0, v)
                self.count += 1
                self.sum += v
                if v > self.max:
                    self.max = v
                for i, b in enumerate(LAG_BUCKETS):
                    if v <= b:
                        self.buckets[i] += 1
                        break
                self._recent.append(v)

    def reset_recent(self) -> None:
        with self._lock:
            self._recent.clear()
            self.max = 0.0

    def quantiles(self, qs: tuple[float, ...] = (0.5, 0.95, 0.99)) -> dict[str, float]:
        with self._lock:
            values = sorted(self._recent)
        if not values:
            return {f"p{int(q * 100)}": 0.0 for q in qs}
        return {f"p{int(q * 100)}": values[min(len(values) - 1, int(q * len(values)))]
                for q in qs}

    def histogram(self) -> tuple[list[tuple[float, int]], int, float]:
        """Cumulative ``[(le, count)]``, total count and sum."""
        with self._lock:
            out, acc = [], 0
            for b, n in zip(LAG_BUCKETS, self.buckets, strict=True):
                acc += n
                out.append((b, acc))
            return out, self.count, self.sum
