"""`make demo`: the whole edgepack loop on one machine, nothing installed by hand.

1. trains a small CNN on scikit-learn's digits data and exports it to ONNX;
2. generates a fleet signing key and builds a signed int8 bundle for a Raspberry Pi 4;
3. starts the embedded MQTT broker and a local agent standing in for the Pi;
4. deploys the bundle, waits until the agent has verified, health-checked and committed it;
5. runs inferences through the agent's local endpoint and prints the telemetry it reports;
6. shuts everything down cleanly.
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


def edgepack(*args: str) -> None:
    print(f"\n$ edgepack {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "edgepack.host.cli", *args], check=True, cwd=WORK)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the broker exited early (code {proc.returncode})")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"the broker did not listen on port {port} within {timeout:g}s")


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


def build() -> str:
    from digits import write_digits_example

    if not (WORK / "digits.onnx").exists():
        print("training a small CNN on scikit-learn's digits data …", flush=True)
        write_digits_example(WORK)
    if not (WORK / "keys" / "fleet.key").exists():
        edgepack("keys", "generate", "--out", "keys")
    edgepack("build", "digits.onnx", "--target", "rpi4", "--calibration", "calib.npz",
             "--eval", "eval.npz", "--key", "keys/fleet.key", "--out", "dist")
    bundle = "dist/digits-1.0.0-rpi4.edgepack"
    edgepack("verify", bundle, "--pub", "keys/fleet.pub")
    return bundle


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


def run_fleet(bundle: str) -> None:
    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    logs = WORK / "logs"
    logs.mkdir(exist_ok=True)
    broker = agent = fleet = None
    try:
        print(f"\n$ edgepack broker --port {port} &", flush=True)
        with open(logs / "broker.log", "wb") as log:
            broker = subprocess.Popen([sys.executable, "-m", "edgepack.host.cli", "broker",
                                       "--port", str(port)], cwd=WORK, stdout=log,
                                      stderr=subprocess.STDOUT)
        wait_port(port, broker)
        from edgepack.host.fleet.server import FleetServer, ServeConfig

        print(f"\n$ edgepack fleet serve --broker {url} --db sqlite:///fleet.db "
              "--http 127.0.0.1:0 &", flush=True)
        for old in WORK.glob("fleet.db*"):
            old.unlink()  # each demo starts with an empty fleet database
        fleet = FleetServer(ServeConfig(broker=url, db=f"sqlite:///{WORK / 'fleet.db'}",
                                        http=("127.0.0.1", 0)))
        fleet.start()
        print(f"dashboard: {fleet.url}")
        data_dir = WORK / "device"
        edgepack("agent", "init", "--board", "rpi4", "--device-id", DEVICE, "--broker", url,
                 "--pub", "keys/fleet.pub", "--data-dir", str(data_dir), "--out",
                 "device.toml", "--force")
        conf = WORK / "device.toml"
        # Report every 2 s instead of 30 s so the demo shows telemetry quickly.
        text = conf.read_text()
        if "[telemetry]" in text:
            text = re.sub(r"(?m)^interval_s = .*$", "interval_s = 2.0", text)
        else:
            text += "\n[telemetry]\ninterval_s = 2.0\n"
        conf.write_text(text)
        print("\n$ edgepack-agent --config device.toml &", flush=True)
        with open(logs / "agent.log", "wb") as log:
            agent = subprocess.Popen([sys.executable, "-m", "edgepack.agent.daemon", "--config",
                                      str(conf)], cwd=WORK, stdout=log, stderr=subprocess.STDOUT)
        edgepack("deploy", bundle, "--device", DEVICE, "--broker", url, "--key",
                 "keys/fleet.key", "--wait", "180")
        edgepack("fleet", "status", "--broker", url)
        serve_and_measure(url, data_dir)
        show_dashboard(fleet.url)
    finally:
        if fleet is not None:
            fleet.stop()
            print("fleet server stopped")
        stop(agent, "agent")
        stop(broker, "broker")
    print(f"logs: {logs / 'agent.log'}, {logs / 'broker.log'}")


def main() -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    WORK.mkdir(exist_ok=True)
    run_fleet(build())
    print("\ndemo finished: built, signed, shipped, verified, health-checked, served, measured.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
