"""The dashboard's HTTP server: pages, the JSON API and ``/metrics``.

The dashboard is a few static files (``static/``: one HTML shell, a script, a stylesheet and the
vendored uPlot chart library — nothing is fetched from the internet) over a JSON API
(``/api/…``, documented in ``docs/fleet-api.md``) and ``/metrics`` for Prometheus. The pages poll
the API every two seconds. Served by the standard library's threading HTTP server.

POST endpoints (pause/resume/abort a rollout) accept only ``Content-Type: application/json`` —
a browser cannot send that cross-origin without a CORS preflight this server never grants — and,
when a token is configured, ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import mimetypes
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from edgepack.agent.errors import EdgepackError
from edgepack.host.fleet.dashboard.api import FleetAPI, NotFound
from edgepack.host.fleet.rollout import abort_rollout, pause_rollout, resume_rollout

__all__ = ["make_http_server", "STATIC_DIR"]

log = logging.getLogger("edgepack.dashboard")
STATIC_DIR = Path(__file__).parent / "static"
_PAGES = ("", "devices", "deployments", "rollouts", "bundles")


class _Handler(BaseHTTPRequestHandler):
    server_version = "edgepack-fleet"
    api: FleetAPI
    token: str | None
    metrics: Any

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s %s", self.address_string(), format % args)

    # -- responses
    def _send(self, status: int, body: bytes, ctype: str, *, cache: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "max-age=3600" if cache else "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy",
                         "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' "
                         "data:; connect-src 'self'")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200) -> None:
        self._send(status, json.dumps(obj, default=str, allow_nan=False).encode(),
                   "application/json; charset=utf-8")

    def _error(self, status: int, message: str) -> None:
        self._json({"error": HTTPStatus(status).phrase, "message": message}, status)

    # -- routing
    def do_HEAD(self) -> None:  # noqa: N802 - stdlib name
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        url = urlsplit(self.path)
        path = unquote(url.path)
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            if path.startswith("/api/"):
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
        path = unquote(urlsplit(self.path).path).strip("/").split("/")
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
            self._error(415, "POST needs Content-Type: application/json")
            return
        if self.token is not None:
            auth = self.headers.get("Authorization", "")
            if not hmac.compare_digest(auth, f"Bearer {self.token}"):
                self._error(401, "this dashboard needs 'Authorization: Bearer <token>' to change "
                                 "rollouts")
                return
        length = int(self.headers.get("Content-Length") or 0)
        if length > 65536:
            self._error(413, "request body too large")
            return
        self.rfile.read(length)
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
                     token: str | None = None, collector: Any = None,
                     engine: Any = None) -> ThreadingHTTPServer:
    """A threading HTTP server answering the dashboard, the API and ``/metrics``."""
    from edgepack.host.fleet.metrics import render_metrics

    def metrics() -> bytes:
        return render_metrics(api.store, api.fleets, collector=collector, engine=engine)

    handler = type("FleetHandler", (_Handler,), {"api": api, "token": token,
                                                 "metrics": staticmethod(metrics)})
    mimetypes.add_type("application/javascript", ".js")
    mimetypes.add_type("image/svg+xml", ".svg")
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server
