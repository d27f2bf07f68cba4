"""Benchmark the fleet collector's ingest: N simulated devices, one telemetry message per second
each, against a real Mosquitto, into SQLite and into PostgreSQL (issue 5, item 7).

For each database and each N of a ladder, one trial:

1. a fresh database and a collector (this process, as ``fleet serve`` runs it);
2. ``N`` simulated devices in ``--sim-procs`` other processes (``fleet simulate``'s engine: each a
   real MQTT connection; telemetry QoS 1, as agents send it), all connected before measuring;
3. ``--duration`` seconds of telemetry at 1 msg/s per device, then the devices stop;
4. **lost** = telemetry messages the devices sent minus rows in the database once the collector
   has drained; **lag** = commit time minus the device's timestamp, per message (same clock).

A trial passes with zero lost messages and a p99 lag under 1 s. The ladder stops at the first
failure; the answer is the largest passing N. The baseline, measured in the same run at that N,
is a bare paho subscriber that only counts what the broker delivers (no decoding, no database):
the ratio says what storing costs on top of MQTT delivery.

    python bench/collector.py                              # SQLite and PostgreSQL
    python bench/collector.py --db sqlite --ladder 1000,2000,4000 --duration 20
    python bench/collector.py --json out.json

The PostgreSQL cluster is a throwaway one (``tests/host/fleet/server/pgcluster.py``) with fsync on.

Measured on the 2-core development machine (shared with other jobs, load average 4-5), 20 s
trials, everything — Mosquitto, simulator, collector, PostgreSQL — on the same two cores:

=========== ========= ====== ========== ========== =====================================
database    devices   lost   p50 lag    p99 lag
=========== ========= ====== ========== ========== =====================================
SQLite      2000      0      0.003 s    0.025 s
SQLite      4000      0      0.145 s    0.522 s    largest passing N
SQLite      5000      0      0.393 s    0.939 s    fails: the simulator fell below 1 msg/s
PostgreSQL  2000      0      0.014 s    0.064 s
PostgreSQL  5000      0      0.100 s    0.475 s    largest passing N
PostgreSQL  6000      0      0.182 s    1.792 s    fails: p99 lag
=========== ========= ====== ========== ========== =====================================

Bare subscriber at 5000 devices: p99 delivery lag 0.254 s (SQLite 3.7x, PostgreSQL 1.9x).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "host" / "fleet" / "server"))

GOAL_N = 2000
MAX_LAG_S = 1.0


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- simulator process

def sim_worker(args: argparse.Namespace) -> int:
    """Child process: run the devices, say READY when all are online, stop after duration."""
    from edgepack.host.fleet.simulator import SimOptions, Simulator

    sim = Simulator(args.broker, SimOptions(
        devices=args.devices, fleet=args.fleet, interval_s=1.0, connect_rate=1500.0,
        prefix=args.prefix, keepalive=120, enroll_db=args.enroll_db)).start()
    if not sim.wait_online(timeout=120):
        print(json.dumps({"error": f"only {sim.online_count()} of {args.devices} online"}),
              flush=True)
        sim.stop()
        return 1
    time.sleep(1.5)  # every device has had its first telemetry tick scheduled
    start_sent = sim.stats()["telemetry_sent"]
    print(json.dumps({"ready": True, "sent": start_sent}), flush=True)
    t0 = time.monotonic()
    time.sleep(args.duration)
    measured = sim.stats()["telemetry_sent"] - start_sent
    rate = measured / (time.monotonic() - t0)
    sim.stop()
    st = sim.stats()
    print(json.dumps({"done": True, "sent": st["telemetry_sent"], "rate": rate,
                      "counters": st["counters"]}), flush=True)
    return 0


class _Sims:
    """The simulated devices, split over ``procs`` processes (``b0-…``, ``b1-…``)."""

    def __init__(self, broker: str, fleet: str, n: int, duration: float, procs: int,
                 db_url: str | None) -> None:
        self.procs: list[subprocess.Popen] = []
        self.lines: list[queue.Queue] = []
        self._got: list[dict | None] = [None] * procs
        for k in range(procs):
            share = n // procs + (1 if k < n % procs else 0)
            proc = subprocess.Popen(
                [sys.executable, __file__, "--sim-worker", "--broker", broker, "--fleet", fleet,
                 "--devices", str(share), "--duration", str(duration), "--prefix", f"b{k}",
                 *(["--enroll-db", db_url] if db_url else [])],  # enrolled: their reports count
                stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            lines: queue.Queue = queue.Queue()
            threading.Thread(target=self._pump, args=(proc, lines), daemon=True).start()
            self.procs.append(proc)
            self.lines.append(lines)

    @staticmethod
    def _pump(proc: subprocess.Popen, lines: queue.Queue) -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put("")

    def _read(self, k: int, timeout: float) -> dict | None:
        try:
            line = self.lines[k].get(timeout=timeout)
        except queue.Empty:
            return None
        if not line:
            raise RuntimeError(f"a simulator process exited ({self.procs[k].wait()})")
        return json.loads(line)

    def wait_all(self, timeout: float) -> dict[str, Any] | None:
        """Every process's next line, summed; None after ``timeout`` (lines already read are
        kept for the next call)."""
        deadline = time.monotonic() + timeout
        for k in range(len(self.procs)):
            if self._got[k] is None:
                self._got[k] = self._read(k, max(0.0, deadline - time.monotonic()))
                if self._got[k] is None:
                    return None
        got, self._got = self._got, [None] * len(self.procs)
        bad = next((m for m in got if "error" in m), None)
        if bad is not None:
            return bad
        return {"sent": sum(m["sent"] for m in got), "rate": sum(m.get("rate", 0) for m in got)}

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --------------------------------------------------------------------------- trials

def trial(broker: str, db_url: str, n: int, duration: float, procs: int = 1) -> dict[str, Any]:
    """One run of N devices into one fresh database."""
    from edgepack.host.fleet.collector import Collector, CollectorOptions, LagStats
    from edgepack.host.fleet.storage import open_store

    fleet = f"b{uuid.uuid4().hex[:8]}"
    storage = open_store(db_url)
    collector = Collector(broker, storage, CollectorOptions(
        fleets=(fleet,), client_id=f"bench-{fleet}", fetch_reports=False))
    collector.lag = LagStats(recent=2_000_000)
    collector.start()
    if not collector.wait_connected(10):
        raise RuntimeError("the collector did not connect")
    sims = _Sims(broker, fleet, n, duration, procs, db_url)
    try:
        ready = sims.wait_all(180)
        if ready is None:
            raise RuntimeError("the simulator did not get its devices online")
        if "error" in ready:
            return {"n": n, "ok": False, "error": ready["error"]}
        collector.lag.reset_recent()
        collector.ingest_lag.reset_recent()
        depth_max = 0
        t_end = time.monotonic() + duration + 30
        done = None
        deadline_done = time.monotonic() + duration
        while time.monotonic() < deadline_done:
            depth_max = max(depth_max, collector.queue_depth)
            time.sleep(0.2)
        while done is None and time.monotonic() < t_end:
            depth_max = max(depth_max, collector.queue_depth)
            done = sims.wait_all(0.5)
        if done is None:
            raise RuntimeError("the simulator did not finish")
        sent = done["sent"]
        t0 = time.monotonic()
        while storage.telemetry.count(fleet) < sent and time.monotonic() - t0 < 30:
            time.sleep(0.2)
        collector.wait_idle(10)
        stored = storage.telemetry.count(fleet)
        lag = collector.lag.quantiles((0.5, 0.95, 0.99))
        ingest = collector.ingest_lag.quantiles((0.5, 0.99))
        result = {
            "n": n, "sent": sent, "stored": stored, "lost": sent - stored,
            "sim_rate_msg_s": round(done["rate"], 1),
            "lag_p50_s": round(lag["p50"], 4), "lag_p95_s": round(lag["p95"], 4),
            "lag_p99_s": round(lag["p99"], 4), "lag_max_s": round(collector.lag.max, 4),
            "ingest_lag_p99_s": round(ingest["p99"], 4), "queue_max": depth_max,
            "db_errors": collector.db_errors, "dropped": dict(collector.dropped),
        }
        result["ok"] = result["lost"] == 0 and result["lag_p99_s"] < MAX_LAG_S \
            and done["rate"] >= 0.95 * n
        if done["rate"] < 0.95 * n:
            result["note"] = "the simulator could not keep 1 msg/s per device"
        return result
    finally:
        sims.stop()
        collector.stop()
        storage.close()


def baseline(broker: str, n: int, duration: float, procs: int = 1) -> dict[str, Any]:
    """A bare paho subscriber: count deliveries and their lag, store nothing."""
    import paho.mqtt.client as mqtt

    from edgepack.agent.mqtt import parse_broker_url

    cfg = parse_broker_url(broker)
    fleet = f"b{uuid.uuid4().hex[:8]}"
    lags: list[float] = []
    got = [0]

    def on_message(c: Any, u: Any, msg: Any) -> None:
        got[0] += 1
        try:
            ts = json.loads(msg.payload)["ts"]
            lags.append(time.time() - ts)
        except (ValueError, KeyError):
            pass

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-bare-{fleet}",
                    protocol=mqtt.MQTTv311)
    c.on_message = on_message
    c.connect(cfg.host, cfg.port)
    c.subscribe(f"edgepack/v1/{fleet}/devices/+/telemetry", 1)
    c.loop_start()
    sims = _Sims(broker, fleet, n, duration, procs, None)
    try:
        sims.wait_all(180)
        lags.clear()
        done = sims.wait_all(duration + 60)
        time.sleep(2)
    finally:
        sims.stop()
        c.disconnect()
        c.loop_stop()
    lags.sort()
    p99 = lags[int(0.99 * (len(lags) - 1))] if lags else float("nan")
    return {"n": n, "sent": done["sent"], "received": got[0], "lag_p99_s": round(p99, 4),
            "lag_p50_s": round(lags[len(lags) // 2], 4) if lags else None}


def ladder(broker: str, name: str, make_db: Any, steps: list[int], duration: float,
           procs: int) -> dict[str, Any]:
    results = []
    best = 0
    for n in steps:
        log(f"{name}: {n} devices for {duration:g}s…")
        r = trial(broker, make_db(), n, duration, procs)
        results.append(r)
        log(f"{name}: n={n} lost={r.get('lost')} p99 lag={r.get('lag_p99_s')}s "
            f"queue max={r.get('queue_max')} -> {'pass' if r['ok'] else 'FAIL'}"
            + (f" ({r['note']})" if r.get("note") else ""))
        if not r["ok"]:
            break
        best = n
    return {"database": name, "largest_n": best, "trials": results}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", default="sqlite,postgresql",
                   help="comma-separated: sqlite, postgresql")
    p.add_argument("--ladder", default="1000,2000,3000,4000,5000,6000,8000",
                   help="device counts to try, in order")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per trial")
    p.add_argument("--sim-procs", type=int, default=1,
                   help="processes the simulated devices are split over")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--json", dest="json_out", help="also write the results here ('-': stdout)")
    p.add_argument("--sim-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--broker", help=argparse.SUPPRESS)
    p.add_argument("--fleet", help=argparse.SUPPRESS)
    p.add_argument("--devices", type=int, help=argparse.SUPPRESS)
    p.add_argument("--prefix", default="b", help=argparse.SUPPRESS)
    p.add_argument("--enroll-db", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.sim_worker:
        return sim_worker(args)

    import resource

    from brokers import start_mosquitto

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children and Mosquitto inherit
    steps = [int(x) for x in args.ladder.split(",") if x.strip()]
    backends = [b.strip() for b in args.db.split(",") if b.strip()]
    broker = start_mosquitto()
    tmp = Path(tempfile.mkdtemp(prefix="edgepack-bench-"))
    cluster = None
    out: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                       "platform": platform.platform()},
                           "duration_s": args.duration, "goal_n": GOAL_N,
                           "max_lag_s": MAX_LAG_S, "results": []}
    try:
        for b in backends:
            if b == "sqlite":
                def make_db() -> str:
                    return f"sqlite:///{tmp / (uuid.uuid4().hex[:8] + '.db')}"
            elif b == "postgresql":
                from pgcluster import start_cluster

                if cluster is None:
                    cluster = start_cluster(durable=True)

                def make_db(c: Any = cluster) -> str:
                    return c.fresh_database(f"b{uuid.uuid4().hex[:10]}")
            else:
                raise SystemExit(f"unknown --db {b}")
            out["results"].append(ladder(broker.url, b, make_db, steps, args.duration,
                                          args.sim_procs))
        best = max((r["largest_n"] for r in out["results"]), default=0)
        if not args.no_baseline and best:
            log(f"baseline: a bare subscriber at {best} devices…")
            out["baseline"] = baseline(broker.url, best, args.duration, args.sim_procs)
    finally:
        broker.stop()
        if cluster is not None:
            cluster.destroy()

    print(f"\ncollector ingest, {args.duration:g} s per trial, 1 msg/s per device, QoS 1, "
          f"{os.cpu_count()} CPUs; pass = 0 lost and p99 lag < {MAX_LAG_S:g} s")
    print(f"{'database':<11}{'devices':>8}{'sent':>9}{'lost':>6}{'p50 s':>8}{'p99 s':>8}"
          f"{'max s':>8}{'queue max':>10}  result")
    for r in out["results"]:
        for t in r["trials"]:
            print(f"{r['database']:<11}{t['n']:>8}{t.get('sent', 0):>9}{t.get('lost', '-'):>6}"
                  f"{t.get('lag_p50_s', 0):>8.3f}{t.get('lag_p99_s', 0):>8.3f}"
                  f"{t.get('lag_max_s', 0):>8.3f}{t.get('queue_max', 0):>10}  "
                  f"{'pass' if t['ok'] else 'FAIL'} {t.get('note', t.get('error', ''))}")
    for r in out["results"]:
        goal = "meets" if r["largest_n"] >= GOAL_N else "MISSES"
        print(f"{r['database']}: largest N = {r['largest_n']} devices ({goal} the goal of "
              f"{GOAL_N})")
    if out.get("baseline"):
        bl = out["baseline"]
        print(f"baseline (bare subscriber, no database) at {bl['n']} devices: p99 delivery lag "
              f"{bl['lag_p99_s']:.3f} s, {bl['received']}/{bl['sent']} received")
        for r in out["results"]:
            t = next((t for t in r["trials"] if t["n"] == bl["n"]), None)
            if t and bl["lag_p99_s"]:
                print(f"  {r['database']}: p99 lag {t['lag_p99_s']:.3f} s = "
                      f"{t['lag_p99_s'] / bl['lag_p99_s']:.1f}x the bare subscriber's")
    if args.json_out:
        text = json.dumps(out, indent=2)
        if args.json_out == "-":
            print(text)
        else:
            Path(args.json_out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
