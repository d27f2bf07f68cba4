"""Measurement truth: is the p50 a device reports in a profile job the model's real p50?

For each model, in rounds, in the same run:

* **agent**: a real ``edgepack-agent`` process (loopback Mosquitto) gets a signed profile job
  (``edgepack.host.fleet.profiling.profile_on_devices``, cache off) and reports ``latency_ms.p50``
  — fetched over MQTT into its scratch directory, measured in its niced child process;
* **independent**: a fresh Python process that uses nothing from edgepack: ``onnxruntime``
  directly on the same model file (read out of the same ``.edgepack`` zip), the same session
  options (1 intra-op thread, sequential, all graph optimizations), the same inputs (the
  bundle's golden samples, cycled), the same warm-up and run count, ``time.perf_counter``
  around each ``run``, and the same CPU priority (``nice`` 10, as the agent's measurement runs).

Each round runs the independent timing, then the agent job, then the independent timing again;
the ratio is agent p50 / mean of the two independent p50s around it. The goal is a median ratio
within 5 % of 1.0 for every model. Models: the profiling tests' conv net (fp32 and QDQ U8S8
int8, ~0.6-2.5 ms on this CPU) and the agent tests' tiny MLP (~10 µs: Python-call overhead).

    .venv/bin/python bench/measurement.py                 # 3 rounds, 1000 runs per timing
    .venv/bin/python bench/measurement.py --rounds 5 --runs 2000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT / "tests", ROOT / "tests" / "agent", ROOT / "tests" / "host" / "fleet" / "profiling"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

NICE = 10

_INDEPENDENT = r"""
import io, json, os, sys, time, zipfile
import numpy as np
import onnxruntime as ort
bundle, runs, warmup, nice = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
os.nice(nice)
with zipfile.ZipFile(bundle) as z:
    manifest = json.loads(z.read("manifest.json"))
    model = z.read(manifest["model"]["file"])
    golden = np.load(io.BytesIO(z.read(manifest["health"]["golden"])))
    names = [s["name"] for s in manifest["model"]["inputs"]]
    n = int(manifest["health"]["samples"])
    feeds = [{name: golden[f"input_{i}"][k] for i, name in enumerate(names)} for k in range(n)]
so = ort.SessionOptions()
so.intra_op_num_threads = 1
so.inter_op_num_threads = 1
so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
so.log_severity_level = 3
sess = ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])
outs = [o.name for o in sess.get_outputs()]
for w in range(warmup):
    sess.run(outs, feeds[w % len(feeds)])
times = []
for r in range(runs):
    f = feeds[r % len(feeds)]
    t = time.perf_counter()
    sess.run(outs, f)
    times.append((time.perf_counter() - t) * 1e3)
t = np.asarray(times)
print(json.dumps({"p50": float(np.percentile(t, 50)), "p95": float(np.percentile(t, 95)),
                  "runs": len(times)}))
"""


def _bundle(out: Path, model_bytes: bytes, key: Path, name: str, shape: tuple[int, ...]) -> Path:
    """A signed bundle around ``model_bytes`` with 8 golden samples (1 thread)."""
    import numpy as np
    import onnxruntime as ort

    from edgepack.host.build.package import npz_bytes, write_bundle
    from edgepack.host.keys import load_private_key, sign_bytes

    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    i0, o0 = sess.get_inputs()[0], sess.get_outputs()
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((8, *shape)).astype(np.float32)
    outs = [sess.run(None, {i0.name: xs[k]}) for k in range(8)]
    golden = {"input_0": xs, **{f"output_{j}": np.stack([o[j] for o in outs])
                                for j in range(len(o0))}}
    dt = {"tensor(float)": "float32", "tensor(int64)": "int64"}
    manifest = {
        "name": name, "version": "1.0.0", "created": "2025-01-01T00:00:00Z",
        "target": "x86-64-vnni",
        "model": {"file": "model.onnx", "format": "onnx",
                  "inputs": [{"name": i0.name, "dtype": "float32", "shape": list(shape),
                              "quantization": None}],
                  "outputs": [{"name": o.name, "dtype": dt.get(o.type, "float32"),
                               "shape": [d if isinstance(d, int) else 1 for d in o.shape],
                               "quantization": None} for o in o0]},
        "runtime": {"name": "onnxruntime", "min_version": "1.17", "threads": 1,
                    "providers": ["CPUExecutionProvider"]},
        "health": {"golden": "golden.npz", "samples": 8, "atol": 1e-3, "rtol": 1e-3,
                   "min_cosine": 0.999, "min_label_agreement": 1.0},
        "budgets": {"p95_ms": 1000, "peak_rss_mb": 4096, "model_mb": 100},
    }
    priv = load_private_key(key)
    return write_bundle(out, manifest, model_bytes, {"golden.npz": npz_bytes(golden)},
                        sign=lambda data: sign_bytes(data, priv))


def _models(work: Path, key: Path) -> dict[str, Path]:
    import numpy as np
    from agent_helpers import tiny_onnx
    from profiling_models import CHANNELS, HW, convnet, write_data  # noqa: F401

    from edgepack.agent.profiles import QuantScheme
    from edgepack.host.build.data import Dataset
    from edgepack.host.build.quantize import quantize_static

    fp32 = convnet()
    calib, _ = write_data(fp32, work / "data")
    with np.load(calib) as z:
        cal = Dataset({"x": z["x"]}, None, "calib")
    int8 = quantize_static(fp32, cal, QuantScheme("QDQ", "uint8", "int8", True)).model_bytes
    shape = (1, 3, HW, HW)
    return {"conv fp32": _bundle(work / "conv-fp32.edgepack", fp32, key, "conv-fp32", shape),
            "conv int8 U8S8": _bundle(work / "conv-u8.edgepack", int8, key, "conv-u8", shape),
            "tiny MLP": _bundle(work / "tiny.edgepack", tiny_onnx(), key, "tiny", (1, 64))}


def _independent(bundle: Path, runs: int, warmup: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _INDEPENDENT, str(bundle), str(runs),
                          str(warmup), str(NICE)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runs", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--json", help="write every figure here")
    a = p.parse_args(argv)

    from agent_helpers import AgentProcess, Watcher, agent_config
    from brokers import start_mosquitto

    from edgepack.host.fleet.profiling import ProfileCache, profile_on_devices
    from edgepack.host.keys import generate_keys

    work = Path(tempfile.mkdtemp(prefix="edgepack-measurement-"))
    key, pub, _ = generate_keys(work, "fleet")
    print("building bundles…", file=sys.stderr)
    bundles = _models(work, key)
    broker = start_mosquitto()
    fleet = f"bench{uuid.uuid4().hex[:8]}"
    cfg = agent_config(work / "dev", broker.url, fleet, device_id="bench-dev", pub=pub,
                       target="x86-64-vnni")
    agent = None
    rows: dict[str, list[dict]] = {m: [] for m in bundles}
    try:
        with Watcher(broker.url, fleet, "bench-dev") as w:
            agent = AgentProcess(cfg).start()
            w.wait_state(lambda s: s.get("online") is True, timeout=30)
        time.sleep(0.3)
        for r in range(a.rounds):
            for model, bundle in bundles.items():
                before = _independent(bundle, a.runs, a.warmup)
                rep = profile_on_devices([bundle], ["bench-dev"], broker=broker.url,
                                         key_path=key, fleet=fleet, runs=a.runs,
                                         warmup=a.warmup, op_profile=False, timeout=600,
                                         cache=ProfileCache(None))
                res = next(iter(rep.devices["bench-dev"].results.values()))
                if res.get("status") != "ok":
                    raise SystemExit(f"agent measurement failed: {res}")
                after = _independent(bundle, a.runs, a.warmup)
                ind = (before["p50"] + after["p50"]) / 2
                agent_p50 = res["latency_ms"]["p50"]
                row = {"round": r + 1, "independent_p50_ms": [before["p50"], after["p50"]],
                       "agent_p50_ms": agent_p50, "agent_runs": res["latency_ms"]["runs"],
                       "ratio": agent_p50 / ind}
                rows[model].append(row)
                print(f"round {r + 1} {model:15s} independent p50 {before['p50']:.4f} / "
                      f"{after['p50']:.4f} ms   agent p50 {agent_p50:.4f} ms "
                      f"({res['latency_ms']['runs']} runs)   ratio {row['ratio']:.3f}",
                      file=sys.stderr)
    finally:
        if agent is not None:
            agent.stop()
        broker.stop()

    import onnxruntime

    print(f"\nagent-reported p50 vs independent p50 (same model file, inputs, threads=1, "
          f"nice {NICE}, {a.runs} runs after {a.warmup} warm-up; onnxruntime "
          f"{onnxruntime.__version__}; {a.rounds} rounds)")
    print(f"{'model':16s} {'independent p50 ms':>19s} {'agent p50 ms':>13s} {'ratio':>7s} "
          f"{'range':>13s}  verdict")
    ok = True
    summary = {}
    for model, rs in rows.items():
        ratios = [x["ratio"] for x in rs]
        med = statistics.median(ratios)
        ind = statistics.median(statistics.mean(x["independent_p50_ms"]) for x in rs)
        ag = statistics.median(x["agent_p50_ms"] for x in rs)
        good = abs(med - 1.0) <= 0.05
        ok &= good
        summary[model] = {"median_ratio": med, "ratios": ratios, "independent_p50_ms": ind,
                          "agent_p50_ms": ag, "rounds": rs}
        print(f"{model:16s} {ind:19.4f} {ag:13.4f} {med:7.3f} "
              f"{min(ratios):6.3f}-{max(ratios):.3f}  {'within 5%' if good else 'OFF'}")
    if a.json:
        Path(a.json).write_text(json.dumps({"runs": a.runs, "warmup": a.warmup,
                                            "rounds": a.rounds, "models": summary}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
