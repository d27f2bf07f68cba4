"""The JSON API behind the dashboard and /metrics parsed by prometheus_client's own parser."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from fleet_helpers import get_json, wait_for

from edgepack.host.fleet.deploy import deploy

pytestmark = pytest.mark.broker

N = 8


def _status(url: str, method: str = "GET", **headers: str) -> int:
    req = urllib.request.Request(url, method=method, data=b"{}" if method == "POST" else None,
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_api_and_metrics(db_url, mosquitto, fleet, serve, simulate, sim_bundle, fleet_keys):
    key, _ = fleet_keys
    server = serve(db_url, fleet, token="s3cret")
    sim = simulate(fleet, N, fail_rate=1 / N, interval_s=0.25)
    base = server.url + "api/"
    res = deploy(sim_bundle("1.0.0", p95_ms=150.0), broker=mosquitto.url, group="sim",
                 fleet=fleet, key=key)
    dep, bid = res.deployment_id, res.bundle_id
    # polled from the moment of the deploy: the collector may not have stored it yet (404)
    wait_for(lambda: get_json(f"{base}deployments/{dep}?fleet={fleet}",
                              missing={"counts": {}})["counts"].get("installed") == N - 1, 30,
             what="installs")

    fleets = get_json(f"{base}fleets")
    assert fleets["default"] == fleet and fleet in fleets["fleets"]

    ov = get_json(f"{base}overview")  # the default fleet is the one collected
    assert ov["fleet"] == fleet and ov["counts"] == {"devices": N, "online": N, "offline": 0,
                                                      "unknown": 0}
    assert sum(ov["health"].values()) == N
    assert {b["version"] for b in ov["by_bundle"] if b["devices"]} >= {"1.0.0"}
    assert len(ov["devices"]) == N and ov["collector"]["connected"]

    healthy = next(d for d in sim.devices if not d.fails_health).id
    wait_for(lambda: get_json(f"{base}devices/{healthy}?fleet={fleet}")["telemetry"]
             .get("bundle_id") == bid, 10, what="telemetry on the new bundle")
    dev = get_json(f"{base}devices/{healthy}?fleet={fleet}")
    assert dev["bundle_version"] == "1.0.0" and dev["in_sync"] is True
    assert dev["budgets"] == {"p95_ms": 150.0, "peak_rss_mb": 1024.0}
    assert dev["health"] == "healthy"
    assert "installed" in [e["kind"] for e in dev["events"]]

    tel = get_json(f"{base}devices/{healthy}/telemetry?fleet={fleet}&since=-600&points=5")
    s = tel["series"]
    assert tel["points"] <= 5 and tel["raw_points"] >= tel["points"] > 0
    assert len(s["ts"]) == len(s["p95"]) == len(s["rss_mb"]) == tel["points"]
    assert tel["budgets"]["p95_ms"] == 150.0 and any(v for v in s["p95"] if v)

    evs = get_json(f"{base}events?fleet={fleet}&deployment={dep}&kind=installed")["events"]
    assert len(evs) == N - 1 and all(e["deployment_id"] == dep for e in evs)

    deps = get_json(f"{base}deployments?fleet={fleet}")
    plain = next(x for x in deps["deployments"] if x["deployment_id"] == dep)
    assert plain["targets"] == [{"scope": "group", "name": "sim"}] and plain["total"] == N
    assert plain["counts"]["installed"] == N - 1 and plain["counts"]["rolled_back"] == 1

    bundles = get_json(f"{base}bundles?fleet={fleet}")["bundles"]
    assert [b["bundle_id"] for b in bundles] == [bid] and bundles[0]["devices"] == N - 1
    # this server trusts no key: the claimed signer is not shown
    assert bundles[0]["signed_by"] is None and bundles[0]["signature"] == "unverified"
    b = wait_for(lambda: (x := get_json(f"{base}bundles/{bid[:10]}?fleet={fleet}"))
                 ["report_status"] == "ready" and x, 20, what="the build report")
    assert b["report"]["latency"]["speedup"] == 2.6 and b["metrics"]["size_ratio"] == 4.0
    assert b["manifest"]["target"] == "rpi4" and len(b["devices"]) == N - 1

    health = get_json(f"{base}health")
    assert health["ok"] and health["collector"]["shared_subscription"]

    # errors are JSON with a status
    assert _status(f"{base}devices/nope?fleet={fleet}") == 404
    assert _status(f"{base}nothing") == 404
    assert _status(f"{base}devices/{healthy}/telemetry?since=abc") == 400
    assert _status(f"{base}rollouts/nope") == 404
    # changing things needs JSON and, here, the token
    assert _status(f"{base}rollouts/x/pause", "POST") == 415
    assert _status(f"{base}rollouts/x/pause", "POST", **{"Content-Type": "application/json"}) \
        == 401
    assert _status(f"{base}rollouts/x/pause", "POST", **{
        "Content-Type": "application/json", "Authorization": "Bearer s3cret"}) == 409
    # every page is the same shell; static files are served
    assert _status(server.url + f"devices/{healthy}") == 200
    assert _status(server.url + "static/uPlot.iife.min.js") == 200
    assert _status(server.url + "static/../storage.py") == 404

    # ---- /metrics, parsed by the reference parser
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(server.url + "metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    online = {s.labels["status"]: s.value for s in fams["edgepack_devices"].samples}
    assert online == {"online": N, "offline": 0, "unknown": 0}
    lat = [s for s in fams["edgepack_device_latency_seconds"].samples
           if s.labels["device"] == healthy]
    assert {s.labels["quantile"] for s in lat} == {"0.5", "0.95", "0.99"}
    assert all(0 < s.value < 1 for s in lat)
    rss = {s.labels["device"]: s.value for s in fams["edgepack_device_rss_bytes"].samples}
    assert len(rss) == N and all(v > 1e6 for v in rss.values())
    outcomes = {s.labels["outcome"]: s.value
                for s in fams["edgepack_install_outcomes"].samples if s.name.endswith("_total")}
    assert outcomes["installed"] == N - 1 and outcomes["health_failed"] == 1
    assert outcomes["rolled_back"] == 1
    lag = {s.name: s for s in fams["edgepack_collector_lag_seconds"].samples}
    assert lag["edgepack_collector_lag_seconds_count"].value > 0
    received = {s.labels["kind"]: s.value
                for s in fams["edgepack_collector_messages_received"].samples}
    assert received["telemetry"] > 0 and received["state"] >= N
    assert fams["edgepack_collector_connected"].samples[0].value == 1
    assert "edgepack_collector_queue_depth" in fams and "edgepack_collector_dropped" in fams
    info = [s for s in fams["edgepack_device_info"].samples if s.labels["device"] == healthy]
    assert info[0].labels["version"] == "1.0.0" and info[0].labels["target"] == "rpi4"
    json.dumps(ov)  # everything above was JSON-ready
