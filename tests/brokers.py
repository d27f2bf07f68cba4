"""Real brokers for tests and benchmarks: a Mosquitto process on a free loopback port."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


def stop_process(proc: subprocess.Popen | None, timeout: float = 5.0) -> None:
    """Terminate a broker process, killing it if it does not exit within ``timeout``."""
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@dataclass
class Mosquitto:
    """A Mosquitto broker owned by the test session; ``stop``/``start`` simulate outages."""

    port: int
    workdir: Path
    extra_conf: str = ""
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> Mosquitto:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(exe).exists():
            raise RuntimeError("mosquitto is not installed: run .ci/install-system-deps.sh "
                               "(make test does)")
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "max_inflight_messages 0\n"
            "max_queued_messages 100000\n"
            "message_size_limit 0\n"
            f"{self.extra_conf}\n")
        log = open(self.workdir / "mosquitto.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen([exe, "-c", str(conf)], stdout=log, stderr=log)
        wait_port(self.port)
        return self

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


def start_mosquitto(extra_conf: str = "", port: int | None = None) -> Mosquitto:
    workdir = Path(tempfile.mkdtemp(prefix="edgepack-mosquitto-"))
    return Mosquitto(port=port or free_port(), workdir=workdir, extra_conf=extra_conf).start()
