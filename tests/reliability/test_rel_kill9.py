"""kill -9 of the agent at every install state and at random moments: after a restart the device
runs the old or the new bundle, never neither, and its state file is valid."""

from __future__ import annotations

import contextlib
import json
import os
import random
import time

import pytest
from agent_helpers import Watcher, agent_config, publish_desired
from reliability_helpers import (
    CrashableAgent,
    Recorder,
    check_disk_state,
    save_scenario,
    serves,
    wait_for,
)

from edgepack.agent.crashpoint import POINTS
from edgepack.host.fleet.publish import publish_bundle

pytestmark = pytest.mark.broker
CHUNK = 1024


def _phase_on_disk(data_dir) -> str:
    try:
        return json.loads((data_dir / "state.json").read_text()).get("phase", "?")
    except (OSError, ValueError):
        return "unreadable"


def test_kill9_at_every_install_state(tmp_path, mosquitto, fleet, rel_bundles, rel_keys,
                                      scenario):
    rec = scenario("kill -9 at each install state")
    url = mosquitto.url
    versions = {p: f"{i + 2}.0.0" for i, p in enumerate(POINTS)}
    ids = {}
    for v in ["1.0.0", *versions.values()]:
        info = publish_bundle(rel_bundles.get(v), url, key_path=rel_keys.key, fleet=fleet,
                              chunk_size=CHUNK)
        ids[v] = info["bundle_id"]
        assert info["chunks"] >= 12  # several windows: a kill lands mid-transfer
    cfg = agent_config(tmp_path / "dev1", url, fleet, pub=rel_keys.pub)
    data = cfg.parent / "data"
    agent = CrashableAgent(cfg)
    failures = []
    try:
        with Watcher(url, fleet) as w:
            agent.start()
            dep = publish_desired(url, fleet, ids["1.0.0"])
            w.wait_event("installed", dep, timeout=30)
            agent.stop()
            old = ids["1.0.0"]
            for point, version in versions.items():
                new = ids[version]
                # mid-transfer: after 6 chunks; elsewhere the first time the point is reached
                agent.start(crash_at=point, skip=6 if point == "downloading" else 0)
                dep = publish_desired(url, fleet, new, version=version)
                rc = agent.wait_exit(40)
                ok, why, active = check_disk_state(data, {old, new})
                if rc != -9:
                    ok, why = False, f"agent did not die at {point} (rc {rc})"
                expect = new if point == "committed" else old
                if ok and active != expect:
                    ok, why = False, f"after a kill at {point} {active[:12]} is active, " \
                        f"expected {expect[:12]}"
                t_restart = time.monotonic()
                seen = len(w.states)
                agent.start()
                try:
                    w.wait_event("installed", dep, timeout=40)
                    w.wait_state(lambda s, n=new: s.get("online") and (s.get("active") or {})
                                 .get("bundle_id") == n, timeout=20, since=seen)
                    served = wait_for(lambda n=new: serves(data, n), 10, "the new model served")
                except TimeoutError as exc:
                    ok, why, served = False, f"after a kill at {point}: {exc}", False
                recovery = time.monotonic() - t_restart
                if point == "downloading" and ok:
                    resumed = [e for e in w.events if e["kind"] == "download_started"
                               and e.get("deployment_id") == dep and e.get("resumed_chunks")]
                    if not resumed:
                        ok, why = False, "the download did not resume from disk"
                rec.run(ok and bool(served), recovery_s=recovery, note=None if ok else why)
                if not ok:
                    failures.append(why)
                agent.stop()
                old = new
    finally:
        agent.stop()
    assert not failures, failures
    assert rec.runs == len(POINTS)


def test_kill9_at_random_moments(tmp_path, mosquitto, fleet, rel_bundles, rel_keys, scenario):
    """Deploy v1, v2, v1, v2 … (allow_downgrade) and SIGKILL the agent at a random moment of
    each start-up/download/verify/stage/health/commit cycle, restarting it each time."""
    rec = scenario("kill -9 at random moments")
    kills = int(os.environ.get("EDGEPACK_RELIABILITY_KILLS", "52"))
    rng = random.Random(int(os.environ.get("EDGEPACK_RELIABILITY_SEED", "6")))
    url = mosquitto.url
    ids = [publish_bundle(rel_bundles.get(v), url, key_path=rel_keys.key, fleet=fleet,
                          chunk_size=CHUNK)["bundle_id"] for v in ("1.0.0", "2.0.0")]
    names = {ids[0]: "1.0.0", ids[1]: "2.0.0"}
    cfg = agent_config(tmp_path / "dev1", url, fleet, pub=rel_keys.pub,
                       transfer={"window": 2}, health={"latency_runs": 5, "warmup_runs": 1})
    data = cfg.parent / "data"
    agent = CrashableAgent(cfg)
    failures: list[str] = []
    phases: dict[str, int] = {}
    try:
        with Recorder(url, fleet) as w:
            agent.start()
            publish_desired(url, fleet, ids[0], allow_downgrade=True)
            w.wait_active(ids[0], timeout=30)
            target = 1
            publish_desired(url, fleet, ids[target], version=names[ids[target]],
                            allow_downgrade=True)
            allowed = {ids[0], ids[1]}
            seen = 0
            for _ in range(kills):
                if rng.random() < 0.2:  # while starting up
                    time.sleep(rng.uniform(0.0, 0.8))
                else:  # while working: downloading, verifying, staging, health check, commit
                    with contextlib.suppress(TimeoutError):
                        w.wait_state(lambda s: s.get("online"), timeout=10, since=seen)
                    time.sleep(rng.uniform(0.0, 1.0))
                agent.kill9()
                ok, why, active = check_disk_state(data, allowed)
                phase = _phase_on_disk(data)
                phases[phase] = phases.get(phase, 0) + 1
                if active is None:
                    ok, why = False, "no bundle active after a kill: " + why
                rec.run(ok, note=None if ok else why)
                if not ok:
                    failures.append(why)
                if active == ids[target]:  # that deployment completed: deploy the other one
                    target = 1 - target
                    publish_desired(url, fleet, ids[target], version=names[ids[target]],
                                    allow_downgrade=True)
                seen = len(w.states)
                agent.start()
            t0 = time.monotonic()
            wait_for(lambda: serves(data, ids[target]), 40, "the final model served")
            rec.recovery_s = time.monotonic() - t0  # from the last restart to the new model
            # nothing the outbox took was lost or renumbered across the kills
            t_end = time.time()
            w.wait(lambda: any(m["ts"] > t_end for m in w.telemetry), 10, "telemetry")
            gaps = w.gaps()
            rec.lost += len(gaps)
            if gaps or w.conflicts:
                failures.append(f"{len(gaps)} messages lost, {w.conflicts} seqs reused")
                rec.failures += 1
            rec.notes.append("killed in phase: " + ", ".join(
                f"{k} {v}" for k, v in sorted(phases.items())))
            save_scenario(rec)
    finally:
        agent.stop()
    assert not failures, failures
    assert rec.runs == kills  # 52 in CI: the issue asks for at least 50
