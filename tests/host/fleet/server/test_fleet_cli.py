"""``edgepack fleet serve`` as a real process, ``fleet simulate`` and the simulator's protocol."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner
from fleet_helpers import get_json, wait_for

from edgepack.agent.protocol import Topics
from edgepack.host.fleet.client import SyncClient
from edgepack.host.fleet.deploy import deploy

pytestmark = pytest.mark.broker

# until edgepack.host.cli registers this module itself, and harmless after
_MAIN = ("from edgepack.host.cli import main; from edgepack.host.cli import serve as cli_fleet_serve; "
         "cli_fleet_serve.register(main); main()")


def _cli():
    from edgepack.host.cli import main
    from edgepack.host.cli import serve as cli_fleet_serve

    cli_fleet_serve.register(main)
    return main


def test_fleet_serve_process(tmp_path, mosquitto, fleet, simulate):
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    proc = subprocess.Popen(
        [sys.executable, "-c", _MAIN, "fleet", "serve", "--broker", mosquitto.url, "--db", db,
         "--http", "127.0.0.1:0", "--fleet", fleet, "--retention", "1d"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = None
        deadline = time.monotonic() + 30
        lines = []
        while time.monotonic() < deadline and not (url and "API token" in lines[-1]):
            line = proc.stdout.readline()
            lines.append(line)
            m = re.search(r"dashboard: (http://\S+)", line)
            url = url or (m.group(1) if m else None)
        assert url, "".join(lines)
        simulate(fleet, 3)
        wait_for(lambda: get_json(f"{url}api/overview")["counts"]["online"] == 3, 15,
                 what="3 devices on the dashboard")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, out
        assert "stopped" in out
        # authentication is on from the first start: the token file's path is printed
        token_file = tmp_path / "fleet-token"
        assert lines[-1].startswith(f"API token: in {token_file} ")
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_fleet_simulate_command(mosquitto, fleet, sim_bundle, fleet_keys):
    main = _cli()
    key, pub = fleet_keys
    t = Topics(fleet)
    with SyncClient(mosquitto.url) as watcher:
        watcher.subscribe(t.all_devices("events"))
        import threading

        def later() -> None:
            time.sleep(1.5)
            deploy(sim_bundle("1.0.0"), broker=mosquitto.url, group="sim", fleet=fleet, key=key)

        th = threading.Thread(target=later)
        th.start()
        r = CliRunner().invoke(main, [
            "fleet", "simulate", "--devices", "4", "--broker", mosquitto.url, "--fleet",
            fleet, "--target", "rpi4", "--fail-rate", "0.25", "--interval", "0.3",
            "--install-time", "0.2", "--pub", str(pub), "--duration", "10", "--json"])
        th.join(30)
        assert r.exit_code == 0, r.output
        stats = json.loads(r.output)
        assert stats["devices"] == 4 and stats["failing_health"] == 1
        assert stats["counters"]["event_installed"] == 3, stats["counters"]
        assert stats["counters"]["event_health_failed"] == 1
        assert stats["telemetry_sent"] >= 4 * 10
        kinds = []
        while (m := watcher.get(0.2)) is not None:
            kinds.append(json.loads(m[1])["kind"])
    # the real sequence of an install, as the agent reports it
    for k in ("download_started", "downloaded", "verified", "staged", "health_checking",
              "installed", "health_failed", "rolled_back"):
        assert k in kinds, kinds


def test_simulated_devices_refuse_what_agents_refuse(mosquitto, fleet, simulate, sim_bundle,
                                                     fleet_keys, tmp_path):
    """Wrong target and an unsigned chunk table (with trusted keys) are rejected."""
    from edgepack.host.fleet.publish import publish_bundle

    key, pub = fleet_keys
    sim = simulate(fleet, 2, trusted_keys=(str(pub),))
    deploy(sim_bundle("1.0.0", target="rpi5"), broker=mosquitto.url, device=sim.devices[0].id,
           fleet=fleet, key=key)
    unsigned = sim_bundle("1.1.0")
    publish_bundle(unsigned, mosquitto.url, fleet=fleet)  # no key: no table signature
    deploy(unsigned, broker=mosquitto.url, device=sim.devices[1].id, fleet=fleet)
    wait_for(lambda: sim.counters["event_rejected"] == 2, 15, what="two rejections")
    assert all(d.active is None for d in sim.devices)
    assert ("1", "rejected") not in sim.counters  # nothing else went wrong
