"""``edgepack fleet serve`` as a library: the collector, the rollout engine and the dashboard
(JSON API, ``/metrics``) over one database, started and stopped together.

    with FleetServer(ServeConfig(broker="mqtt://localhost", db="sqlite:///fleet.db")) as s:
        print(s.url)  # the dashboard
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from edgepack.agent.errors import EdgepackError
from edgepack.agent.mqtt import BrokerConfig, parse_broker_url
from edgepack.host.fleet.broker import is_loopback
from edgepack.host.fleet.collector import Collector, CollectorOptions
from edgepack.host.fleet.dashboard import FleetAPI, make_http_server
from edgepack.host.fleet.rollout import RolloutEngine
from edgepack.host.fleet.storage import Store, open_store

__all__ = ["ServeConfig", "FleetServer", "ServeError"]


class ServeError(EdgepackError):
    """The fleet server cannot start (its HTTP address is taken or not allowed)."""


@dataclass(frozen=True)
class ServeConfig:
    """What ``fleet serve`` runs: which broker and database, where the dashboard listens
    (port 0: any free port), how the collector behaves, whether rollouts advance here, and the
    token POST requests need."""

    broker: BrokerConfig | str
    db: str = "sqlite:///fleet.db"
    http: tuple[str, int] = ("127.0.0.1", 8080)
    collector: CollectorOptions = field(default_factory=CollectorOptions)
    rollouts: bool = True
    rollout_tick_s: float = 1.0
    token: str | None = None
    #: protocol v2: the online key (0600) that re-signs each fleet's freshness on a schedule
    online_key: str | None = None
    freshness_interval_s: float = 600.0

    def warnings(self) -> list[str]:
        """What an operator should know before starting (a dashboard open to the network)."""
        if is_loopback(self.http[0]):
            return []
        return [f"the dashboard listens on {self.http[0]}: anyone who can reach it sees the "
                "fleet" + ("" if self.token else " and can pause or abort rollouts (set a "
                           "`token=`)")]


class FleetServer:
    """Collector + rollout engine + dashboard, started and stopped together; ``.url`` is the
    dashboard. ``store`` shares an open database instead of opening ``config.db``."""

    def __init__(self, config: ServeConfig, *, store: Store | None = None) -> None:
        self.config = config
        self.cfg = parse_broker_url(config.broker) if isinstance(config.broker, str) \
            else config.broker
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
        self.api = FleetAPI(self.store, list(opts.fleets), collector=self.collector,
                            engine=self.engine)
        host, port = config.http
        try:
            self.http = make_http_server(self.api, host, port, token=config.token,
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
        self.collector.stop()
        if self._own_store:
            self.store.close()

    def __enter__(self) -> FleetServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
