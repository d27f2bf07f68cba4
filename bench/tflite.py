"""Benchmark: the same Keras model as TFLite (LiteRT) and as ONNX (onnxruntime), fp32 and int8.

For each model, in one run and one process:

* TFLite fp32 and full int8 (float I/O, TFLite's int8 spec), converted by
  ``edgepack.host.build.convert_tflite.to_tflite`` and run in LiteRT (XNNPACK);
* ONNX fp32 (tf2onnx from the same SavedModel) and static int8 with the x86-64-vnni profile's
  scheme (``edgepack.host.build.quantize.quantize_static``), run in onnxruntime;

all four timed interleaved (rotating order, same thread count, same input), plus size, size ratio
fp32 → int8 within each format, and accuracy (digits: against labels; MobileNetV2 with random
weights: mean cosine similarity with that format's fp32 outputs). The baseline for latency ratios is TFLite fp32.

MobileNetV2 has random weights (nothing is downloaded): it is there for latency and size at a
realistic size; its int8 fidelity says little about a trained network's (both formats land
alike). Timings are for this host's CPU; an ARM board's ratios differ (XNNPACK and onnxruntime have
different ARM int8 kernels), so run it there to decide a target family.

    python bench/tflite.py                       # digits CNN + MobileNetV2 96x96
    python bench/tflite.py --models digits --threads 2 --json out.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _bench_build() -> Any:
    """bench/build.py's image generator and BN-statistics helper (loaded by path)."""
    spec = importlib.util.spec_from_file_location("_bench_build", ROOT / "bench" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_digits() -> dict:
    from examples.digits import digits_data, train_keras_cnn

    x_tr, x_te, y_tr, y_te = digits_data()
    return {"model": train_keras_cnn(x_tr, y_tr, epochs=12), "calib": x_tr[:200],
            "eval": x_te, "labels": y_te, "desc": "digits CNN (examples/digits.py), 8x8x1"}


def make_mobilenet(size: int) -> dict:
    import keras

    bb = _bench_build()
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(size, size, 3))
    bb.set_bn_statistics(model, bb.smooth_images(32, size, seed=1))
    return {"model": model, "calib": bb.smooth_images(100, size, seed=2),
            "eval": bb.smooth_images(50, size, seed=3), "labels": None,
            "desc": f"MobileNetV2(weights=None) {size}x{size}x3, BN stats from smooth images"}


def to_onnx(sm_dir: Path, out: Path) -> bytes:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(sm_dir),
                        "--output", str(out), "--opset", "17"], capture_output=True, text=True,
                       env=env)
    if r.returncode != 0:
        raise RuntimeError(f"tf2onnx failed:\n{r.stderr[-2000:]}")
    return out.read_bytes()


def interleaved(sessions: dict[str, tuple[Any, dict]], budget_s: float, chunk: int = 5
                ) -> dict[str, dict]:
    """p50/p95 ms per session, rounds in rotating order so drift hits all alike."""
    names = list(sessions)
    for n in names:
        s, feed = sessions[n]
        for _ in range(10):
            s.run(feed)
    t0 = time.perf_counter()
    for n in names:
        s, feed = sessions[n]
        for _ in range(chunk):
            s.run(feed)
    rounds = int(min(400, max(20, budget_s / max(time.perf_counter() - t0, 1e-6))))
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            s, feed = sessions[n]
            for _ in range(chunk):
                t = time.perf_counter()
                s.run(feed)
                times[n].append((time.perf_counter() - t) * 1e3)
    return {n: {"p50_ms": float(np.percentile(ts, 50)), "p95_ms": float(np.percentile(ts, 95)),
                "runs": len(ts)} for n, ts in times.items()}


def _outputs(sess: Any, name: str, x: np.ndarray) -> np.ndarray:
    return np.stack([np.asarray(sess.run({name: x[i:i + 1]})[0], dtype=np.float64).reshape(-1)
                     for i in range(len(x))])


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean per-sample cosine similarity (random-weight models have no meaningful top-1)."""
    num = (a * b).sum(1)
    return float((num / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1),
                                   1e-30)).mean())


def bench_model(label: str, m: dict, work: Path, threads: int, budget_s: float) -> dict:
    from edgepack.agent.profiles import load_profile
    from edgepack.host.build.convert_onnx import prepare_onnx
    from edgepack.host.build.convert_tflite import LiteRTSession, to_tflite
    from edgepack.host.build.data import Dataset
    from edgepack.host.build.quantize import quantize_static
    from edgepack.host.build.validate import Session

    sm = work / f"{label}-sm"
    m["model"].export(str(sm), format="tf_saved_model", verbose=False)
    sig_name = LiteRTSession(to_tflite(sm, "none").model_bytes).tensor_specs(
        by_signature=True)[0].name
    calib = Dataset({sig_name: m["calib"]}, None, "calib")
    t = time.perf_counter()
    tfl = {"fp32": to_tflite(sm, "none").model_bytes,
           "int8": to_tflite(sm, "int8", calib=calib).model_bytes}
    log(f"{label}: TFLite fp32 + int8 in {time.perf_counter() - t:.1f}s")
    t = time.perf_counter()
    onnx_path = work / f"{label}.onnx"
    to_onnx(sm, onnx_path)
    prepared = prepare_onnx(onnx_path, opset=17, batch=1)
    in_name = prepared.inputs[0].name
    scheme = load_profile("x86-64-vnni").quantization.scheme
    onx = {"fp32": prepared.model_bytes,
           "int8": quantize_static(prepared.model_bytes,
                                   Dataset({in_name: m["calib"]}, None, "calib"),
                                   scheme).model_bytes}
    log(f"{label}: ONNX fp32 + int8 ({scheme.label}) in {time.perf_counter() - t:.1f}s")

    x1 = m["eval"][:1]
    sessions = {}
    for prec, b in tfl.items():
        s = LiteRTSession(b, threads)
        sessions[f"TFLite {prec}"] = (s, {s.input_names[0]: x1})
    for prec, b in onx.items():
        sessions[f"ONNX {prec}"] = (Session(b, threads), {in_name: x1})
    lat = interleaved(sessions, budget_s)

    rows = {}
    outs = {k: _outputs(s, next(iter(f)), m["eval"]) for k, (s, f) in sessions.items()}
    for key, (_, _) in sessions.items():
        fmt, prec = key.split()
        data = (tfl if fmt == "TFLite" else onx)[prec]
        fp32 = (tfl if fmt == "TFLite" else onx)["fp32"]
        acc = (float((outs[key].argmax(1) == m["labels"]).mean()) if m["labels"] is not None
               else _cosine(outs[key], outs[f"{fmt} fp32"]))
        rows[key] = {"bytes": len(data), "size_ratio": len(fp32) / len(data),
                     **lat[key], "vs_tflite_fp32": lat["TFLite fp32"]["p50_ms"] / lat[key]["p50_ms"],
                     "accuracy" if m["labels"] is not None else "cosine_vs_fp32": acc}
    return {"desc": m["desc"], "threads": threads, "onnx_scheme": scheme.label, "rows": rows}


def render(results: dict) -> str:
    lines = []
    for label, r in results.items():
        lines.append(f"\n{label}: {r['desc']} — {r['threads']} thread(s), ONNX int8 "
                     f"{r['onnx_scheme']}")
        metric = "accuracy" if "accuracy" in next(iter(r["rows"].values())) else "cosine_vs_fp32"
        lines.append(f"{'':14}{'bytes':>10}{'fp32/x':>8}{'p50 ms':>10}{'p95 ms':>10}"
                     f"{'speed vs TFLite fp32':>22}{metric:>16}")
        for k, row in r["rows"].items():
            lines.append(f"{k:14}{row['bytes']:>10,}{row['size_ratio']:>8.2f}"
                         f"{row['p50_ms']:>10.4f}{row['p95_ms']:>10.4f}"
                         f"{row['vs_tflite_fp32']:>21.2f}x{row[metric]:>16.4f}")
        rows = r["rows"]
        best = min(rows, key=lambda k: rows[k]["p50_ms"])
        lines.append(f"fastest here: {best}; int8 speed-up TFLite "
                     f"{rows['TFLite fp32']['p50_ms'] / rows['TFLite int8']['p50_ms']:.2f}x, ONNX "
                     f"{rows['ONNX fp32']['p50_ms'] / rows['ONNX int8']['p50_ms']:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits,mobilenet")
    ap.add_argument("--size", type=int, default=96, help="MobileNetV2 input size")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budget", type=float, default=4.0, help="seconds of timing per model")
    ap.add_argument("--json", help="write results as JSON to this file ('-' for stdout)")
    args = ap.parse_args(argv)
    from edgepack.host.build.gate import host_cpu

    results = {}
    with tempfile.TemporaryDirectory(prefix="edgepack-bench-tfl-") as tmp:
        for name in args.models.split(","):
            m = make_digits() if name == "digits" else make_mobilenet(args.size)
            results[name] = bench_model(name, m, Path(tmp), args.threads, args.budget)
    print(f"host CPU: {host_cpu()}")
    print(render(results))
    if args.json:
        text = json.dumps(results, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
