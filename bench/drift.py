"""Drift sketching cost: inference time with sketching on vs off, and bytes per window and day.

One run, one process, the digits CNN (the drift tests' model, shaped like ``examples/digits.py``'s:
NHWC 8x8x1, two convolutions, dense 64, 10 logits; or ``--model`` an ONNX file with the same
input, e.g. the Keras one ``python examples/digits.py --out DIR`` writes):

* **overhead**: onnxruntime (1 thread, batch 1, unseen digits cycled) timed in rounds that rotate
  over four variants — ``off`` (``session.run`` with the feeds and outputs by name, as the agent's
  inference path has them), ``on @ 1.0`` (every call sketched),
  ``on @ default`` (``DriftSketcher.observe`` after every run at the reference's default rate)
  and ``on @ 0`` (observe called, nothing sampled: the cost every call pays). Times are the
  thread's CPU time (``time.thread_time``), steadier than wall time on a shared machine. The
  ratio is the median over rounds of each variant's mean time per call / ``off``'s in the same
  round (goal ≤ 1.05 at the default rate). Two more variants go through the agent's own
  inference path, ``Model.predict`` (feeds checked and typed, outputs by name, the drift hook):
  ``predict off`` (no ``drift.json``) and ``predict @ default``; ``take_window`` (once a minute, off the inference
  path) is timed apart;
* **bytes**: the compact JSON window payload after a 60 s window at several inference rates, at
  the window's row cap (the worst case), and per device per day at one window a minute.

    .venv/bin/python bench/drift.py                    # ~1 min
    .venv/bin/python bench/drift.py --rounds 400 --calls 250 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "agent" / "drift"))

WINDOW_S = 60
RATES_HZ = (1, 10, 100)


def _time_variant(sess: object, sketcher: object, images: list, calls: int) -> float:
    """Mean CPU seconds of this thread per call over ``calls`` single-image inferences.

    onnxruntime with one intra-op thread runs in the calling thread, so the thread's CPU time
    holds the inference and the sketching and not what other processes take from the cores.
    """
    from drift_models import IMAGE, LOGITS

    run = sess.run
    n = len(images)
    start = time.thread_time()
    if sketcher is None:
        for i in range(calls):
            feed = {IMAGE: images[i % n]}
            out = {LOGITS: run(None, feed)[0]}
    else:
        observe = sketcher.observe
        for i in range(calls):
            feed = {IMAGE: images[i % n]}
            out = {LOGITS: run(None, feed)[0]}
            observe(feed, out)
    return (time.thread_time() - start) / calls


def _time_predict(model: object, images: list, calls: int) -> float:
    """Mean CPU seconds per call through the agent's ``Model.predict`` (as the endpoint runs)."""
    from drift_models import IMAGE

    predict = model.predict
    n = len(images)
    start = time.thread_time()
    for i in range(calls):
        predict({IMAGE: images[i % n]})
    return (time.thread_time() - start) / calls


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--calls", type=int, default=250, help="inferences per variant per round")
    p.add_argument("--model", type=Path, help="an ONNX digits model (NHWC 8x8x1 input)")
    p.add_argument("--json", help="also write every figure as JSON to this file ('-': stdout)")
    args = p.parse_args(argv)

    from drift_models import IMAGE, LOGITS, build_digits_cnn, digits_split, session

    from edgepack.agent.drift import DriftSketcher, payload_bytes
    from edgepack.host.build.drift_reference import (
        make_reference,
        reference_json,
        spec_from_reference,
    )

    split = digits_split()
    with tempfile.TemporaryDirectory(prefix="edgepack-drift-") as tmp:
        path = args.model or build_digits_cnn(Path(tmp) / "digits_cnn.onnx", split)
        sess = session(path)
        name = sess.get_inputs()[0].name
        out_name = sess.get_outputs()[0].name
        if (name, out_name) != (IMAGE, LOGITS):  # another exporter's names: use them
            import drift_models

            drift_models.IMAGE, drift_models.LOGITS = name, out_name
            IMAGE, LOGITS = name, out_name  # noqa: N806
        ref = make_reference({IMAGE: split.reference},
                             {LOGITS: sess.run(None, {IMAGE: split.reference})[0]},
                             task="classification")
        spec = spec_from_reference(ref)
        images = [split.stream[i][None] for i in range(len(split.stream))]
        for img in images[:200]:  # warm-up
            sess.run(None, {IMAGE: img})

        from edgepack.agent.inference import Model
        from edgepack.agent.runtimes import open_model

        model = Model(open_model(path, "onnxruntime", threads=1), {"model": {}})
        variants = {"off": None, "on @ 1.0": 1.0, f"on @ {spec.sample_rate}": spec.sample_rate,
                    "on @ 0": 0.0, "predict off": "predict", "predict @ default": "predict"}
        per_round: dict[str, list[float]] = {v: [] for v in variants}
        ratios: dict[str, list[float]] = {v: [] for v in variants}
        order = list(variants)
        for r in range(args.rounds):
            took = {}
            for v in order[r % len(order):] + order[:r % len(order)]:
                rate = variants[v]
                if rate == "predict":
                    model.drift = DriftSketcher(spec, seed=r) if v != "predict off" else None
                    took[v] = _time_predict(model, images, args.calls)
                    continue
                sketcher = None if rate is None else DriftSketcher(spec, sample_rate=rate, seed=r)
                took[v] = _time_variant(sess, sketcher, images, args.calls)
            for v in variants:
                per_round[v].append(took[v])
                base = took["predict off"] if v.startswith("predict") else took["off"]
                ratios[v].append(took[v] / base)

        windows = {}
        for hz in RATES_HZ:
            sketcher = DriftSketcher(spec, seed=hz)
            for i in range(hz * WINDOW_S):
                feed = {IMAGE: images[i % len(images)]}
                sketcher.observe(feed, {LOGITS: sess.run(None, feed)[0]})
            payload = sketcher.take_window()
            windows[f"{hz} Hz"] = {"rows": payload["rows"], "bytes": payload_bytes(payload)}
        capped = DriftSketcher(spec, sample_rate=1.0, seed=0)
        for i in range(spec.max_rows):
            feed = {IMAGE: images[i % len(images)]}
            capped.observe(feed, {LOGITS: sess.run(None, feed)[0]})
        start = time.thread_time()
        payload = capped.take_window()
        take_ms = (time.thread_time() - start) * 1e3
        windows["row cap"] = {"rows": payload["rows"], "bytes": payload_bytes(payload)}

    per_day = 24 * 3600 // WINDOW_S
    result = {
        "model": str(args.model or "drift tests' digits CNN"),
        "rounds": args.rounds, "calls": args.calls, "default_rate": spec.sample_rate,
        "k": spec.k, "reference_bytes": len(reference_json(ref)),
        "us_per_call": {v: round(statistics.median(t) * 1e6, 2) for v, t in per_round.items()},
        "ratio_vs_off": {v: round(statistics.median(r), 4) for v, r in ratios.items()},
        "take_window_ms_at_row_cap": round(take_ms, 2),
        "window_s": WINDOW_S,
        "windows": {k: {**w, "bytes_per_day": w["bytes"] * per_day} for k, w in windows.items()},
    }
    print(f"digits CNN, onnxruntime 1 thread, batch 1; {args.rounds} rounds x {args.calls} calls")
    print(f"{'variant':18s} {'µs/call':>9s} {'ratio vs off':>13s}  (predict: vs predict off)")
    for v in variants:
        print(f"{v:18s} {result['us_per_call'][v]:9.2f} {result['ratio_vs_off'][v]:13.4f}")
    print(f"take_window at the row cap ({spec.max_rows} rows): {take_ms:.1f} ms CPU, "
          f"once per window, off the inference path")
    print(f"\ndrift payload per {WINDOW_S} s window (k={spec.k}, default rate "
          f"{spec.sample_rate}); reference drift.json {result['reference_bytes']} bytes")
    print(f"{'window':10s} {'rows':>6s} {'bytes':>7s} {'bytes/device/day':>17s}")
    for k, w in result["windows"].items():
        print(f"{k:10s} {w['rows']:6d} {w['bytes']:7d} {w['bytes_per_day']:17d}")
    if args.json:
        text = json.dumps(result, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
