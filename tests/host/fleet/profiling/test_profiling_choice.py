"""``build --profile-on``: the devices measure the candidates and the build ships what they
measured fastest among those that pass the gate on *their* outputs. Called the way the
pipeline calls :func:`choose_on_devices`: candidate bundles built by ``edgepack.host.build``, the fp32
reference on the eval set, the model's tensor specs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from edgepack.agent.bundle import read_bundle
from edgepack.agent.errors import GateError
from edgepack.agent.protocol import Topics
from edgepack.agent.signing import load_public_keys
from edgepack.host.fleet.client import SyncClient
from edgepack.host.fleet.profiling import ProfileCache
from edgepack.host.fleet.profiling_choice import Candidate, choose_on_devices, stamp_bundle

LABELS = ("fp32", "QDQ-U8S8-pc", "QDQ-S8S8-pc", "broken")


def _choose(built, devices, keys, cache_path: Path, names: list[str], **kw):
    p = built.prepared
    return choose_on_devices(
        [Candidate(label, built.bundles[label]) for label in LABELS], devices=names,
        broker=devices.broker_url, key_path=keys.key, fleet=devices.fleet,
        input_specs=p.inputs, output_specs=p.outputs, evalset=built.evalset,
        reference=built.reference, batch=1, max_drop=1.0, rss_budget_mb=4096,
        runs=kw.pop("runs", 200), warmup=10, timeout=kw.pop("timeout", 120),
        cache=ProfileCache(cache_path), **kw)


class JobCounter:
    """Counts profile jobs published to any device of the fleet."""

    def __init__(self, url: str, fleet: str) -> None:
        self.client = SyncClient(url)
        self.topic = Topics(fleet).all_devices("jobs")

    def __enter__(self) -> JobCounter:
        self.client.connect()
        self.client.subscribe(self.topic)
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()

    def count(self, settle: float = 0.5) -> int:
        n = 0
        while self.client.get(settle) is not None:
            n += 1
        return n


def test_devices_choose_the_fastest_variant_that_passes_their_gate(
        built, devices, keys, cache_path: Path, tmp_path: Path) -> None:
    devices.start("gw-a")
    devices.start("gw-b")  # same board and runtime: measured once, on gw-a
    with JobCounter(devices.broker_url, devices.fleet) as jobs:
        choice = _choose(built, devices, keys, cache_path, ["gw-a", "gw-b"])
        assert jobs.count() == 1, "identical boards must be profiled once"
    by = {c.label: c for c in choice.candidates}
    for c in choice.candidates:
        f = c.devices["gw-a"]
        print(f"{c.label:12s} p50 {f['p50_ms']} p95 {f['p95_ms']} p99 {f['p99_ms']} load "
              f"{f['load_ms']} rss {f['peak_rss_mb']} drop {f['drop_points']} → {c.result}")
    # Every candidate was measured on the device (through gw-a for both devices).
    for c in choice.candidates:
        assert c.devices["gw-a"]["status"] == "ok", c.devices["gw-a"]
        assert c.devices["gw-b"]["measured_by"] == "gw-a"
        assert c.devices["gw-a"]["runs"] == 200
        assert c.devices["gw-a"]["top_ops"], "onnxruntime gives a per-operator breakdown"

    # The broken candidate is the fastest of all but fails the gate on the device's outputs.
    broken = by["broken"]
    assert broken.p95_ms < min(by[x].p95_ms for x in LABELS[:3])
    assert not broken.passed and "gate on gw-a" in broken.result
    assert broken.devices["gw-a"]["drop_points"] > 1.0
    assert choice.winner is not None and choice.winner.label != "broken"

    # The sound candidates pass the gate on the device and the winner is the fastest by p95.
    for label in LABELS[:3]:
        assert by[label].passed, by[label].result
        assert by[label].devices["gw-a"]["drop_points"] <= 1.0
    fastest = min((by[x] for x in LABELS[:3]), key=lambda c: c.p95_ms)
    assert choice.winner is fastest
    for c in choice.candidates:
        if c is not fastest and c.passed:
            assert c.result.startswith("slower: p95")
    # Which scheme is fastest is a measurement (bench/measurement.py), not a test: on a shared
    # machine the order can flip. The test checks that the choice follows the device's figures.

    # The shipped bundle records the figures and who measured them, signed again.
    entry = choice.manifest_entry()
    out = stamp_bundle(choice.winner.bundle, tmp_path / "final.edgepack", entry,
                       key_path=keys.key, report_extra={"device_profile": choice.to_dict()})
    final = read_bundle(out)
    final.verify(load_public_keys([keys.pub]))
    dp = final.manifest["device_profile"]
    assert dp["candidate"] == choice.winner.label
    assert dp["devices"]["gw-a"]["p95_ms"] == choice.winner.devices["gw-a"]["p95_ms"]
    assert dp["devices"]["gw-b"]["measured_by"] == "gw-a"
    report = json.loads(final.read_member("report.json"))
    assert report["device_profile"]["winner"] == choice.winner.label

    # Second build: every figure comes from the cache; no job is published at all.
    with JobCounter(devices.broker_url, devices.fleet) as jobs:
        t0 = time.monotonic()
        again = _choose(built, devices, keys, cache_path, ["gw-a", "gw-b"])
        assert jobs.count() == 0
    assert time.monotonic() - t0 < 10
    assert again.winner.label == choice.winner.label
    assert all(c.devices["gw-a"]["cached"] for c in again.candidates)
    assert again.devices["gw-a"]["status"] == "cached"


def test_device_offline_mid_job_times_out_with_partial_results(
        built, devices, keys, cache_path: Path) -> None:
    agent = devices.start("gw-off")
    seen: list[str] = []

    def on_message(dev: str, msg: dict) -> None:
        seen.append(msg["kind"])
        if msg["kind"] == "result" and agent.alive:
            agent.kill9()  # the device loses power after its first bundle

    t0 = time.monotonic()
    choice = _choose(built, devices, keys, cache_path, ["gw-off"], runs=50, timeout=8,
                     on_message=on_message)
    waited = time.monotonic() - t0
    run = choice.devices["gw-off"]
    assert run["status"] == "timeout"
    assert "went offline" in run["message"] and "1 of 4" in run["message"]
    assert "partial" in run["message"]
    assert 8 <= waited < 30
    first = choice.candidates[0]
    assert first.devices["gw-off"]["status"] == "ok"  # kept: measured before the outage
    assert first.devices["gw-off"]["p95_ms"] > 0
    for c in choice.candidates[1:]:
        assert "not measured on gw-off" in c.result and "went offline" in c.result
    assert choice.winner is None
    with pytest.raises(GateError, match="went offline"):
        choice.require()
    assert any("went offline" in m for m in choice.messages)
