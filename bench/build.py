"""Benchmark ``edgepack build`` against a bare ``onnxruntime.quantization.quantize_static`` call.

Measured in one run, on a MobileNetV2-sized model and the digits CNN (issue 2, item 6):

a) build time: ``edgepack build`` (target x86-64-vnni, int8, calibration + eval data), with the
   variant search on (the default) and off, vs the call a user would write with onnxruntime's
   defaults (QDQ, S8S8, per-tensor, MinMax) on the same model and data; goal <= 1.5x;
b) size ratio fp32 -> int8 of the bundle's model; goal >= 3.7x;
c) int8 latency of the bundle's model vs fp32 and vs onnxruntime's default QDQ S8S8 output,
   all timed in this process with the same thread count, repetitions interleaved; goal >= 1.8x
   faster than both (p50).

Nothing is downloaded: MobileNetV2 comes from ``keras.applications`` with ``weights=None`` and
its batch-norm statistics set layer by layer from smooth random images (left at their initial
values, activations vanish through the network and int8 outputs collapse to zero); the digits CNN
is trained on scikit-learn's bundled data by ``examples/digits.py``.

    python bench/build.py                         # both models, MobileNetV2 at 160x160
    python bench/build.py --models digits --json out.json
    python bench/build.py --size 224 --json -     # JSON on stdout after the table
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # for examples.digits when run as a file
    sys.path.insert(0, str(ROOT))

TARGET = "x86-64-vnni"
GOALS = {"build_ratio": 1.5, "size_ratio": 3.7, "speedup": 1.8}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- models and data

def smooth_images(n: int, size: int, seed: int) -> np.ndarray:
    """Random but structured images in [-1, 1] (MobileNetV2's input range): smooth colour
    fields at random scales, a random linear gradient and a few flat rectangles, plus noise."""
    from scipy.ndimage import zoom

    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), np.float32)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        g = int(rng.integers(3, 12))
        low = rng.uniform(-1, 1, (g + 1, g + 1, 3))
        im = zoom(low, (size / (g + 1), size / (g + 1), 1), order=3)[:size, :size]
        a, b = rng.uniform(-1, 1, 2)
        im = im + (a * (xx - 0.5) + b * (yy - 0.5))[..., None]
        for _ in range(int(rng.integers(0, 4))):
            y0, x0 = rng.integers(0, size - 8, 2)
            h, w = rng.integers(8, size // 2, 2)
            im[y0:y0 + h, x0:x0 + w] = rng.uniform(-1, 1, 3)
        im += 0.05 * rng.standard_normal(im.shape)
        out[i] = np.clip(im, -1, 1)
    return out


def set_bn_statistics(model: Any, x: np.ndarray) -> None:
    """Set each BatchNormalization's moving mean/variance to the per-channel statistics of the
    activations it sees on ``x``, in topological order (each layer sees the corrected ones)."""
    import keras

    for layer in model.layers:
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        sub = keras.Model(model.inputs, layer.input)
        act = np.asarray(sub(x, training=False), dtype=np.float64)
        layer.moving_mean.assign(act.mean(axis=(0, 1, 2)).astype(np.float32))
        layer.moving_variance.assign(act.var(axis=(0, 1, 2)).astype(np.float32))


def make_mobilenet(out: Path, size: int, n_calib: int, n_eval: int, n_bn: int) -> dict:
    import keras
    import onnx

    from examples.digits import keras_to_onnx

    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(size, size, 3))
    t0 = time.perf_counter()
    set_bn_statistics(model, smooth_images(n_bn, size, seed=1))
    log(f"MobileNetV2 {size}x{size}: {model.count_params():,} params, BN statistics set in "
        f"{time.perf_counter() - t0:.1f}s")
    path = keras_to_onnx(model, out / "mobilenetv2.onnx")
    name = onnx.load(path).graph.input[0].name
    np.savez(out / "calib.npz", **{name: smooth_images(n_calib, size, seed=2)})
    np.savez(out / "eval.npz", **{name: smooth_images(n_eval, size, seed=3)})
    return {"model": path, "calibration": out / "calib.npz", "eval": out / "eval.npz",
            "desc": f"keras.applications.MobileNetV2(weights=None, {size}x{size}x3), "
                    f"BN stats from {n_bn} images; {n_calib} calib / {n_eval} eval smooth "
                    "random images"}


def make_digits(out: Path) -> dict:
    from examples.digits import write_digits_example

    files = write_digits_example(out)
    with np.load(files["calibration"]) as c, np.load(files["eval"]) as e:
        n_c, n_e = len(next(iter(c.values()))), len(e["labels"])
    return {**files, "desc": f"examples/digits.py CNN (8x8x1); {n_c} calib / {n_e} eval "
                             "images with labels"}


# --------------------------------------------------------------------------- onnxruntime check

CALIB_CHUNK = 64  # the CalibMaxIntermediateOutputs edgepack.host.build.quantize used to pass


def ort_drops_calibration_chunks() -> bool:
    """True when edgepack's int8 calibration ignores all but the last ``n % 64`` samples.

    onnxruntime's MinMaxCalibrater, on reaching CalibMaxIntermediateOutputs (edgepack's first
    version passed 64), clears the collected outputs without folding them into the ranges
    (onnxruntime issue #18893, still so in 1.32); exactly 64 samples then fail with "No data is
    collected". Checked by behaviour: a MatMul calibrated on 64 samples of 10.0 then one of 1.0
    should get an input scale for 10.0, not for 1.0."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgepack.agent.profiles import QuantScheme
    from edgepack.host.build.data import Dataset
    from edgepack.host.build.quantize import quantize_static

    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.full((CALIB_CHUNK + 1, 4), 10.0, np.float32)
    x[-1] = 1.0
    scheme = QuantScheme(format="QDQ", activation_type="uint8", weight_type="int8",
                         per_channel=False)
    q = onnx.load_from_string(quantize_static(model.SerializeToString(),
                                              Dataset({"x": x}, None, "probe"), scheme).model_bytes)
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    node = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    return float(inits[node.input[1]]) < 5.0 / 255


# --------------------------------------------------------------------------- measurements

def ort_default_quantize(model: Path, calib: Path, out: Path) -> float:
    """What a user writes with onnxruntime alone: quantize_static with its defaults
    (QDQ, QInt8 activations and weights, per-tensor, MinMax). Returns seconds."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self, name: str, x: np.ndarray) -> None:
            self.it = iter({name: x[i:i + 1]} for i in range(len(x)))

        def get_next(self) -> dict | None:
            return next(self.it, None)

    import onnx

    t0 = time.perf_counter()
    name = onnx.load(model).graph.input[0].name
    with np.load(calib) as z:
        x = z[z.files[0]]
    quantize_static(str(model), str(out), Reader(name, x))
    return time.perf_counter() - t0


def edgepack_build(files: dict, out: Path, key: Path, variants: bool,
                   max_drop: float | None) -> tuple[float, Any]:
    from edgepack.host.build import build

    t0 = time.perf_counter()
    res = build(str(files["model"]), target=TARGET, quantize="int8",
                calibration=str(files["calibration"]), eval=str(files["eval"]), key=str(key),
                out=str(out), variants=variants, max_drop=max_drop)
    return time.perf_counter() - t0, res


def interleaved_latency(models: dict[str, bytes], feed: dict, threads: int,
                        budget_s: float, block_s: float = 0.1, settle_s: float = 0.05,
                        discard: int = 2) -> dict[str, dict]:
    """p50/p95/mean ms per model, timed in blocks that rotate over the models round after
    round, so slow drift (clock, thermals, neighbours) hits all models alike.

    Before each block the process sleeps ``settle_s`` and runs ``discard`` untimed inferences:
    onnxruntime's worker threads spin for a while after a run, and with several sessions on
    two cores the previous model's spinning threads would otherwise steal the CPU from the
    next one (measured here: fp32 MobileNetV2 2.5 ms alone, 6.5 ms when switching models every
    5 runs without the pause)."""
    from edgepack.host.build.validate import Session

    sess = {k: Session(b, threads) for k, b in models.items()}
    names = list(sess)
    block: dict[str, int] = {}
    one_s: dict[str, float] = {}
    for n in names:  # warm-up, and a per-model block size of about block_s
        for _ in range(5):
            sess[n].run(feed)
        t0 = time.perf_counter()
        for _ in range(5):
            sess[n].run(feed)
        one_s[n] = max((time.perf_counter() - t0) / 5, 1e-6)
        block[n] = int(min(200, max(5, block_s / one_s[n])))
    round_s = sum(settle_s + (block[n] + discard) * one_s[n] for n in names)
    rounds = int(min(500, max(10, budget_s / round_s)))
    times: dict[str, list[float]] = {n: [] for n in names}
    per_round: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            s = sess[n]
            time.sleep(settle_s)
            for _ in range(discard):
                s.run(feed)
            block_ms = []
            for _ in range(block[n]):
                t = time.perf_counter()
                s.run(feed)
                block_ms.append((time.perf_counter() - t) * 1e3)
            times[n] += block_ms
            per_round[n].append(float(np.median(block_ms)))
    out: dict[str, dict] = {}
    for n, ts in times.items():
        a = np.array(ts)
        out[n] = {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
                  "mean_ms": float(a.mean()), "runs": len(a), "rounds": rounds,
                  "_rounds": np.array(per_round[n])}
    return out


def paired_speedup(lat: dict, slow: str, fast: str) -> float:
    """Median over rounds of slow/fast (each round times both within a fraction of a second):
    less sensitive than a ratio of p50s to load that comes and goes on a shared machine."""
    return float(np.median(lat[slow]["_rounds"] / lat[fast]["_rounds"]))


def initializer_bytes(model_bytes: bytes) -> int:
    """Bytes of the weights alone (the rest of a file is graph structure and tensor names)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load_from_string(model_bytes)
    return sum(numpy_helper.to_array(i).nbytes for i in m.graph.initializer)


def bench_model(label: str, files: dict, work: Path, key: Path, threads: int,
                latency_budget: float, max_drop: float | None) -> dict:
    import onnx

    fp32_path = Path(files["model"])
    ort_path = work / f"{label}.ort-default.onnx"

    log(f"{label}: bare onnxruntime quantize_static (defaults)")
    t_ort = ort_default_quantize(fp32_path, Path(files["calibration"]), ort_path)
    log(f"{label}: edgepack build --target {TARGET} --quantize int8 (variants on)")
    t_var, res_var = edgepack_build(files, work / f"dist-{label}-variants", key, True, max_drop)
    log(f"{label}: edgepack build ... (variants off)")
    t_novar, res_novar = edgepack_build(files, work / f"dist-{label}-single", key, False,
                                        max_drop)

    rep = res_var.report.to_dict()
    size = rep["metrics"]["size"]
    opt = rep["optimization"]
    fp32_bytes = fp32_path.read_bytes()
    ort_bytes = ort_path.read_bytes()

    model = onnx.load_from_string(fp32_bytes)
    inits = {i.name for i in model.graph.initializer}
    inp = next(i for i in model.graph.input if i.name not in inits)
    with np.load(files["eval"]) as z:
        x = z[inp.name] if inp.name in z.files else z[[k for k in z.files if k != "labels"][0]]
    feed = {inp.name: np.ascontiguousarray(x[:1])}

    to_time = {"fp32": fp32_bytes, "ort_default_s8s8": ort_bytes,
               "edgepack": res_var.model_bytes}
    if res_novar.model_bytes != res_var.model_bytes:
        to_time["edgepack_no_variants"] = res_novar.model_bytes
    log(f"{label}: timing {', '.join(to_time)} interleaved, {threads} thread(s)")
    load_before = os.getloadavg()[0]
    lat = interleaved_latency(to_time, feed, threads, latency_budget)
    load = [round(load_before, 2), round(os.getloadavg()[0], 2)]

    p50 = {k: v["p50_ms"] for k, v in lat.items()}
    paired = {"edgepack_vs_fp32": paired_speedup(lat, "fp32", "edgepack"),
              "edgepack_vs_ort_default": paired_speedup(lat, "ort_default_s8s8", "edgepack"),
              "ort_default_vs_fp32": paired_speedup(lat, "fp32", "ort_default_s8s8")}
    for v in lat.values():
        del v["_rounds"]
    acc = rep["metrics"]["accuracy"]
    out = {
        "model": files["desc"],
        "build_s": {"edgepack_variants": t_var, "edgepack_no_variants": t_novar,
                    "ort_quantize_static": t_ort},
        "build_ratio": {"variants": t_var / t_ort, "no_variants": t_novar / t_ort},
        "build_stages_s": {"variants": rep["timings_s"],
                           "no_variants": res_novar.report.timings_s},
        "size_bytes": {"fp32_source": len(fp32_bytes), "fp32_prepared": size["fp32_bytes"],
                       "edgepack_int8": size["optimized_bytes"], "ort_default": len(ort_bytes)},
        "size_ratio": size["ratio"],
        "size_ratio_ort_default": len(fp32_bytes) / len(ort_bytes),
        "weights_bytes": {"fp32": initializer_bytes(fp32_bytes),
                          "edgepack_int8": initializer_bytes(res_var.model_bytes)},
        "calibration_samples": opt["calibration_samples"],
        "latency_ms": lat,
        "loadavg_1min_during_timing": load,
        "speedup_vs_fp32": p50["fp32"] / p50["edgepack"],
        "speedup_vs_ort_default": p50["ort_default_s8s8"] / p50["edgepack"],
        "ort_default_vs_fp32": p50["fp32"] / p50["ort_default_s8s8"],
        "paired_round_speedups": paired,
        "chosen": opt["summary"],
        "chosen_no_variants": res_novar.report.optimization["summary"],
        "quantized_ops": opt["quantized_ops"],
        "nodes_in_float": opt["nodes_in_float"],
        "preflight": opt["preflight"],
        "warnings": opt["warnings"],
        "accuracy": {k: acc.get(k) for k in ("top1_agreement", "accuracy_fp32",
                                             "accuracy_optimized", "drop_points",
                                             "min_cosine", "basis")},
        "build_latency_ms": rep["metrics"]["latency"],
        "variants": [{k: v[k] for k in ("scheme", "bytes", "drop_points", "result")}
                     | {"p50_ms": v["latency"]["p50_ms"]} for v in rep.get("variants", [])],
    }
    if "edgepack_no_variants" in p50:
        out["speedup_no_variants_vs_fp32"] = p50["fp32"] / p50["edgepack_no_variants"]
    return out


# --------------------------------------------------------------------------- output

def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
                        if f in have]
    except OSError:
        pass
    return []


def _secs(t: float) -> str:
    return f"{t:.1f}" if t >= 10 else f"{t:.2f}"


def _mark(ok: bool) -> str:
    return "ok" if ok else "MISS"


def render(results: dict) -> str:
    models = results["models"]
    names = list(models)
    failed = [f"{n} FAILED: {e}" for n, e in results["failed"].items()]
    if not names:
        return "\n".join(failed)
    rows: list[tuple[str, str, list[str]]] = []

    def row(metric: str, goal: str, fn: Any) -> None:
        rows.append((metric, goal, [fn(models[n]) for n in names]))

    g = GOALS
    row("build: edgepack, variants on (s)", "", lambda m: _secs(m['build_s']['edgepack_variants']))
    row("build: edgepack, variants off (s)", "",
        lambda m: _secs(m['build_s']['edgepack_no_variants']))
    row("build: ORT quantize_static (s)", "", lambda m: _secs(m['build_s']['ort_quantize_static']))
    for k, lab in (("variants", "on"), ("no_variants", "off")):
        row(f"build ratio, variants {lab}", f"<= {g['build_ratio']}x",
            lambda m, k=k: f"{m['build_ratio'][k]:.2f}x "
                           f"{_mark(m['build_ratio'][k] <= g['build_ratio'])}")
    row("size fp32 -> int8 (MB)", "", lambda m: f"{m['size_bytes']['fp32_prepared'] / 1e6:.3f} -> "
                                               f"{m['size_bytes']['edgepack_int8'] / 1e6:.3f}")
    row("size ratio", f">= {g['size_ratio']}x",
        lambda m: f"{m['size_ratio']:.2f}x {_mark(m['size_ratio'] >= g['size_ratio'])}")
    row("size ratio, ORT default (for scale)", "", lambda m: f"{m['size_ratio_ort_default']:.2f}x")
    row("weights only fp32 / int8", "",
        lambda m: f"{m['weights_bytes']['fp32'] / m['weights_bytes']['edgepack_int8']:.2f}x")
    row("p50 fp32 (ms)", "", lambda m: f"{m['latency_ms']['fp32']['p50_ms']:.3f}")
    row("p50 ORT default QDQ S8S8 (ms)", "",
        lambda m: f"{m['latency_ms']['ort_default_s8s8']['p50_ms']:.3f}")
    row("p50 edgepack int8 (ms)", "", lambda m: f"{m['latency_ms']['edgepack']['p50_ms']:.3f}")
    row("ORT default speed vs fp32", "", lambda m: f"{m['ort_default_vs_fp32']:.2f}x")
    row("edgepack speed vs fp32", f">= {g['speedup']}x",
        lambda m: f"{m['speedup_vs_fp32']:.2f}x {_mark(m['speedup_vs_fp32'] >= g['speedup'])}")
    row("edgepack speed vs ORT default", f">= {g['speedup']}x",
        lambda m: f"{m['speedup_vs_ort_default']:.2f}x "
                  f"{_mark(m['speedup_vs_ort_default'] >= g['speedup'])}")
    row("  same, paired per round (vs fp32 / ORT)", "",
        lambda m: f"{m['paired_round_speedups']['edgepack_vs_fp32']:.2f}x / "
                  f"{m['paired_round_speedups']['edgepack_vs_ort_default']:.2f}x")
    row("edgepack chosen scheme", "", lambda m: m["chosen"].replace("static int8 ", ""))
    row("calibration samples given / used", "",
        lambda m: f"{m['calibration_samples']} / {m['calibration_samples_used']}")
    row("accuracy drop (points) / max", "",
        lambda m: f"{m['accuracy']['drop_points']:.2f} / "
                  f"{'profile' if m['max_drop'] is None else format(m['max_drop'], 'g')} "
                  f"({m['accuracy']['basis'].split(' ')[0]})")
    row("int8 min cosine vs fp32", "", lambda m: f"{m['accuracy']['min_cosine']:.3f}")

    headers = ("metric", "goal", *names)
    table = [headers, *[(a, b, *c) for a, b, c in rows]]
    widths = [max(len(r[i]) for r in table) for i in range(len(headers))]

    def fmt(r: tuple) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

    lines = [fmt(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [fmt(r) for r in table[1:]]
    env = results["env"]
    head = (f"edgepack build benchmark — {env['date']}, {env['cpu']} ({env['cpus']} CPUs; "
            f"{', '.join(env['cpu_flags'])}), target {TARGET}, {env['threads']} thread(s), "
            f"onnxruntime {env['onnxruntime']}; 1-min load average during timing: "
            + ", ".join(f"{n} {models[n]['loadavg_1min_during_timing'][0]:.1f}->"
                        f"{models[n]['loadavg_1min_during_timing'][1]:.1f}" for n in names))
    notes = list(failed)
    for n in names:
        m = models[n]
        if m["variants"]:
            v = "; ".join(f"{x['scheme']} p50 {x['p50_ms']:.3f} ms ({x['result']})"
                          for x in m["variants"])
            notes.append(f"{n} variants (as timed inside the build): {v}")
        for w in m["warnings"]:
            notes.append(f"{n} warning: {w}")
    if env["calibration_drops_chunks"]:
        notes.append(f"WARNING: edgepack's int8 calibration drops every full chunk of "
                     f"{CALIB_CHUNK} samples (onnxruntime's CalibMaxIntermediateOutputs bug): "
                     f"its ranges come from the last n % {CALIB_CHUNK} samples only.")
    return "\n".join([head, "", *lines, "", *notes])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mobilenet,digits",
                    help="comma-separated: mobilenet, digits (default: both)")
    ap.add_argument("--size", type=int, default=160,
                    help="MobileNetV2 input side (default 160; 224 is the ImageNet size)")
    ap.add_argument("--calib", type=int, default=100, help="MobileNetV2 calibration images")
    ap.add_argument("--eval", type=int, default=50, help="MobileNetV2 eval images")
    ap.add_argument("--bn-images", type=int, default=32,
                    help="images used to set MobileNetV2's batch-norm statistics")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for timing (default: what edgepack build uses for the target)")
    ap.add_argument("--latency-budget", type=float, default=15.0,
                    help="seconds of interleaved timing per model (default 15)")
    ap.add_argument("--max-drop", type=float, default=None,
                    help="--max-drop for the digits build (default: the profile's)")
    ap.add_argument("--mobilenet-max-drop", type=float, default=100.0,
                    help="--max-drop for MobileNetV2 (default 100 = gate off: its random "
                         "weights amplify int8 noise layer after layer, so its top-1 agreement "
                         "says nothing about a trained model; pass 1 to see the gate act)")
    ap.add_argument("--json", metavar="PATH", help="write the figures as JSON ('-' = stdout)")
    ap.add_argument("--keep", metavar="DIR", help="keep artifacts in DIR instead of a temp dir")
    args = ap.parse_args(argv)

    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in wanted if m not in ("mobilenet", "digits")]
    if bad or not wanted:
        ap.error(f"unknown model(s) {', '.join(bad) or '(none)'}; choose from mobilenet, digits")

    import onnxruntime
    import onnxruntime.quantization  # noqa: F401  (imported before any timed call)

    from edgepack.agent.profiles import load_profile
    from edgepack.host.build.plan import host_threads
    from edgepack.host.keys import generate_keys

    calib_bug = ort_drops_calibration_chunks()
    threads = args.threads or host_threads(load_profile(TARGET))
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgepack-bench-") as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        key, _, _ = generate_keys(work / "keys", overwrite=True)
        # Make every model first, so TensorFlow is idle during the measurements.
        files = {}
        for m in wanted:
            log(f"making {m}")
            files[m] = (make_mobilenet(work / "mobilenet", args.size, args.calib, args.eval,
                                       args.bn_images) if m == "mobilenet"
                        else make_digits(work / "digits"))
        results: dict[str, Any] = {
            "env": {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(),
                    "cpus": os.cpu_count(), "cpu_flags": cpu_flags(), "threads": threads,
                    "target": TARGET, "onnxruntime": onnxruntime.__version__,
                    "python": platform.python_version(),
                    "calibration_drops_chunks": calib_bug},
            "goals": GOALS, "models": {}, "failed": {}}
        for m in wanted:
            name = "mobilenetv2" if m == "mobilenet" else "digits"
            drop = args.mobilenet_max_drop if m == "mobilenet" else args.max_drop
            try:
                r = bench_model(name, files[m], work, key, threads, args.latency_budget, drop)
            except Exception as exc:  # report it and go on with the other model
                log(f"{name}: FAILED: {type(exc).__name__}: {exc}")
                results["failed"][name] = f"{type(exc).__name__}: {str(exc)[:500]}"
                continue
            r["max_drop"] = drop
            n = r["calibration_samples"]
            r["calibration_samples_used"] = n % CALIB_CHUNK if calib_bug else n
            results["models"][name] = r
    results["env"]["total_s"] = time.perf_counter() - t_start

    print(render(results))
    if args.json:
        text = json.dumps(results, indent=2, default=float)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
            log(f"figures written to {args.json}")
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
