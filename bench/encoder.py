"""Benchmark the variant search: what ``edgepack build`` ships by default on x86-64-vnni.

Measured in one run (issue 14, item 11), ratios within the run:

a) a Keras transformer encoder (4 layers, width 256, sequence 128, GELU, 4 heads, an 8000-token
   embedding): the shipped variant's speed vs fp32 (goal >= 1.3x) and size ratio (goal >= 3.5x);
b) MobileNetV2 (``keras.applications`` with ``weights=None``, batch-norm statistics from smooth
   random images, as in ``bench/build.py``): size ratio (goal >= 3.7x) and speed vs fp32
   (goal: not slower);
c) build time of ``edgepack build`` with the variant search vs a bare onnxruntime
   ``quantize_static`` with its defaults on the same model and calibration data (goal <= 3x).

Both builds use the default mode (``quantize=`` auto) with calibration and eval data: the
search weighs fp32, dynamic int8 and the profile's static schemes. Nothing is downloaded.

    python bench/encoder.py                      # both models
    python bench/encoder.py --models encoder --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
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

from bench.build import (  # noqa: E402
    interleaved_latency,
    log,
    make_mobilenet,
    ort_default_quantize,
    paired_speedup,
)

TARGET = "x86-64-vnni"
GOALS = {"encoder_speedup": 1.3, "encoder_size_ratio": 3.5, "mobilenet_size_ratio": 3.7,
         "mobilenet_speedup": 1.0, "build_ratio": 3.0}


def make_encoder(out: Path, *, layers: int, width: int, seq: int, vocab: int,
                 n_calib: int, n_eval: int) -> dict:
    """A BERT-style encoder classifier in Keras, exported to ONNX by edgepack's importer
    (tf2onnx plus the intake's repairs), with token-id calibration and eval sets."""
    import keras

    from edgepack.host.build.importers import import_model

    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(0)
    ids = keras.Input((seq,), dtype="int32", name="ids")
    x = keras.layers.Embedding(vocab, width, name="tokens")(ids)
    x = x + keras.layers.Embedding(seq, width, name="positions")(keras.ops.arange(seq)[None, :])
    for i in range(layers):
        att = keras.layers.MultiHeadAttention(num_heads=4, key_dim=width // 4,
                                              name=f"mha{i}")(x, x)
        x = keras.layers.LayerNormalization(name=f"ln{i}a")(x + att)
        ff = keras.layers.Dense(4 * width, activation="gelu", name=f"ff{i}_in")(x)
        ff = keras.layers.Dense(width, name=f"ff{i}_out")(ff)
        x = keras.layers.LayerNormalization(name=f"ln{i}b")(x + ff)
    x = keras.layers.GlobalAveragePooling1D()(x)
    y = keras.layers.Softmax(name="probs")(keras.layers.Dense(4, name="head")(x))
    model = keras.Model(ids, y, name="encoder")
    src = out / "encoder.keras"
    model.save(src)
    imported = import_model(src, workdir=out, opset=17, sample_input=None)
    rng = np.random.default_rng(1)
    np.savez(out / "calib.npz", ids=rng.integers(0, vocab, (n_calib, seq)).astype(np.int32))
    np.savez(out / "eval.npz", ids=rng.integers(0, vocab, (n_eval, seq)).astype(np.int32))
    log(f"encoder: {model.count_params():,} params, {layers} layers, width {width}, seq {seq}")
    return {"model": imported.onnx_path, "calibration": out / "calib.npz",
            "eval": out / "eval.npz",
            "desc": f"Keras encoder: {layers} layers, width {width}, sequence {seq}, vocab "
                    f"{vocab}, {model.count_params():,} params; {n_calib} calib / {n_eval} "
                    "eval random token sequences"}


def bench_model(label: str, files: dict, work: Path, threads: int, budget: float,
                max_drop: float | None) -> dict:
    from edgepack.host.build import build

    src = Path(files["model"])  # the same ONNX file as the bare quantize_static call
    log(f"{label}: bare onnxruntime quantize_static (defaults)")
    t_ort = ort_default_quantize(Path(files["model"]), Path(files["calibration"]),
                                 work / f"{label}.ort.onnx")
    log(f"{label}: edgepack build {src.name} --target {TARGET} (default mode, search on)")
    t0 = time.perf_counter()
    res = build(str(src), target=TARGET, calibration=str(files["calibration"]),
                eval=str(files["eval"]), out=str(work / f"dist-{label}"), max_drop=max_drop)
    t_build = time.perf_counter() - t0
    rep = res.report.to_dict()
    fp32 = Path(files["model"]).read_bytes()
    with np.load(files["eval"]) as z:
        name = [k for k in z.files if k != "labels"][0]
        feed = {name: np.ascontiguousarray(z[name][:1])}
    import onnx

    inp = onnx.load_from_string(fp32).graph.input[0].name
    feed = {inp: feed[name]}
    from edgepack.host.build.convert_onnx import prepare_onnx

    # edgepack's own fp32 candidate: the pre-flight's graph (static shapes, folded, LayerNorm
    # and GELU fused), which the variant search weighs the int8 candidates against.
    prepared = prepare_onnx(src, opset=17, batch=1, target=TARGET).model_bytes
    log(f"{label}: timing fp32 (as given and pre-flighted) and the shipped model interleaved, "
        f"{threads} thread(s)")
    lat = interleaved_latency({"fp32": fp32, "fp32-preflight": prepared,
                               "shipped": res.model_bytes}, feed, threads, budget)
    paired = paired_speedup(lat, "fp32", "shipped")
    paired_pre = paired_speedup(lat, "fp32-preflight", "shipped")
    for v in lat.values():
        del v["_rounds"]
    size = rep["metrics"]["size"]
    return {
        "model": files["desc"],
        "shipped": rep["optimization"]["summary"],
        "chosen_by": rep["optimization"].get("chosen_by"),
        "size_ratio": size["ratio"], "size_bytes": size,
        "speedup_vs_fp32": lat["fp32"]["p50_ms"] / lat["shipped"]["p50_ms"],
        "paired_speedup_vs_fp32": paired, "latency_ms": lat,
        "speedup_vs_preflight_fp32": lat["fp32-preflight"]["p50_ms"] / lat["shipped"]["p50_ms"],
        "paired_speedup_vs_preflight_fp32": paired_pre,
        "build_s": {"edgepack": t_build, "ort_quantize_static": t_ort},
        "build_ratio": t_build / t_ort,
        "build_stages_s": rep["timings_s"],
        "gate": {k: rep["metrics"]["accuracy"].get(k)
                 for k in ("basis", "drop_points", "min_cosine", "min_sqnr_db", "samples")},
        "variants": [{k: v[k] for k in ("scheme", "bytes", "drop_points", "passed", "result")}
                     | {"p50_ms": v["latency"]["p50_ms"]} for v in rep.get("variants") or []],
        "warnings": rep["warnings"],
    }


def _made(work: Path, m: str) -> dict | None:
    d = work / m
    model = d / ("encoder.onnx" if m == "encoder" else "mobilenetv2.onnx")
    if not (model.exists() and (d / "calib.npz").exists() and (d / "eval.npz").exists()):
        return None
    return {"model": model, "calibration": d / "calib.npz", "eval": d / "eval.npz"}


def render(results: dict) -> str:
    lines = [f"edgepack build, default mode on {TARGET} ({results['env']['threads']} thread(s), "
             f"onnxruntime {results['env']['onnxruntime']})"]
    for name, r in results["models"].items():
        lines += [f"\n{name}: {r['model']}", f"  shipped: {r['shipped']} ({r['chosen_by']})",
                  f"  speed vs fp32: {r['speedup_vs_fp32']:.2f}x (paired rounds "
                  f"{r['paired_speedup_vs_fp32']:.2f}x); size ratio {r['size_ratio']:.2f}x",
                  f"  speed vs edgepack's pre-flighted fp32: "
                  f"{r['speedup_vs_preflight_fp32']:.2f}x (paired rounds "
                  f"{r['paired_speedup_vs_preflight_fp32']:.2f}x)",
                  f"  build: {r['build_s']['edgepack']:.1f} s vs bare quantize_static "
                  f"{r['build_s']['ort_quantize_static']:.1f} s = {r['build_ratio']:.2f}x"]
        for v in r["variants"]:
            p50, drop = v["p50_ms"], v["drop_points"]
            lines.append(f"    {v['scheme']:<20} {v['bytes']:>11,} B  p50 "
                         f"{'—' if p50 is None else f'{p50:.3f}':>9} ms  drop "
                         f"{'—' if drop is None else f'{drop:.2f}':>6}  {v['result']}")
    for name, why in results["failed"].items():
        lines.append(f"\n{name}: FAILED {why}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="encoder,mobilenet")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--size", type=int, default=160, help="MobileNetV2 input side")
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--eval", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--latency-budget", type=float, default=10.0)
    ap.add_argument("--mobilenet-max-drop", type=float, default=100.0,
                    help="max drop for MobileNetV2 (default: gate off; its random weights make "
                         "its outputs say nothing about a trained model)")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--keep", metavar="DIR",
                    help="keep artifacts in DIR; models already there are reused")
    args = ap.parse_args(argv)
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]

    import onnxruntime

    from edgepack.agent.profiles import load_profile
    from edgepack.host.build.plan import host_threads

    threads = args.threads or host_threads(load_profile(TARGET))
    results: dict[str, Any] = {"env": {"threads": threads, "cpus": os.cpu_count(),
                                       "onnxruntime": onnxruntime.__version__,
                                       "date": time.strftime("%Y-%m-%d")},
                               "goals": GOALS, "models": {}, "failed": {}}
    with tempfile.TemporaryDirectory(prefix="edgepack-bench-") as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        files = {}
        for m in wanted:
            if args.keep and _made(work, m):  # models made by an earlier run with --keep
                files[m] = _made(work, m)
                files[m]["desc"] = (f"Keras encoder: {args.layers} layers, width {args.width}, "
                                    f"sequence {args.seq}" if m == "encoder" else
                                    f"keras.applications.MobileNetV2(weights=None, "
                                    f"{args.size}x{args.size}x3)") + f", reused from {work}"
                continue
            log(f"making {m}")
            files[m] = (make_encoder(work / "encoder", layers=args.layers, width=args.width,
                                     seq=args.seq, vocab=8000, n_calib=args.calib,
                                     n_eval=args.eval) if m == "encoder"
                        else make_mobilenet(work / "mobilenet", args.size, args.calib,
                                            args.eval, 32))
        for m in wanted:
            drop = args.mobilenet_max_drop if m == "mobilenet" else None
            try:
                results["models"][m] = bench_model(m, files[m], work, threads,
                                                   args.latency_budget, drop)
            except Exception as exc:  # report it and go on with the other model
                log(f"{m}: FAILED: {type(exc).__name__}: {exc}")
                results["failed"][m] = f"{type(exc).__name__}: {str(exc)[:500]}"
    print(render(results))
    if args.json:
        text = json.dumps(results, indent=2, default=float)
        print(text) if args.json == "-" else Path(args.json).write_text(text + "\n")
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
