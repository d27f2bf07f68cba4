"""bench/agent.py, transfer: a bundle over loopback Mosquitto vs raw mosquitto_pub/sub."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from agent_memory import bare_process, serve_and_read  # noqa: E402
from agent_rig import (  # noqa: E402
    FLEET,
    TARGET,
    Bench,
    Variant,
    deploy_and_wait,
    golden_input,
    log,
    wait_socket,
)

# --------------------------------------------------------------------------- 2. transfer

def _mosq(tool: str) -> str:
    exe = shutil.which(tool)
    if exe is None:
        raise RuntimeError(f"{tool} is not installed (apt-get install mosquitto-clients)")
    return exe


def raw_live(port: int, payload: Path, out: Path, topic: str) -> float:
    """Seconds from spawning ``mosquitto_pub -f`` to ``mosquitto_sub`` exiting with the bytes."""
    with open(out, "wb") as f:
        sub = subprocess.Popen([_mosq("mosquitto_sub"), "-h", "127.0.0.1", "-p", str(port), "-t",
                                topic, "-q", "1", "-C", "1", "-N"], stdout=f)
        time.sleep(0.5)  # subscribed long before this (not timed)
        t0 = time.perf_counter()
        pub = subprocess.Popen([_mosq("mosquitto_pub"), "-h", "127.0.0.1", "-p", str(port), "-t",
                                topic, "-q", "1", "-f", str(payload)])
        sub.wait(60)
        t = time.perf_counter() - t0
        pub.wait(60)
    return t


def raw_retained(port: int, payload: Path, out: Path, topic: str) -> float:
    """Seconds for ``mosquitto_sub -C 1`` to fetch the same bytes held as one retained message."""
    subprocess.run([_mosq("mosquitto_pub"), "-h", "127.0.0.1", "-p", str(port), "-t", topic,
                    "-q", "1", "-r", "-f", str(payload)], check=True, timeout=60)
    with open(out, "wb") as f:
        t0 = time.perf_counter()
        subprocess.run([_mosq("mosquitto_sub"), "-h", "127.0.0.1", "-p", str(port), "-t", topic,
                        "-q", "1", "-C", "1", "-N"], stdout=f, check=True, timeout=60)
        t = time.perf_counter() - t0
    subprocess.run([_mosq("mosquitto_pub"), "-h", "127.0.0.1", "-p", str(port), "-t", topic,
                    "-r", "-n"], check=True, timeout=60)
    return t


def big_bundles(bench: Bench, n: int, mb: float) -> list[Path]:
    """``n`` signed bundles of about ``mb`` MB each, successive versions (each is an upgrade)."""
    from agent_helpers import build_bundle

    # the MLP's two float32 weight matrices; zip's deflate takes ~6% off random normal floats
    hidden = int(mb * 1e6 / (4 * (64 + 10)) / 0.94)
    out = []
    for k in range(n):
        p = bench.work / "big" / f"big-1.0.{k}-{hidden}.edgepack"
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            build_bundle(p, name="big", version=f"1.0.{k}", target=TARGET, key=bench.private,
                         hidden=hidden, seed=k)
        out.append(p)
    return out


def bench_transfer(bench: Bench, reps: int, mb: float, threads: int,
                   variant: Variant | None) -> dict:
    from agent_helpers import Watcher, publish_desired

    from edgepack.agent.bundle import read_bundle
    from edgepack.host.fleet.publish import publish_bundle

    log(f"transfer: building {reps} signed bundles of ~{mb:g} MB")
    bundles = big_bundles(bench, reps, mb)
    published = []
    for p in bundles:
        r = publish_bundle(p, bench.url, key_path=bench.key, fleet=FLEET)
        published.append(r)
    agent, device, data_dir = bench.new_agent(threads)
    port = bench.broker.port
    rounds = []
    with Watcher(bench.url, FLEET, device) as w:
        w.wait_state(lambda s: s.get("online"), 30)
        for k, path in enumerate(bundles):
            b = read_bundle(path)
            payload = bench.work / "raw-out.bin"
            t_live = raw_live(port, path, payload, f"raw/live/{k}")
            live_ok = hashlib.sha256(payload.read_bytes()).hexdigest() == b.bundle_id
            t_ret = raw_retained(port, path, payload, f"raw/retained/{k}")
            ret_ok = hashlib.sha256(payload.read_bytes()).hexdigest() == b.bundle_id
            time.sleep(0.5)
            t0 = time.time()
            dep = publish_desired(bench.url, FLEET, b.bundle_id, device_id=device, name=b.name,
                                  version=b.version)
            ev = {kind: w.wait_event(kind, dep, timeout=300)
                  for kind in ("download_started", "downloaded", "verified", "installed")}
            st = ev["downloaded"].get("stats") or {}
            rounds.append({
                "bytes": path.stat().st_size,
                "raw_live_s": t_live, "raw_retained_s": t_ret,
                "raw_bytes_match": live_ok and ret_ok,
                "desired_to_download_started_s": ev["download_started"]["ts"] - t0,
                "desired_to_downloaded_s": ev["downloaded"]["ts"] - t0,
                "desired_to_verified_s": ev["verified"]["ts"] - t0,
                "desired_to_installed_s": ev["installed"]["ts"] - t0,
                "chunk_transfer_s": ev["downloaded"]["ts"] - ev["download_started"]["ts"],
                "transfer_stats": st})
            r = rounds[-1]
            log(f"transfer round {k + 1}/{reps}: raw {t_live:.3f}s (retained {t_ret:.3f}s), "
                f"agent desired->downloaded {r['desired_to_downloaded_s']:.3f}s, "
                f"chunks {r['chunk_transfer_s']:.3f}s")
    from edgepack.agent.inference import active_slot_dir

    # Memory after handling big bundles, vs a bare process holding the same 20 MB model, and
    # after a restart (which loads the committed bundle without downloading or unpacking it).
    slot = active_slot_dir(data_dir)
    sock = data_dir / "agent.sock"
    x = golden_input(slot)
    rss_after = serve_and_read(sock, agent.proc.pid, x)
    agent.stop()
    agent.start()
    wait_socket(sock)
    rss_restart = serve_and_read(sock, agent.proc.pid, x)
    agent.stop()
    bare = bare_process(slot / "model.onnx", threads)[0][1]
    proto = None
    if variant is not None:  # the same last two deployments, to the fixed agent
        pa, pdev, pdata = bench.new_agent(threads, variant=variant)
        for p in bundles[-2:]:
            deploy_and_wait(bench, pdev, p)
        proto = serve_and_read(pdata / "agent.sock", pa.proc.pid, x)
        pa.stop()

    def med(key: str) -> float:
        return float(np.median([r[key] for r in rounds]))

    size = path.stat().st_size
    summary = {k: med(k) for k in ("raw_live_s", "raw_retained_s",
                                   "desired_to_download_started_s", "desired_to_downloaded_s",
                                   "desired_to_verified_s", "desired_to_installed_s",
                                   "chunk_transfer_s")}
    st = rounds[-1]["transfer_stats"]
    return {
        "bundle_bytes": size, "chunk_size": st.get("chunk_size"), "chunks": st.get("chunks_total"),
        "window": st.get("window"), "reps": reps, "median_s": summary,
        "ratio": {"downloaded_vs_raw": summary["desired_to_downloaded_s"] / summary["raw_live_s"],
                  "verified_vs_raw": summary["desired_to_verified_s"] / summary["raw_live_s"],
                  "chunks_vs_raw": summary["chunk_transfer_s"] / summary["raw_live_s"],
                  "downloaded_vs_raw_retained": summary["desired_to_downloaded_s"]
                  / summary["raw_retained_s"]},
        "paired_ratio_downloaded_vs_raw": float(np.median(
            [r["desired_to_downloaded_s"] / r["raw_live_s"] for r in rounds])),
        "host_publish_s": float(np.median([p["seconds"] for p in published])),
        "agent_rss_after_mb": rss_after, "agent_rss_after_restart_mb": rss_restart,
        "bare_rss_same_model_mb": bare, "proto_both_rss_mb": proto, "rounds": rounds}


