"""The dashboard in a real headless Chromium: pages render, counts match the simulated fleet,
charts have data, a deploy shows progress live, a dropped device goes offline live."""

from __future__ import annotations

import pytest
from fleet_helpers import wait_for

from edgepack.host.fleet.api import rollout_start
from edgepack.host.fleet.deploy import deploy

pytestmark = pytest.mark.broker

N = 12


def _count(page, name: str) -> int:
    return int(page.locator(f"[data-testid=count-{name}] .n").inner_text())


def test_dashboard_pages_in_chromium(page, sqlite_url, mosquitto, fleet, serve, simulate,
                                     sim_bundle, fleet_keys):
    key, _ = fleet_keys
    server = serve(sqlite_url, fleet)
    sim = simulate(fleet, N, fail_rate=1 / N, interval_s=0.3)
    wait_for(lambda: len(server.store.devices.list(fleet)) == N, 15, what="devices stored")
    base = server.url

    # ---- fleet overview: counts match the simulated fleet
    page.goto(f"{base}?fleet={fleet}")
    page.wait_for_selector("[data-testid=count-devices]")
    wait_for(lambda: _count(page, "online") == N, 10, what="online count")
    assert _count(page, "devices") == N and _count(page, "offline") == 0
    rows = page.locator("#devices-table tbody tr")
    assert rows.count() == N
    first = sim.devices[0].id
    row = page.locator(f"tr[data-device='{first}']")
    assert "rpi4" in row.inner_text() and "online" in row.inner_text()
    # the drift column: simulated devices send no drift windows, so it says so
    assert "drift" in page.locator("#devices-table thead").inner_text()
    assert row.locator("td.drift").get_attribute("data-drift") == "none"
    assert page.locator("header nav a.active").inner_text() == "Devices"
    # filtering keeps the focus and narrows the table
    page.fill("input[type=search]", first)
    wait_for(lambda: rows.count() == 1, 5, what="filtered table")
    page.fill("input[type=search]", "")

    # ---- a deploy shows progress live on the deployments page (no reload)
    page.goto(f"{base}deployments?fleet={fleet}")
    page.wait_for_selector("h1:has-text('Deployments')")
    loaded = page.locator("#app").get_attribute("data-loaded")
    res = deploy(sim_bundle("1.0.0"), broker=mosquitto.url, group="sim", fleet=fleet, key=key)
    dep = page.locator(f"tr[data-deployment='{res.deployment_id}']")
    dep.wait_for(timeout=15_000)
    installed = dep.locator("[data-count=installed]")
    wait_for(lambda: int(installed.inner_text()) == N - 1, 30, what="installed count")
    wait_for(lambda: int(dep.locator("[data-count=rolled_back]").inner_text()) == 1, 10,
             what="the failing device rolled back")
    assert page.locator("#app").get_attribute("data-loaded") != loaded  # polled, not reloaded
    assert dep.locator(".bar .s-installed").count() == 1

    # ---- device page: charts with data, events
    healthy = next(d for d in sim.devices if not d.fails_health)
    page.goto(f"{base}devices/{healthy.id}?fleet={fleet}")
    page.wait_for_selector("#chart-latency canvas")
    wait_for(lambda: page.evaluate(
        "() => window.__charts['chart-latency'].data[0].length") >= 3, 15,
        what="latency points")
    wait_for(lambda: page.evaluate(
        "() => window.__charts['chart-latency'].data[2].filter(v => v > 0).length") >= 1, 15,
        what="p95 points with a bundle running")
    series = page.evaluate("() => window.__charts['chart-latency'].series.map(s => s.label)")
    assert {"p50", "p95", "p99", "p95 budget"} <= set(series)
    assert page.evaluate("() => window.__charts['chart-memory'].data[1].length") >= 3
    assert page.evaluate(
        "() => window.__charts['chart-memory'].data[1].every(v => v === null || v > 10)")
    assert "installed" in page.locator("table").last.inner_text()
    assert "in sync" in page.locator(".panel").first.inner_text()

    # ---- bundle page: manifest, build metrics, report fetched from the broker
    page.goto(f"{base}bundles/{res.bundle_id}?fleet={fleet}")
    page.wait_for_selector("#manifest")
    assert "rpi4" in page.locator("#manifest").inner_text()
    assert "size_ratio" in page.locator("#metrics").inner_text()
    page.wait_for_selector("#report[data-report=ready]", timeout=20_000)
    assert "latency.speedup" in page.locator("#report").inner_text()
    assert f"Devices running it ({N - 1})" in page.inner_text("main")

    # ---- a staged rollout: stage table with live counts, controls
    r = rollout_start(sim_bundle("2.0.0"), group="sim", broker=mosquitto.url,
                      db=server.store, fleet=fleet, stages="50,100", max_failures="50%",
                      soak="60s", key=key)
    page.goto(f"{base}rollouts/{r.id}?fleet={fleet}")
    page.wait_for_selector("tr[data-stage='1']")
    stage1 = page.locator("tr[data-stage='1'] [data-count=installed]")
    wait_for(lambda: int(stage1.inner_text()) >= N // 2 - 1, 30, what="stage 1 installed")
    assert page.locator("button[data-action=pause]").count() == 1
    # changing a rollout needs the API token: log in on the dashboard first
    page.fill("#login-token", server.token)
    page.click("#login button[type=submit]")
    page.wait_for_selector("#logout:not([hidden])")
    page.wait_for_selector("button[data-action=pause]")
    page.click("button[data-action=pause]")
    page.wait_for_selector("button[data-action=resume]", timeout=10_000)
    assert "paused" in page.locator("h1").inner_text()

    # ---- a device that drops off the network goes offline on the overview, live
    page.goto(f"{base}?fleet={fleet}")
    page.wait_for_selector("[data-testid=count-online]")
    sim.drop(sim.devices[-1].id)
    wait_for(lambda: _count(page, "offline") == 1 and _count(page, "online") == N - 1, 20,
             what="the LWT to show")
    offline = page.locator(f"tr[data-device='{sim.devices[-1].id}']")
    assert "offline" in offline.inner_text()
    assert not [e for e in page.js_errors if "favicon" not in e], page.js_errors
