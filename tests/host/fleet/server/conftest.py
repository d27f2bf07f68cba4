"""Fixtures for the fleet tests: SQLite and a real PostgreSQL, bundles, a fleet server, the
simulator and a real headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fleet_helpers import get_json, wait_for  # noqa: E402, F401 - re-exported
from pgcluster import find_pg_bin, start_cluster  # noqa: E402

CHROMIUM = os.environ.get("EDGEPACK_CHROMIUM", "/usr/bin/chromium")


# ------------------------------------------------------------------------------ databases

@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Any]:
    """A throwaway PostgreSQL cluster; skipped only when the server binaries are absent and
    EDGEPACK_REQUIRE_POSTGRES is not set (CI sets it)."""
    if find_pg_bin() is None:
        if os.environ.get("EDGEPACK_REQUIRE_POSTGRES"):
            pytest.fail("PostgreSQL is required (EDGEPACK_REQUIRE_POSTGRES) but its server "
                        "binaries are missing: run .ci/install-postgres.sh")
        pytest.skip("PostgreSQL server binaries not installed (.ci/install-postgres.sh)")
    cluster = start_cluster()
    yield cluster
    cluster.destroy()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty fleet database: SQLite file, then a PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fleet.db'}"
    cluster = request.getfixturevalue("pg_cluster")
    return cluster.fresh_database(f"t{uuid.uuid4().hex[:12]}")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'fleet.db'}"


# ------------------------------------------------------------------------------ bundles

@pytest.fixture(scope="session")
def fleet_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from edgepack.host.keys import generate_keys

    priv, pub, _ = generate_keys(tmp_path_factory.mktemp("fleetkeys"), "fleet")
    return priv, pub


@pytest.fixture(scope="session")
def sim_bundle(tmp_path_factory: pytest.TempPathFactory,
               fleet_keys: tuple[Path, Path]) -> Callable[..., Path]:
    """``sim_bundle(version=, target=, p95_ms=, size=)`` -> a signed bundle for simulated
    devices (its model bytes are filler: simulated devices never run it)."""
    import numpy as np

    from edgepack.host.build.package import npz_bytes, write_bundle
    from edgepack.host.keys import load_private_key, sign_bytes

    out = tmp_path_factory.mktemp("simbundles")
    key = load_private_key(fleet_keys[0])
    cache: dict[tuple, Path] = {}

    def make(version: str = "1.0.0", *, name: str = "detector", target: str = "rpi4",
             p95_ms: float = 200.0, peak_rss_mb: float = 1024.0, size: int = 20_000) -> Path:
        k = (version, name, target, p95_ms, peak_rss_mb, size)
        if k in cache:
            return cache[k]
        rng = np.random.default_rng(abs(hash(k)) % 2**32)
        model = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        x = np.zeros((1, 4), np.float32)
        manifest = {
            "name": name, "version": version, "created": "2025-01-01T00:00:00Z",
            "target": target,
            "model": {"file": "model.onnx", "format": "onnx",
                      "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 4]}],
                      "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 4]}]},
            "runtime": {"name": "onnxruntime", "min_version": "1.17", "threads": 1},
            "optimization": {"mode": "int8", "format": "QDQ", "summary": "int8 QDQ test"},
            "metrics": {"fp32_bytes": size * 4, "optimized_bytes": size, "size_ratio": 4.0,
                        "top1_agreement": 0.995,
                        "host_latency_ms": {"fp32": {"p50": 3.1}, "optimized": {"p50": 1.2}}},
            "health": {"golden": "golden.npz", "atol": 1e-4, "rtol": 1e-3},
            "budgets": {"p95_ms": p95_ms, "peak_rss_mb": peak_rss_mb, "model_mb": 100},
        }
        report = json.dumps({"name": name, "version": version,
                             "quantization": {"accuracy_drop_points": 0.4, "calibration_samples": 64},
                             "latency": {"speedup": 2.6}}).encode()
        path = write_bundle(out / f"{name}-{version}-{target}-{len(cache)}.edgepack", manifest,
                            model, {"golden.npz": npz_bytes({"input_0": x, "output_0": x}),
                                    "report.json": report},
                            sign=lambda data: sign_bytes(data, key))
        cache[k] = path
        return path

    return make


# ------------------------------------------------------------------------------ services

@pytest.fixture
def serve(mosquitto: Any, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Callable[..., Any]]:
    """``serve(db_url, fleet, **collector_options)`` -> a started FleetServer on a free port
    (its generated API token: ``server.token``)."""
    from edgepack.host.fleet.collector import CollectorOptions
    from edgepack.host.fleet.server import FleetServer, ServeConfig

    started: list[Any] = []

    def make(db: str, fleet: str, *, broker: str | None = None, rollout_tick_s: float = 0.2,
             token: str | None = None, serve_options: dict | None = None,
             **opts: Any) -> Any:
        opts.setdefault("client_id", f"collector-{uuid.uuid4().hex[:8]}")
        so = {"data_dir": str(tmp_path_factory.mktemp("fleetserver")), **(serve_options or {})}
        server = FleetServer(ServeConfig(broker=broker or mosquitto.url, db=db,
                                         http=("127.0.0.1", 0),
                                         collector=CollectorOptions(fleets=(fleet,), **opts),
                                         rollout_tick_s=rollout_tick_s, token=token,
                                         **so)).start()
        started.append(server)
        assert server.collector.wait_connected(10), "collector did not connect"
        return server

    make.started = started  # type: ignore[attr-defined]
    yield make
    for s in started:
        s.stop()


@pytest.fixture
def simulate(mosquitto: Any, serve: Any) -> Iterator[Callable[..., Any]]:
    """``simulate(fleet, devices=, **options)`` -> a started Simulator, all devices online,
    their keys enrolled with every fleet server of ``fleet`` started so far."""
    from edgepack.host.fleet.simulator import SimOptions, Simulator

    started: list[Any] = []

    def make(fleet: str, devices: int = 10, *, broker: str | None = None, wait: bool = True,
             **opts: Any) -> Any:
        opts.setdefault("interval_s", 0.5)
        opts.setdefault("install_s", 0.3)
        sim = Simulator(broker or mosquitto.url, SimOptions(devices=devices, fleet=fleet,
                                                            **opts))
        for server in serve.started:
            if fleet in server.collector.opts.fleets:
                sim.enroll(server.store)
        sim.start()
        started.append(sim)
        if wait:
            assert sim.wait_online(timeout=20), f"only {sim.online_count()} devices online"
        return sim

    yield make
    for s in started:
        s.stop()


# ------------------------------------------------------------------------------ browser

@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Debian's Chromium, headless, driven by Playwright."""
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        if os.environ.get("EDGEPACK_REQUIRE_BROWSER"):
            pytest.fail("Chromium is required (EDGEPACK_REQUIRE_BROWSER) but missing: run "
                        ".ci/install-system-deps.sh")
        pytest.skip("chromium is not installed (.ci/install-system-deps.sh installs it)")
    try:
        import playwright.sync_api as playwright
    except ImportError:
        if os.environ.get("EDGEPACK_REQUIRE_BROWSER"):
            pytest.fail("playwright is required (EDGEPACK_REQUIRE_BROWSER): pip install "
                        "'edgepack[dev]'")
        pytest.skip("playwright is not installed (pip install 'edgepack[dev]')")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists()
                              else shutil.which("chromium"),
                              args=["--no-sandbox", "--disable-gpu",
                                    "--disable-background-networking"])
        yield b
        b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.js_errors = errors
    yield pg
    ctx.close()
