"""Telemetry: inference latency windows and the device's vital signs.

:class:`LatencyStats` is fed by every inference call (any thread) and drained by the agent loop
once per ``interval_s`` into one telemetry message (see ``docs/protocol.md``). System figures come
from psutil, ``/sys/class/thermal`` and, on a Raspberry Pi, ``vcgencmd get_throttled``.
"""

from __future__ import annotations

import math
import os
import random
import resource
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "LatencyStats",
    "WindowStats",
    "SystemSampler",
    "percentile",
    "read_temperature",
    "read_throttled",
    "decode_throttled",
    "peak_rss_mb",
]

_MB = 1024.0 * 1024.0


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method) of an already sorted list."""
    if not sorted_values:
        return 0.0
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass(frozen=True)
class WindowStats:
    """What happened to inference in one telemetry window."""

    window_s: float
    inferences: int
    errors: int
    p50: float
    p95: float
    p99: float
    max: float
    mean: float

    def latency(self) -> dict[str, float]:
        return {"p50": round(self.p50, 4), "p95": round(self.p95, 4), "p99": round(self.p99, 4),
                "max": round(self.max, 4), "mean": round(self.mean, 4)}


class LatencyStats:
    """Thread-safe collector of inference latencies for the current window.

    Keeps at most ``max_samples`` latencies per window (reservoir sampling beyond that, so memory
    stays bounded at any inference rate); counts, mean and max are exact.
    """

    def __init__(self, max_samples: int = 10_000) -> None:
        self._lock = threading.Lock()
        self._max_samples = max_samples
        self._rng = random.Random(0)
        self._reset(time.monotonic())
        self.total_inferences = 0
        self.total_errors = 0

    def _reset(self, now: float) -> None:
        self._samples: list[float] = []
        self._count = 0
        self._errors = 0
        self._sum = 0.0
        self._max = 0.0
        self._started = now

    def record(self, ms: float) -> None:
        """One successful inference that took ``ms`` milliseconds."""
        with self._lock:
            self._count += 1
            self.total_inferences += 1
            self._sum += ms
            if ms > self._max:
                self._max = ms
            if len(self._samples) < self._max_samples:
                self._samples.append(ms)
            else:
                j = self._rng.randrange(self._count)
                if j < self._max_samples:
                    self._samples[j] = ms

    def record_error(self) -> None:
        """One failed inference (bad input, runtime error)."""
        with self._lock:
            self._errors += 1
            self.total_errors += 1

    def drain(self) -> WindowStats:
        """Stats of the window since the last drain; starts a new window."""
        now = time.monotonic()
        with self._lock:
            samples, count, errors = self._samples, self._count, self._errors
            total, mx, started = self._sum, self._max, self._started
            self._reset(now)
        samples.sort()
        return WindowStats(window_s=now - started, inferences=count, errors=errors,
                           p50=percentile(samples, 50), p95=percentile(samples, 95),
                           p99=percentile(samples, 99), max=mx,
                           mean=total / count if count else 0.0)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (VmHWM), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru / _MB if sys.platform == "darwin" else ru / 1024.0


def read_temperature(root: str = "/sys/class/thermal") -> float | None:
    """SoC/CPU temperature in °C from the kernel's thermal zones; None when there are none.

    Prefers a zone whose type names the CPU or SoC (``cpu-thermal`` on a Pi, ``CPU-therm`` on a
    Jetson, ``x86_pkg_temp`` on a PC); otherwise the hottest zone.
    """
    best: float | None = None
    preferred: float | None = None
    try:
        zones = sorted(Path(root).glob("thermal_zone*"))
    except OSError:
        return None
    for zone in zones:
        try:
            value = int((zone / "temp").read_text().strip()) / 1000.0
        except (OSError, ValueError):
            continue
        try:
            kind = (zone / "type").read_text().strip().lower()
        except OSError:
            kind = ""
        if any(k in kind for k in ("cpu", "soc", "pkg")):
            preferred = value if preferred is None else max(preferred, value)
        best = value if best is None else max(best, value)
    return preferred if preferred is not None else best


_THROTTLE_BITS = {
    0: "under_voltage", 1: "freq_capped", 2: "throttled", 3: "soft_temp_limit",
    16: "under_voltage_occurred", 17: "freq_capped_occurred", 18: "throttled_occurred",
    19: "soft_temp_limit_occurred",
}


def decode_throttled(value: int) -> dict[str, Any]:
    """Raspberry Pi ``get_throttled`` bits as named flags (plus the raw value)."""
    flags: dict[str, Any] = {name: bool(value >> bit & 1) for bit, name in _THROTTLE_BITS.items()}
    flags["raw"] = hex(value)
    return flags


def read_throttled(vcgencmd: str | None = None) -> dict[str, Any] | None:
    """Throttling flags from ``vcgencmd get_throttled`` on a Raspberry Pi; None elsewhere."""
    exe = vcgencmd or shutil.which("vcgencmd")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "get_throttled"], capture_output=True, text=True, timeout=2,
                             check=False).stdout
        return decode_throttled(int(out.strip().split("=", 1)[1], 16))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


class SystemSampler:
    """Process and device figures for a telemetry message."""

    def __init__(self, data_dir: str | os.PathLike) -> None:
        import psutil

        self._psutil = psutil
        self._proc = psutil.Process()
        self._proc.cpu_percent(None)  # first call only primes the counter
        psutil.cpu_percent(None)
        self._data_dir = str(data_dir)
        self._started = time.monotonic()
        self._vcgencmd = shutil.which("vcgencmd")

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self._started

    def sample(self) -> dict[str, Any]:
        psutil = self._psutil
        try:
            rss = self._proc.memory_info().rss / _MB
        except psutil.Error:
            rss = 0.0
        try:
            disk_free = shutil.disk_usage(self._data_dir).free / _MB
        except OSError:
            disk_free = None
        vm = psutil.virtual_memory()
        try:
            load = list(os.getloadavg())
        except OSError:
            load = None
        return {
            "rss_mb": round(rss, 2),
            "peak_rss_mb": round(peak_rss_mb(), 2),
            "cpu_percent": round(self._proc.cpu_percent(None), 2),
            "system_cpu_percent": round(psutil.cpu_percent(None), 2),
            "mem_available_mb": round(vm.available / _MB, 1),
            "load_avg": load,
            "temperature_c": read_temperature(),
            "throttled": read_throttled(self._vcgencmd) if self._vcgencmd else None,
            "disk_free_mb": round(disk_free, 1) if disk_free is not None else None,
            "uptime_s": round(self.uptime_s, 1),
            "system_uptime_s": round(time.time() - psutil.boot_time(), 1),
        }
