"""The dashboard's HTTP server: pages, the JSON API and ``/metrics``.

The dashboard is a few static files (``static/``: one HTML shell, a script, a stylesheet and the
vendored uPlot chart library — nothing is fetched from the internet) over a JSON API
(``/api/…``, documented in ``docs/fleet-api.md``) and ``/metrics`` for Prometheus. The pages poll
the API every two seconds. Served by the standard library's threading HTTP server.

Every request must name an allowed host (``access.AccessPolicy``: 421 otherwise). POST
endpoints (pause/resume/abort a rollout) need the token — ``Authorization: Bearer <token>``, or
the session cookie the dashboard's login (``POST /api/login``) sets — must not come from another
site (``Origin``, ``Sec-Fetch-Site``: 403) and accept only ``Content-Type: application/json``
(a browser cannot send that cross-origin without a CORS preflight this server never grants).
GETs of the API and ``/metrics`` need the token too unless the policy has ``public_reads``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mimetypes
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from edgepack.agent.errors import EdgepackError
from edgepack.host.fleet.dashboard.access import (
    SESSION_COOKIE,
    AccessPolicy,
    Sessions,
    Throttle,
    cross_site,
)
from edgepack.host.fleet.dashboard.api import FleetAPI, NotFound
from edgepack.host.fleet.rollout import abort_rollout, pause_rollout, resume_rollout

__all__ = ["make_http_server", "STATIC_DIR"]

log = logging.getLogger("edgepack.dashboard")
STATIC_DIR = Path(__file__).parent / "static"
_PAGES = ("", "devices", "deployments", "rollouts", "bundles")


class _Handler(BaseHTTPRequestHandler):
    server_version = "edgepack-fleet"
    api: FleetAPI
    policy: AccessPolicy
    sessions: Sessions
    throttle: Throttle
    metrics: Any

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s %s", self.address_string(), format % args)

    # -- responses
    def _send(self, status: int, body: bytes, ctype: str, *, cache: bool = False,
              cookie: str | None = None) -> None:
        self.send_response(status)
        if cookie is not None:
            self.send_header("Set-Cookie", cookie)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "max-age=3600" if cache else "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy",
                         "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' "
                         "data:; connect-src 'self'; frame-ancestors 'none'")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200, cookie: str | None = None) -> None:
        self._send(status, json.dumps(obj, default=str, allow_nan=False).encode(),
                   "application/json; charset=utf-8", cookie=cookie)

    def _error(self, status: int, message: str) -> None:
        self._json({"error": HTTPStatus(status).phrase, "message": message}, status)

    # -- access
    def _session_id(self) -> str | None:
        try:
            morsel = SimpleCookie(self.headers.get("Cookie", "")).get(SESSION_COOKIE)
        except CookieError:
            return None
        return morsel.value if morsel is not None else None

    def _authenticated(self) -> bool:
        """The token as a bearer credential, or a live login session."""
        p = self.policy
        if p.token is None:
            return True
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            return self._token_ok(auth[len("Bearer "):].strip())
        return self.sessions.valid(self._session_id())

    def _throttled(self) -> bool:
        """429 for an address that presented too many wrong tokens lately."""
        wait = self.throttle.retry_after(self.client_address[0])
        if wait > 0:
            self._error(429, f"too many wrong tokens from this address: try again in "
                        f"{wait:.0f} s")
        return wait > 0

    def _token_ok(self, presented: str | None) -> bool:
        ok = self.policy.token_ok(presented)
        if not ok:
            self.throttle.failed(self.client_address[0])
        return ok

    def _host_refused(self) -> bool:
        """421 for a Host header that is not an allowed name (DNS rebinding)."""
        if self.policy.host_ok(self.headers.get("Host")):
            return False
        self._error(421, f"this server does not answer for host {self.headers.get('Host')!r}; "
                    "add it with `allowed_hosts=` if it is a name of this server")
        return True

    def _refused_for_change(self) -> bool:
        """403 from another site, 415 without a JSON body type, 401 without the token."""
        why = cross_site(self.headers, self.headers.get("Host"))
        if why is not None:
            self._error(403, f"cross-site request refused ({why})")
            return True
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
            self._error(415, "POST needs Content-Type: application/json")
            return True
        if self._throttled():
            return True
        if not self._authenticated():
            self._error(401, "changing the fleet needs the API token: 'Authorization: Bearer "
                        "<token>' (or log in on the dashboard)")
            return True
        return False

    def _read_body(self) -> bytes | None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > 65536:
            self._error(413, "request body too large")
            return None
        return self.rfile.read(length)

    def _login(self) -> None:
        """``POST /api/login`` with ``{"token": …}``: a session cookie for the dashboard."""
        why = cross_site(self.headers, self.headers.get("Host"))
        if why is not None:
            self._error(403, f"cross-site login refused ({why})")
            return
        body = self._read_body()
        if body is None or self._throttled():
            return
        try:
            token = json.loads(body or b"{}").get("token")
        except (ValueError, AttributeError):
            token = None
        if self.policy.token is None:
            self._json({"authenticated": True, "auth": False})
        elif not isinstance(token, str) or not self._token_ok(token):
            self._error(401, "wrong token: it is in the server's fleet-token file (its path is "
                        "printed when the server starts)")
        else:
            sid = self.sessions.open()
            self._json({"authenticated": True, "auth": True},
                       cookie=f"{SESSION_COOKIE}={sid}; Path=/; HttpOnly; SameSite=Strict; "
                       f"Max-Age={int(self.sessions.lifetime_s)}")

    def _logout(self) -> None:
        self.sessions.close(self._session_id())
        self._json({"authenticated": False, "auth": self.policy.token is not None},
                   cookie=f"{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")

    # -- routing
    def do_HEAD(self) -> None:  # noqa: N802 - stdlib name
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        if self._host_refused():
            return
        url = urlsplit(self.path)
        path = unquote(url.path)
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            if path == "/api/session":
                self._json({"authenticated": self._authenticated(),
                            "auth": self.policy.token is not None,
                            "public_reads": self.policy.public_reads})
            elif (path.startswith("/api/") or path == "/metrics") and not \
                    self.policy.public_reads and self._throttled():
                pass  # 429 sent
            elif (path.startswith("/api/") or path == "/metrics") and not \
                    self.policy.public_reads and not self._authenticated():
                self._error(401, "this server needs the API token to read the fleet: "
                            "'Authorization: Bearer <token>' (or log in on the dashboard)")
            elif path.startswith("/api/"):
                self._json(self._get_api(path[len("/api/"):].strip("/").split("/"), q))
            elif path == "/metrics":
                from edgepack.host.fleet.metrics import CONTENT_TYPE

                self._send(200, self.metrics(), CONTENT_TYPE)
            elif path.startswith("/static/"):
                self._static(path[len("/static/"):])
            elif path == "/favicon.ico":
                self._static("favicon.svg")
            elif path.strip("/").split("/")[0] in _PAGES:
                self._static("index.html")
            else:
                self._error(404, f"no page {path}")
        except NotFound as exc:
            self._error(404, str(exc))
        except (ValueError, EdgepackError) as exc:
            self._error(400, str(exc))
        except Exception as exc:  # noqa: BLE001 - one bad request must not stop the server
            log.exception("error answering %s", self.path)
            with contextlib.suppress(Exception):
                self._error(500, f"{type(exc).__name__}: {exc}")

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        if self._host_refused():
            return
        path = unquote(urlsplit(self.path).path).strip("/").split("/")
        if path == ["api", "login"]:
            self._login()
            return
        if path == ["api", "logout"]:
            self._logout()
            return
        if self._refused_for_change() or self._read_body() is None:
            return
        try:
            if len(path) == 4 and path[:2] == ["api", "rollouts"] and \
                    path[3] in ("pause", "resume", "abort"):
                action = {"pause": pause_rollout, "resume": resume_rollout,
                          "abort": abort_rollout}[path[3]]
                self._json(action(self.api.store, path[2]).to_json())
            else:
                self._error(404, f"no action {'/'.join(path)}")
        except EdgepackError as exc:
            self._error(409, str(exc))
        except Exception as exc:  # noqa: BLE001
            log.exception("error answering POST %s", self.path)
            self._error(500, f"{type(exc).__name__}: {exc}")

    def _get_api(self, parts: list[str], q: dict[str, str]) -> Any:
        api = self.api
        fleet = q.get("fleet")
        head, rest = parts[0], parts[1:]
        if head == "fleets" and not rest:
            return api.list_fleets()
        if head == "overview" and not rest:
            return api.overview(fleet)
        if head == "health" and not rest:
            return api.health()
        if head == "devices":
            if not rest:
                return {"fleet": api.fleet(fleet), "devices": api.device_rows(api.fleet(fleet))}
            if len(rest) == 1:
                return api.device(fleet, rest[0])
            if len(rest) == 2 and rest[1] == "telemetry":
                return api.telemetry(fleet, rest[0], since=_float(q.get("since")),
                                     until=_float(q.get("until")),
                                     points=int(q.get("points", 1500)))
            if len(rest) == 2 and rest[1] == "events":
                return api.events(fleet, device_id=rest[0], limit=int(q.get("limit", 200)))
        if head == "events" and not rest:
            return api.events(fleet, deployment_id=q.get("deployment"), kind=q.get("kind"),
                              device_id=q.get("device"),
                              after_id=int(q["after"]) if q.get("after") else None,
                              limit=int(q.get("limit", 200)))
        if head == "deployments":
            if not rest:
                return api.deployments(fleet)
            if len(rest) == 1:
                return api.deployment(fleet, rest[0])
        if head == "rollouts":
            if not rest:
                return api.rollouts(fleet)
            if len(rest) == 1:
                return api.rollout(rest[0])
        if head == "drift" and not rest:
            return api.drift(fleet, device=q.get("device"), bundle=q.get("bundle"),
                             group=q.get("group"), since=_float(q.get("since")),
                             until=_float(q.get("until")),
                             points=int(q["points"]) if q.get("points") else None)
        if head == "bundles":
            if not rest:
                return api.bundles(fleet)
            if len(rest) == 1:
                return api.bundle(fleet, rest[0])
        raise NotFound(f"no API endpoint /api/{'/'.join(parts)}")

    def _static(self, name: str) -> None:
        target = (STATIC_DIR / name).resolve()
        if STATIC_DIR.resolve() not in target.parents or not target.is_file():
            self._error(404, f"no file {name}")
            return
        ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype in ("application/javascript",
                                                  "image/svg+xml"):
            ctype += "; charset=utf-8"
        self._send(200, target.read_bytes(), ctype, cache=name != "index.html")


def _float(v: str | None) -> float | None:
    return None if v in (None, "") else float(v)


def make_http_server(api: FleetAPI, host: str = "127.0.0.1", port: int = 8080, *,
                     policy: AccessPolicy | None = None, collector: Any = None,
                     engine: Any = None) -> ThreadingHTTPServer:
    """A threading HTTP server answering the dashboard, the API and ``/metrics``. Without a
    ``policy``: no token, loopback host names only, reads open."""
    from edgepack.host.fleet.metrics import render_metrics

    def metrics() -> bytes:
        return render_metrics(api.store, api.fleets, collector=collector, engine=engine)

    policy = policy or AccessPolicy.build(None, host, (), public_reads=True)
    handler = type("FleetHandler", (_Handler,), {"api": api, "policy": policy,
                                                 "sessions": Sessions(),
                                                 "throttle": Throttle(),
                                                 "metrics": staticmethod(metrics)})
    mimetypes.add_type("application/javascript", ".js")
    mimetypes.add_type("image/svg+xml", ".svg")
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server
