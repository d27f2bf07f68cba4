"""Disk full, on a small tmpfs mounted as the agent's data directory (needs root: skipped
otherwise, since a quota cannot be simulated without mounting): a clean refusal before the
download, an error event when the disk fills during it, the old bundle keeps serving, and the
download resumes from what is on disk once space is back."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from agent_helpers import agent_config, publish_desired
from reliability_helpers import CrashableAgent, FaultProxy, Recorder, serves, wait_for

from edgepack.host.fleet.publish import publish_bundle

pytestmark = pytest.mark.broker
CHUNK = 16 * 1024


@pytest.fixture
def small_disk(tmp_path: Path):
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("a small tmpfs needs root (mount -t tmpfs); without it a full disk cannot "
                    "be simulated")
    mnt = tmp_path / "dev1" / "data"
    mnt.mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(directory: Path, leave: int = 0) -> Path:
    """Take all free space but ``leave`` bytes."""
    filler = directory / "filler.bin"
    free = shutil.disk_usage(directory).free - leave
    with open(filler, "ab") as f, contextlib.suppress(OSError):
        block = b"\0" * 65536
        while free > 0:
            f.write(block[:min(len(block), free)])
            f.flush()
            free -= len(block)
    return filler


def test_disk_full_refusal_and_resume(small_disk, mosquitto, fleet, rel_bundles, rel_keys,
                                      scenario):
    rec = scenario("disk full (tmpfs) before/during download")
    data = small_disk
    url = mosquitto.url
    old = publish_bundle(rel_bundles.get("1.0.0"), url, key_path=rel_keys.key, fleet=fleet,
                         chunk_size=CHUNK)["bundle_id"]
    new = publish_bundle(rel_bundles.medium("2.0.0"), url, key_path=rel_keys.key, fleet=fleet,
                         chunk_size=CHUNK)["bundle_id"]
    proxy = FaultProxy(mosquitto.port)
    cfg = agent_config(data.parent, proxy.url, fleet, pub=rel_keys.pub,
                       transfer={"window": 4, "min_free_mb": 0.5, "retry_s": 0.5,
                                 "max_retries": 50})
    agent = CrashableAgent(cfg).start()
    try:
        with Recorder(url, fleet) as r:
            dep = publish_desired(url, fleet, old)
            r.wait_event("installed", dep, timeout=30)

            # 1. not enough room before the download: refused up front, nothing written
            filler = _fill(data, leave=2 * 1024**2)
            t0 = time.monotonic()
            dep2 = publish_desired(url, fleet, new, version="2.0.0")
            err = r.wait(lambda: next((e for e in r.events if e["kind"] == "error"
                                       and e.get("deployment_id") == dep2), None), 20,
                         "a disk-space error event")
            refused = "disk space" in err["detail"] and not any(
                p.suffix == ".part" for p in (data / "downloads").iterdir())
            serving = serves(data, old)
            rec.run(refused and serving and agent.alive, note=None if refused else err["detail"])
            assert refused, err
            assert serving and agent.alive

            # 2. space comes back, the download starts; the disk fills up in the middle of it
            filler.unlink()
            proxy.delay_s = 0.1
            r.wait_event("download_progress", dep2, timeout=30)
            filler = _fill(data)
            err = r.wait(lambda: next((e for e in r.events if e["kind"] == "error"
                                       and e.get("deployment_id") == dep2
                                       and "space" in e["detail"].lower()
                                       and "disk space for bundle" not in e["detail"]), None),
                         30, "an error event for the full disk")
            time.sleep(1.0)  # a few retries against the full disk
            alive_full = agent.alive and serves(data, old)
            state_ok = _state_names(data, old)
            # a restart (power cut, crash) while the disk is still full: it comes up and serves
            agent.kill9()
            agent.start()
            restarted = wait_for(lambda: serves(data, old), 20, "the old bundle served after a "
                                 "restart on a full disk")
            alive_full = alive_full and restarted and agent.alive
            # 3. space is back: the download resumes from disk and installs
            filler.unlink()
            proxy.delay_s = 0.0
            t_space = time.monotonic()
            r.wait_event("installed", dep2, timeout=60)
            wait_for(lambda: serves(data, new), 10, "the new bundle served")
            recovery = time.monotonic() - t_space
            resumed = [e for e in r.events if e["kind"] == "download_started"
                       and e.get("deployment_id") == dep2 and e.get("resumed_chunks")]
            t_end = time.time()
            r.wait(lambda: any(m["ts"] > t_end for m in r.telemetry), 10, "telemetry")
            gaps = r.gaps()  # events and telemetry queued while the disk was full arrive too
            ok = alive_full and state_ok and bool(resumed) and not gaps and r.in_order()
            rec.run(ok, recovery_s=recovery, lost=len(gaps),
                    note=f"error reported: {err['detail'][:60]}…; resumed with "
                    f"{resumed[0]['resumed_chunks'] if resumed else 0} chunks on disk")
            assert alive_full, agent.log_text()[-3000:]
            assert state_ok
            assert resumed, "the download started over instead of resuming"
            assert not gaps and r.in_order(), gaps
            assert time.monotonic() - t0 < 120
    finally:
        agent.stop()
        proxy.close()


def _state_names(data: Path, bundle_id: str) -> bool:
    import json

    s = json.loads((data / "state.json").read_text())
    return s["slots"][s["active"]]["bundle_id"] == bundle_id
