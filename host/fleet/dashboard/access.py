"""Who may talk to the fleet server: the API token, the Host allow-list, cross-site checks and
the dashboard's login sessions.

* **Token**: every changing call (``POST``) is authenticated. Unless ``token=`` is given, a
  random token is made at first start in the server's data directory (``fleet-token``, mode
  0600) and read again on every later start.
* **Host allow-list**: a request whose ``Host`` header names anything else than the bind
  address, ``localhost``, ``127.0.0.1``, ``::1`` or an added name is refused (421) — a page on
  an attacker's domain that re-resolves to this server (DNS rebinding) never gets an answer.
* **Cross-site**: a request whose ``Origin`` is not this server, or whose ``Sec-Fetch-Site``
  says ``cross-site``/``same-site``, may not change anything (403).
* **Sessions**: the dashboard's login form trades the token for a random session id in an
  ``HttpOnly; SameSite=Strict`` cookie; that cookie is only honoured together with the checks
  above, so no cross-site form can use it.
"""

from __future__ import annotations

import hmac
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edgepack.agent.errors import EdgepackError

__all__ = ["TOKEN_FILE", "SESSION_COOKIE", "AccessPolicy", "AccessError", "Sessions", "load_token",
           "default_hosts", "host_name", "cross_site", "Throttle"]

TOKEN_FILE = "fleet-token"
SESSION_COOKIE = "edgepack_session"
_SESSION_S = 12 * 3600.0
_MAX_SESSIONS = 1000


class AccessError(EdgepackError):
    """The server's token file cannot be read or made."""


def load_token(data_dir: str | os.PathLike) -> tuple[str, Path, bool]:
    """``(token, path, created)``: the token in ``data_dir/fleet-token``, made (0600) if absent.

    A token file that group or others may read is refused: anyone who reads it controls
    rollouts.
    """
    d = Path(data_dir)
    path = d / TOKEN_FILE
    try:
        d.mkdir(parents=True, exist_ok=True)
        if path.exists():
            mode = path.stat().st_mode & 0o777
            if mode & 0o077:
                raise AccessError(f"{path} is readable by others (mode {mode:o}): "
                                  f"chmod 600 {path}, or delete it to get a new token",
                                  field="data_dir", path=str(path))
            token = path.read_text().strip()
            if len(token) >= 16:
                return token, path, False
        token = secrets.token_urlsafe(32)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        os.replace(tmp, path)
        return token, path, True
    except OSError as exc:
        raise AccessError(f"cannot read or create the API token {path}: {exc.strerror}. "
                          "Pass `data_dir=` (a writable directory) or `token=`",
                          field="data_dir", path=str(path)) from None


def default_hosts(bind: str) -> frozenset[str]:
    """Host names a request may carry for a server bound to ``bind``: the bind address,
    loopback names, and this machine's names when bound to every interface."""
    names = {"localhost", "127.0.0.1", "::1", bind.lower().strip("[]")}
    if bind in ("0.0.0.0", "::", ""):
        names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
    return frozenset(n for n in names if n)


def host_name(header: str | None) -> str | None:
    """The name in a ``Host`` header without its port (``[::1]:80`` → ``::1``)."""
    if not header:
        return None
    try:
        return urlsplit(f"//{header.strip()}").hostname
    except ValueError:
        return None


def cross_site(headers: Mapping[str, str], host: str | None) -> str | None:
    """Why a request comes from another site (None when it does not): its ``Origin`` is not
    this server's ``Host``, or the browser's ``Sec-Fetch-Site`` says so."""
    fetch_site = headers.get("Sec-Fetch-Site")
    if fetch_site and fetch_site not in ("same-origin", "none"):
        return f"Sec-Fetch-Site is {fetch_site}"
    origin = headers.get("Origin")
    if origin is None:
        return None
    parts = urlsplit(origin)
    if origin == "null" or parts.netloc.lower() != (host or "").lower():
        return f"Origin {origin} is not this server"
    return None


@dataclass(frozen=True)
class AccessPolicy:
    """What the HTTP handler enforces. ``token`` None: no authentication at all (a
    loopback-only server started with ``auth=False``); ``public_reads``: GETs without a token."""

    token: str | None
    allowed_hosts: frozenset[str]
    public_reads: bool

    def token_ok(self, presented: str | None) -> bool:
        return self.token is None or (presented is not None and
                                      hmac.compare_digest(presented, self.token))

    def host_ok(self, header: str | None) -> bool:
        name = host_name(header)
        return name is not None and name.lower() in self.allowed_hosts

    @classmethod
    def build(cls, token: str | None, bind: str, extra_hosts: Iterable[str],
              public_reads: bool) -> AccessPolicy:
        return cls(token, default_hosts(bind) | {h.lower().strip("[]") for h in extra_hosts},
                   public_reads)


class Sessions:
    """Dashboard login sessions: random ids, in memory, expiring after 12 hours."""

    def __init__(self, lifetime_s: float = _SESSION_S) -> None:
        self.lifetime_s = lifetime_s
        self._ids: dict[str, float] = {}
        self._lock = threading.Lock()

    def open(self) -> str:
        sid = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            self._ids = {k: t for k, t in self._ids.items() if t > now}
            while len(self._ids) >= _MAX_SESSIONS:
                self._ids.pop(next(iter(self._ids)))
            self._ids[sid] = now + self.lifetime_s
        return sid

    def valid(self, sid: str | None) -> bool:
        if not sid:
            return False
        with self._lock:
            until = self._ids.get(sid)
        return until is not None and until > time.monotonic()

    def close(self, sid: str | None) -> None:
        with self._lock:
            self._ids.pop(sid or "", None)


class Throttle:
    """Wrong tokens per client address: after ``limit`` failures within ``window_s``, the address
    gets 429 until the window has passed (the token's 256 bits make guessing hopeless anyway;
    this keeps a guesser from costing the server). Bounded: at most ``max_clients`` addresses
    are remembered, the oldest forgotten first."""

    def __init__(self, limit: int = 10, window_s: float = 60.0, max_clients: int = 4096,
                 clock: Any = time.monotonic) -> None:
        self.limit, self.window_s, self.max_clients = limit, window_s, max_clients
        self._clock = clock
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def retry_after(self, client: str) -> float:
        """Seconds ``client`` must wait (0: it may try)."""
        now = self._clock()
        with self._lock:
            recent = [t for t in self._failures.get(client, ()) if t > now - self.window_s]
            if recent:
                self._failures[client] = recent
            else:
                self._failures.pop(client, None)
        return recent[0] + self.window_s - now if len(recent) >= self.limit else 0.0

    def failed(self, client: str) -> None:
        now = self._clock()
        with self._lock:
            times = self._failures.pop(client, [])  # re-inserted last: the newest
            self._failures[client] = [t for t in times if t > now - self.window_s][-self.limit:]
            self._failures[client].append(now)
            while len(self._failures) > self.max_clients:
                self._failures.pop(next(iter(self._failures)))
