"""What the agent asks of the operating system: one agent per data directory, the machine's RAM,
systemd's readiness and watchdog notifications, and returning freed memory."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

from edgepack.agent.errors import EdgepackError

__all__ = ["lock_data_dir", "ram_mb", "sd_notify", "return_freed_memory"]


def lock_data_dir(data_dir: Path) -> int:
    """One agent per data directory: a second one would fight over slots and the socket."""
    import fcntl

    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / "agent.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise EdgepackError(f"another edgepack-agent (pid {other}) is running with data_dir "
                            f"{data_dir}; stop it first (systemctl stop edgepack-agent)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def ram_mb() -> float:
    import psutil

    return psutil.virtual_memory().total / (1024 * 1024)


def sd_notify(message: str) -> None:
    """systemd's readiness/watchdog protocol (no-op outside systemd)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(message.encode())
    except OSError:
        pass


def return_freed_memory() -> None:
    """Let glibc give large freed blocks back to the OS.

    Installing a bundle reads tens of MB (chunks, hashes, extraction); glibc keeps freed heap
    below the dynamic mmap threshold for reuse, so a long-running agent held ~90 MB it no longer
    used after a 20 MB install. A fixed 128 KiB threshold serves big buffers from mmap, which
    returns to the OS when freed. No-op elsewhere than glibc.
    """
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
