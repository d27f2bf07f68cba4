"""`make demo`: the whole edgepack loop on one machine, nothing installed by hand.

1. trains a small CNN on scikit-learn's digits data and exports it to ONNX;
2. generates a fleet signing key and builds a signed int8 bundle for a Raspberry Pi 4;
3. starts the embedded MQTT broker, the fleet server and a local agent standing in for the Pi
   (its device key enrolled with the fleet server, so its signed reports count);
4. deploys the bundle, waits until the agent has verified, health-checked and committed it;
5. runs inferences through the agent's local endpoint and prints the telemetry it reports;
6. shuts everything down cleanly.

The host side is written with edgepack's Python API (``import edgepack.host as ep``); each call
is printed as it runs. The agent runs as its own process, as it would on the device.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".demo"
DEVICE = "demo-pi"
sys.path.insert(0, str(ROOT / "examples"))


def say(call: str) -> None:
    print(f"\n>>> {call}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen | None, name: str) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
        print(f"{name} stopped (exit {proc.returncode})")
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        print(f"{name} did not stop on SIGTERM; killed")


def build() -> Path:
    """Train the example model, make the fleet key, build and verify the signed bundle."""
    from digits import write_digits_example

    import edgepack.host as ep
    from edgepack.agent.signing import load_public_keys

    if not (WORK / "digits.onnx").exists():
        print("training a small CNN on scikit-learn's digits data …", flush=True)
        write_digits_example(WORK)
    if not (WORK / "keys" / "fleet.key").exists():
        say('ep.generate_keys("keys")')
        ep.generate_keys(WORK / "keys")
    say('ep.build("digits.onnx", target="rpi4", calibration="calib.npz", eval="eval.npz", '
        'key="keys/fleet.key", out="dist")')
    res = ep.build(str(WORK / "digits.onnx"), target="rpi4", calibration=str(WORK / "calib.npz"),
                   eval=str(WORK / "eval.npz"), key=str(WORK / "keys" / "fleet.key"),
                   out=str(WORK / "dist"))
    m = res.report.metrics
    print(f"{res.path.name}: {res.manifest['optimization']['mode']}, "
          f"{m['size']['ratio']:.2f}x smaller than fp32, accuracy drop "
          f"{m['accuracy']['drop_points']:.2f} points, bundle id {res.bundle_id[:16]}…")
    key_id = ep.read_bundle(res.path).verify(load_public_keys([WORK / "keys" / "fleet.pub"]))
    print(f"signature verified (key {key_id})")
    return res.path


def serve_and_measure(url: str, data_dir: Path) -> None:
    """Inferences through the agent's endpoint, then the telemetry the device reports."""
    import numpy as np

    from edgepack.agent.inference import Client
    from edgepack.agent.protocol import Topics, decode
    from edgepack.host.fleet.client import SyncClient

    with np.load(WORK / "eval.npz") as z:
        names = [k for k in z.files if k != "labels"]
        x, labels = z[names[0]], z["labels"]
    client = Client(f"unix:{data_dir / 'agent.sock'}")
    info = client.info()
    name = info["inputs"][0]["name"]
    print(f"\nrunning {len(x)} inferences through the agent's endpoint "
          f"({info['name']} {info['version']}) …", flush=True)
    correct = 0
    for i in range(len(x)):
        out = client.predict({name: x[i:i + 1]})
        correct += int(np.argmax(next(iter(out.values()))) == labels[i])
    print(f"accuracy on the device: {100 * correct / len(x):.2f}% ({len(x)} images)")

    print("\nwaiting for telemetry from the device …", flush=True)
    topics = Topics("default")
    with SyncClient(url, timeout=30) as c:
        c.subscribe(topics.telemetry(DEVICE))
        deadline = time.monotonic() + 20
        shown = 0
        while time.monotonic() < deadline and not shown:
            m = c.get(deadline - time.monotonic())
            if m is None:
                break
            t = decode(m[1], "telemetry")
            if not t.get("inferences"):
                continue
            shown += 1
            lat = t.get("latency_ms") or {}
            print(f"telemetry: {t.get('inferences')} inferences in {t.get('window_s')} s, "
                  f"p50 {lat.get('p50')} ms, p95 {lat.get('p95')} ms, p99 {lat.get('p99')} ms, "
                  f"RSS {t.get('rss_mb')} MB, CPU {t.get('cpu_percent')} %, disk free "
                  f"{t.get('disk_free_mb')} MB")
        if not shown:
            print("no telemetry with inferences arrived within 20 s")
        c.subscribe(topics.state(DEVICE))
        m = c.get(5)
        if m:
            state = json.loads(m[1])
            active = state.get("active") or {}
            print(f"device state: online={state.get('online')} active={active.get('name')} "
                  f"{active.get('version')} in slot {active.get('slot')}")


def show_dashboard(base: str) -> None:
    """What the fleet dashboard's JSON API says about the demo device."""
    import urllib.request

    deadline = time.monotonic() + 15
    while True:
        with urllib.request.urlopen(f"{base}api/devices/{DEVICE}", timeout=5) as r:
            dev = json.load(r)
        if dev.get("telemetry") or time.monotonic() > deadline:
            break
        time.sleep(1)
    with urllib.request.urlopen(f"{base}api/devices/{DEVICE}/telemetry", timeout=5) as r:
        series = json.load(r).get("series", {})
    busy = [i for i, n in enumerate(series.get("inferences") or []) if n]
    t = {k: series[k][busy[-1]] for k in ("p50", "p95", "rss_mb")} if busy else {}
    kinds = [e.get("kind") for e in reversed(dev.get("events") or [])]
    print(f"\nfleet dashboard: {base}devices/{DEVICE} (JSON behind it: "
          f"{base}api/devices/{DEVICE})")
    print(f"  online {dev.get('online')}, in sync with its desired state {dev.get('in_sync')}, "
          f"busiest window p50 {t.get('p50')} ms / p95 {t.get('p95')} ms, "
          f"RSS {t.get('rss_mb')} MB")
    print(f"  install events the collector stored: {' → '.join(k for k in kinds if k)}")
    print(f"  reports signed by its enrolled key {str(dev.get('key_id'))[:16]}: "
          f"authenticated {dev.get('authenticated')}, refused {dev.get('unauthenticated')}")


def run_fleet(bundle: Path) -> None:
    import edgepack.host as ep
    from edgepack.host.fleet.identity import enroll

    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    logs = WORK / "logs"
    logs.mkdir(exist_ok=True)
    agent = None
    say(f"ep.EmbeddedBroker(port={port}).start()")
    broker = ep.EmbeddedBroker(port=port).start()
    try:
        for old in WORK.glob("fleet.db*"):
            old.unlink()  # each demo starts with an empty fleet database
        say(f'ep.FleetServer(ep.ServeConfig(broker="{url}", db="sqlite:///fleet.db")).start()')
        with ep.FleetServer(ep.ServeConfig(broker=url, db=f"sqlite:///{WORK / 'fleet.db'}",
                                           http=("127.0.0.1", 0))) as fleet:
            print(f"dashboard: {fleet.url}")
            data_dir = WORK / "device"
            say(f'ep.init_agent("rpi4", "{DEVICE}", broker="{url}", pub=["keys/fleet.pub"], '
                'out="device.toml")')
            setup = ep.init_agent("rpi4", DEVICE, broker=url,
                                  pub=[WORK / "keys" / "fleet.pub"], data_dir=data_dir,
                                  out=WORK / "device.toml", force=True)
            # the fleet server believes only reports signed by enrolled device keys
            say('enroll(fleet.store, "enrollment.json")   # edgepack fleet enroll')
            enroll(fleet.store, setup.enrollment, groups=["demo"])
            print(f"  {DEVICE} enrolled with key {setup.enrollment['keyid'][:16]}")
            conf = WORK / "device.toml"
            # Report every 2 s instead of 30 s so the demo shows telemetry quickly.
            text = conf.read_text()
            if "[telemetry]" in text:
                text = re.sub(r"(?m)^interval_s = .*$", "interval_s = 2.0", text)
            else:
                text += "\n[telemetry]\ninterval_s = 2.0\n"
            conf.write_text(text)
            print("\n$ edgepack-agent --config device.toml &   # the device", flush=True)
            with open(logs / "agent.log", "wb") as log:
                agent = subprocess.Popen([sys.executable, "-m", "edgepack.agent.daemon",
                                          "--config", str(conf)], cwd=WORK, stdout=log,
                                         stderr=subprocess.STDOUT)
            say(f'ep.deploy("{bundle.relative_to(WORK)}", device="{DEVICE}", broker=…, '
                'key="keys/fleet.key", wait=180)')
            dep = ep.deploy(bundle, device=DEVICE, broker=url, key=WORK / "keys" / "fleet.key",
                            wait=180)
            print(f"deployment {dep.deployment_id}: active={dep.active} in slot {dep.slot} "
                  f"after {dep.waited_s:.1f} s")
            if not dep.active:
                raise SystemExit(f"the device did not activate the bundle; see {logs}")
            say("ep.fleet_status(broker=…)")
            for d in ep.fleet_status(broker=url):
                print(f"  {d.device}: {d.status}, runs {d.bundle_name} {d.bundle_version}, "
                      f"in sync {d.in_sync}")
            serve_and_measure(url, data_dir)
            show_dashboard(fleet.url)
        print("fleet server stopped")
    finally:
        stop(agent, "agent")
        broker.stop()
        print("broker stopped")
    print(f"agent log: {logs / 'agent.log'}")


def main() -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    WORK.mkdir(exist_ok=True)
    run_fleet(build())
    print("\ndemo finished: built, signed, shipped, verified, health-checked, served, measured.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
