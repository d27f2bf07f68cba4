"""``edgepack fleet serve`` as a library: the collector, the rollout engine and the dashboard
(JSON API, ``/metrics``) over one database, started and stopped together.

    with FleetServer(ServeConfig(broker="mqtt://localhost", db="sqlite:///fleet.db")) as s:
        print(s.url, s.token_file)  # the dashboard, and the API token's file

Authentication is on by default: every changing call needs the API token (made at first start
in ``data_dir``, 0600, or ``token=``); requests must name an allowed host; see
``dashboard.access``.
"""

from __future__ import annotations

import os
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepack.agent.errors import EdgepackError
from edgepack.agent.mqtt import BrokerConfig, parse_broker_url
from edgepack.host.fleet.broker import is_loopback
from edgepack.host.fleet.collector import Collector, CollectorOptions
from edgepack.host.fleet.dashboard import FleetAPI, make_http_server
from edgepack.host.fleet.dashboard.access import AccessPolicy, load_token
from edgepack.host.fleet.dashboard.signers import SignerCheck
from edgepack.host.fleet.rollout import RolloutEngine
from edgepack.host.fleet.storage import Store, open_store

__all__ = ["ServeConfig", "FleetServer", "ServeError", "default_data_dir"]


class ServeError(EdgepackError):
    """The fleet server cannot start (its HTTP address is taken or not allowed)."""


def default_data_dir(db: str) -> Path:
    """Where the server keeps its token: next to a SQLite database file, else
    ``$XDG_STATE_HOME/edgepack`` (``~/.local/state/edgepack``)."""
    if db.startswith("sqlite:///") and db[len("sqlite:///"):] not in ("", ":memory:"):
        return Path(db[len("sqlite:///"):]).expanduser().resolve().parent
    if "://" not in db and db not in ("", ":memory:"):  # a bare SQLite path
        return Path(db).expanduser().resolve().parent
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "edgepack"


@dataclass(frozen=True)
class ServeConfig:
    """What ``fleet serve`` runs: which broker and database, where the dashboard listens
    (port 0: any free port), how the collector behaves, whether rollouts advance here, and who
    may use the HTTP API.

    ``token``: the API token (default: made at first start in ``data_dir``/fleet-token, 0600,
    reused after). ``auth=False`` turns authentication off and is refused unless ``http`` is a
    loopback address. ``allowed_hosts``: names besides the bind address and loopback that
    requests may carry in ``Host``. ``public_reads``: GETs without the token (default: only on
    a loopback bind). ``trusted_keys``: public keys (``.pub``) a bundle's signer is verified
    against before the dashboard names it.
    """

    broker: BrokerConfig | str
    db: str = "sqlite:///fleet.db"
    http: tuple[str, int] = ("127.0.0.1", 8080)
    collector: CollectorOptions = field(default_factory=CollectorOptions)
    rollouts: bool = True
    rollout_tick_s: float = 1.0
    token: str | None = None
    data_dir: str | None = None
    auth: bool = True
    allowed_hosts: tuple[str, ...] = ()
    public_reads: bool | None = None
    trusted_keys: tuple[str, ...] = ()
    #: protocol v2: the online key (0600) that re-signs each fleet's freshness on a schedule
    online_key: str | None = None
    freshness_interval_s: float = 600.0

    @property
    def reads_public(self) -> bool:
        return is_loopback(self.http[0]) if self.public_reads is None else self.public_reads

    def warnings(self) -> list[str]:
        """What an operator should know before starting (a dashboard open to the network)."""
        if is_loopback(self.http[0]) or not self.reads_public:
            return []
        return [f"the dashboard listens on {self.http[0]} with `public_reads=`: anyone who can "
                "reach it sees the fleet's devices, groups and telemetry"]

    def policy(self) -> tuple[AccessPolicy, Path | None]:
        """The HTTP access policy and the token file (None: token given, or no auth)."""
        host = self.http[0]
        if not self.auth:
            if not is_loopback(host):
                raise ServeError(f"`auth=False` is only allowed on a loopback address, not "
                                 f"{host}: keep authentication on", field="auth")
            return AccessPolicy.build(None, host, self.allowed_hosts, True), None
        path = None
        token = self.token
        if not token:
            token, path, _ = load_token(self.data_dir or default_data_dir(self.db))
        return AccessPolicy.build(token, host, self.allowed_hosts, self.reads_public), path


class FleetServer:
    """Collector + rollout engine + dashboard, started and stopped together; ``.url`` is the
    dashboard. ``store`` shares an open database instead of opening ``config.db``."""

    def __init__(self, config: ServeConfig, *, store: Store | None = None) -> None:
        self.config = config
        self.cfg = parse_broker_url(config.broker) if isinstance(config.broker, str) \
            else config.broker
        self.policy, self.token_file = config.policy()
        #: the API token (``Authorization: Bearer …``); None with ``auth=False``
        self.token = self.policy.token
        self._own_store = store is None
        self.store = store if store is not None else open_store(config.db)
        opts = config.collector
        self.collector = Collector(self.cfg, self.store, opts)
        self.engine = RolloutEngine(self.store, self.cfg, tick_s=config.rollout_tick_s,
                                    owner=f"{self.collector.client_id}-{uuid.uuid4().hex[:6]}") \
            if config.rollouts else None
        self.beacons = []
        if config.online_key:
            from edgepack.host.fleet.keyring import load_signer
            from edgepack.host.fleet.trust import FreshnessBeacon

            online = load_signer(config.online_key)
            self.beacons = [FreshnessBeacon(self.cfg, f, online,
                                            interval_s=config.freshness_interval_s)
                            for f in opts.fleets if f not in ("+", "#")]
        self.signers = SignerCheck(self.cfg, opts.fleets, config.trusted_keys,
                                   f"{self.collector.client_id}-signers-{uuid.uuid4().hex[:6]}")
        self.api = FleetAPI(self.store, list(opts.fleets), collector=self.collector,
                            engine=self.engine, signers=self.signers)
        host, port = config.http
        try:
            self.http = make_http_server(self.api, host, port, policy=self.policy,
                                         collector=self.collector, engine=self.engine)
        except OSError as exc:
            if self._own_store:
                self.store.close()
            raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror}. Pick another "
                             "`http=` address.", field="http") from None
        self._thread = threading.Thread(target=self.http.serve_forever,
                                        name="edgepack-dashboard", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.http.server_address[:2]
        host = host if host not in ("0.0.0.0", "::") else "127.0.0.1"
        return f"http://{host}:{port}/"

    def start(self) -> FleetServer:
        self.collector.start()
        if self.engine is not None:
            self.engine.start()
        for b in self.beacons:
            b.start()
        self.signers.start()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, stop the engine, store what the collector holds, close the database."""
        self.http.shutdown()
        self.http.server_close()
        if self.engine is not None:
            self.engine.stop()
        for b in self.beacons:
            b.close()
        self.signers.close()
        self.collector.stop()
        if self._own_store:
            self.store.close()

    def __enter__(self) -> FleetServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
