"""Benchmark the on-device agent against bare baselines measured in the same run (issue 3, item 12).

Three sub-benchmarks, each against a baseline timed or measured in the same run:

inference
    The agent's inference path vs a bare ``onnxruntime.InferenceSession.run`` on the same model
    file, same thread count, same input, repetitions interleaved in rotating blocks. Timed: the
    in-process Python API (``Model.predict`` on an array, ``Model.run`` on typed feeds, both on
    ``Model.active(data_dir)`` of an agent that installed the bundle), the Model's own session
    called directly (pure wrapper overhead) and, for information, the local endpoint
    (``Client("unix:…").predict``: npy over HTTP on the agent's Unix socket, inference in the
    agent process). Goal: ``Model.predict`` p50 <= 1.05x bare on MobileNetV2; the digits CNN too.
transfer
    A ~20 MB signed bundle (an MLP whose random initializer makes it incompressible) delivered over
    loopback Mosquitto to a real agent process, vs ``mosquitto_pub -f`` -> ``mosquitto_sub`` of
    the same bytes on the same broker, rounds interleaved. Timed from just before the retained
    desired state is published (what ``edgepack deploy`` writes, host connect included) to the
    agent's ``downloaded`` event (every chunk checked against the signed table, the file's sha256
    equal to the bundle id), and on to ``verified`` (signature, target, runtime, budgets). The
    chunk transfer alone is ``download_started`` -> ``downloaded`` (after the manifest was
    fetched and its table signature checked). Timestamps are the agent's own event ``ts``
    (same host clock). Raw: from spawning ``mosquitto_pub -q 1 -f`` to ``mosquitto_sub -C 1``
    exiting with the bytes; also the fetch of the same bytes as one retained message. Goal: <= 2x.
memory
    VmRSS of the agent process (from ``/proc/<pid>/status``) after it installed a bundle and served
    it through its endpoint, vs a bare process that imports numpy + onnxruntime, loads the same
    model with the same session options and runs the same number of inferences. Goal: <= 15 MB.
    Each agent is enrolled as ``edgepack agent init`` does it (its own Ed25519 device key, with
    which it signs every report) and deployed to as the fleet does under protocol v2 (chunk
    table signed, desired state as signed, expiring TUF metadata: ``tests/agent/agent_helpers``'
    ``deploy`` over ``edgepack.host.fleet.publish`` and ``edgepack.host.fleet.trust``).
    Then where the difference goes: RSS after each import, in a bare process, in the agent's
    order, with the v2 signing stack (cryptography, securesystemslib, python-tuf) imported last
    (its delta is what moving the signature work out of the agent would save); that work in a
    process of its own (its RSS: the cost of a resident helper; its wall time: the cost of a
    short-lived child per check); and a prototype that leaves the agent's code unchanged (glibc's
    ``MALLOC_MMAP_THRESHOLD_``) measured like the agent.

Nothing is downloaded: MobileNetV2 (random weights, batch-norm statistics set from smooth random
images) and the digits CNN come from ``bench/build.py``'s builders and ``edgepack.host.build``;
the 20 MB bundles from ``tests/agent/agent_helpers.py``. Mosquitto comes from ``tests/brokers.py``.

    python bench/agent.py                                  # all three, both models
    python bench/agent.py --only transfer --reps 7
    python bench/agent.py --only inference,memory --models digits --json out.json
    python bench/agent.py --keep /tmp/agent-bench          # reuse built bundles next time
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from agent_memory import (  # noqa: E402
    LADDER,
    bare_process,
    serve_and_read,
    signer_process,
    write_prototypes,
)
from agent_report import _loaded, render  # noqa: E402
from agent_rig import (  # noqa: E402
    GOALS,
    SERVED,
    TARGET,
    Bench,
    Variant,
    _bench_build,
    _ratios,
    deploy_and_wait,
    golden_input,
    interleaved,
    log,
    make_model_bundles,
    proc_status,
    verified_report,
    wait_socket,
)
from agent_transfer import _mosq, bench_transfer  # noqa: E402

# --------------------------------------------------------------------------- 1. inference

def bench_inference(slot_dir: Path, data_dir: Path, socket_path: Path, threads: int,
                    budget_s: float) -> dict:
    """Three interleaved passes (see :func:`interleaved`):

    * goal: bare session vs ``Model.predict`` vs ``Model.run``, each on its own session (a
      session that several callables share runs warmer than one called a third as often: 25%
      faster here on two threads, whatever its options, so sessions are never shared across
      callables being compared);
    * wrapper: the Model's own ``session.run`` vs ``Model.predict`` vs ``Model.run``, all on that
      one session: the Python cost of the API alone;
    * endpoint: bare vs ``Client.predict`` over the agent's Unix socket."""
    import onnxruntime as ort

    from edgepack.agent.inference import Client, Model

    m_predict = Model.active(data_dir, threads=threads)
    m_run = Model.active(data_dir, threads=threads)
    assert m_predict.path is not None and m_predict.path.resolve() == slot_dir.resolve()
    model_file = slot_dir / m_predict.manifest["model"]["file"]
    x = golden_input(slot_dir)
    opts = ort.SessionOptions()  # what a user writes: defaults, same thread count
    opts.intra_op_num_threads = threads
    bare = ort.InferenceSession(str(model_file), sess_options=opts,
                                providers=["CPUExecutionProvider"])
    feed = {bare.get_inputs()[0].name: x}
    typed = m_run.feeds(x)
    own = m_predict.session._sess  # private, on purpose: the session under Model.predict
    names = [o.name for o in own.get_outputs()]
    ref = bare.run(None, feed)
    got = m_predict.predict(x)
    client = Client(f"unix:{socket_path}")
    via = client.predict(x)
    for j, o in enumerate(m_predict.outputs):
        for what, arr in (("Model.predict", got[o.name]), ("endpoint", via[o.name])):
            if not np.allclose(arr, ref[j], rtol=1e-4, atol=1e-5):
                raise RuntimeError(f"{what} output {o.name} differs from bare session.run")
    load = [os.getloadavg()[0]]
    goal = interleaved({"bare": lambda: bare.run(None, feed),
                        "predict": lambda: m_predict.predict(x),
                        "run": lambda: m_run.run(typed)}, budget_s)
    wrap = interleaved({"own_session": lambda: own.run(names, typed),
                        "predict": lambda: m_predict.predict(x),
                        "run": lambda: m_predict.run(typed)}, budget_s / 2)
    ep = interleaved({"bare": lambda: bare.run(None, feed),
                      "endpoint": lambda: client.predict(x)}, budget_s / 2)
    load.append(os.getloadavg()[0])
    client.close()
    ratios = {"predict": _ratios(goal, "predict", "bare"), "run": _ratios(goal, "run", "bare"),
              "predict_vs_own_session": _ratios(wrap, "predict", "own_session"),
              "run_vs_own_session": _ratios(wrap, "run", "own_session"),
              "endpoint": _ratios(ep, "endpoint", "bare")}
    passes = {"goal": goal, "wrapper": wrap, "endpoint": ep}
    for p in passes.values():
        for v in p.values():
            v.pop("_rounds", None)
    overhead_us = {k: (wrap[k]["p50_ms"] - wrap["own_session"]["p50_ms"]) * 1e3
                   for k in ("predict", "run")}
    return {"model_file_bytes": model_file.stat().st_size, "input_shape": list(x.shape),
            "input_dtype": str(x.dtype), "threads": threads, "latency_ms": passes,
            "ratios": ratios, "wrapper_overhead_us_p50": overhead_us,
            "loadavg_1min": [round(v, 2) for v in load]}


# --------------------------------------------------------------------------- driver

def bench_model(bench: Bench, name: str, bundle: Path, threads: int, args: Any,
                variants: dict[str, Variant]) -> dict:
    from edgepack.agent.inference import active_slot_dir

    out: dict[str, Any] = {"bundle": bundle.name, "bundle_bytes": bundle.stat().st_size}
    log(f"{name}: fresh agent, deploying {bundle.name}")
    agent, device, data_dir = bench.new_agent(threads)
    installed = deploy_and_wait(bench, device, bundle)
    out["report_signed_by"] = verified_report(installed, device, data_dir)
    out["health"] = {k: installed.get("health", {}).get(k) for k in ("latency_ms", "peak_rss_mb",
                                                                      "baseline_rss_mb")}
    slot = active_slot_dir(data_dir)
    sock = data_dir / "agent.sock"
    wait_socket(sock)
    x = golden_input(slot)
    model_file = slot / json.loads((slot / "manifest.json").read_text())["model"]["file"]
    pid = agent.proc.pid
    if "memory" in args.only:
        log(f"{name}: agent RSS after install + {SERVED} endpoint calls; bare process")
        mem: dict[str, Any] = {"agent_after_install": serve_and_read(sock, pid, x)}
        mem["agent_after_install"]["cryptography_mapped"] = _loaded(pid)
        bare = bare_process(model_file, threads)
        mem["bare"] = bare[0][1]
    if "inference" in args.only:
        log(f"{name}: timing inference paths interleaved ({args.budget:g}s)")
        out["inference"] = bench_inference(slot, data_dir, sock, threads, args.budget)
    if "memory" in args.only:
        mem["agent_after_inference_bench"] = proc_status(pid)
        agent.stop()
        agent.start()  # boots with the committed bundle
        wait_socket(sock)
        mem["agent_after_restart"] = serve_and_read(sock, agent.proc.pid, x)
        agent.stop()
        log(f"{name}: import ladder in a bare process")
        mem["ladder"] = bare_process(model_file, threads, LADDER)
        for vname, variant in variants.items():
            log(f"{name}: prototype {vname}")
            pa, pdev, pdata = bench.new_agent(threads, variant=variant)
            deploy_and_wait(bench, pdev, bundle)
            psock = pdata / "agent.sock"
            wait_socket(psock)
            ppid = pa.proc.pid
            mem[f"proto_{vname}"] = serve_and_read(psock, ppid, x)
            pa.stop()
        b = mem["bare"]["VmRSS"]
        mem["over_bare_mb"] = {k: v["VmRSS"] - b for k, v in mem.items()
                               if isinstance(v, dict) and "VmRSS" in v and k != "bare"}
        out["memory"] = mem
    else:
        agent.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="inference,transfer,memory",
                    help="comma-separated: inference, transfer, memory (default: all)")
    ap.add_argument("--models", default="mobilenetv2,digits",
                    help="models for inference and memory: mobilenetv2, digits (default: both)")
    ap.add_argument("--size", type=int, default=160, help="MobileNetV2 input side (default 160)")
    ap.add_argument("--quantize", default="int8", choices=["int8", "none"],
                    help="bundle precision for inference and memory (default int8)")
    ap.add_argument("--threads", type=int, default=None,
                    help="inference threads, agent and baselines (default: the target's, "
                    "all cores here)")
    ap.add_argument("--budget", type=float, default=20.0,
                    help="seconds of interleaved inference timing per model (default 20)")
    ap.add_argument("--reps", type=int, default=5, help="transfer rounds (default 5)")
    ap.add_argument("--mb", type=float, default=20.0, help="transfer bundle size (default 20)")
    ap.add_argument("--no-prototype", action="store_true",
                    help="skip the memory fix prototype (MALLOC_MMAP_THRESHOLD_) and the "
                    "signing stack in a process of its own")
    ap.add_argument("--json", metavar="PATH", help="write the figures as JSON ('-' = stdout)")
    ap.add_argument("--keep", metavar="DIR", help="work in DIR (bundles are reused next run)")
    args = ap.parse_args(argv)
    args.only = {s.strip() for s in args.only.split(",") if s.strip()}
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = sorted(args.only - {"inference", "transfer", "memory"}) + [
        m for m in models if m not in ("mobilenetv2", "digits")]
    if bad:
        ap.error(f"unknown: {', '.join(bad)}")

    import onnxruntime

    from edgepack.agent.profiles import load_profile
    from edgepack.host.build.plan import host_threads

    threads = args.threads or host_threads(load_profile(TARGET))
    b = _bench_build()
    mosq = subprocess.run([_mosq("mosquitto"), "-h"], capture_output=True, text=True)
    res: dict[str, Any] = {
        "env": {"date": time.strftime("%Y-%m-%d"), "cpu": b.cpu_name(), "cpus": os.cpu_count(),
                "cpu_flags": b.cpu_flags(), "python": platform.python_version(),
                "onnxruntime": onnxruntime.__version__, "threads": threads, "target": TARGET,
                "mosquitto": (mosq.stdout or mosq.stderr).splitlines()[0].strip()},
        "goals": GOALS, "models": {}, "failed": {}}
    tmp = None
    if args.keep:
        work = Path(args.keep)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="edgepack-agent-bench-")
        work = Path(tmp.name)
    t_start = time.perf_counter()
    bench = Bench(work)
    try:
        variants: dict[str, Variant] = {}
        if args.only & {"memory", "transfer"} and not args.no_prototype:
            variants = write_prototypes()
        if args.only & {"inference", "memory"}:
            key_path = bench.key
            bundles = make_model_bundles(models, work, key_path, args.size, args.quantize)
            if "memory" in args.only and not args.no_prototype:
                log("the v2 signing work in a process of its own")
                res["signer"] = signer_process(bench, bundles[models[0]])
            for m in models:
                try:
                    res["models"][m] = bench_model(bench, m, bundles[m], threads, args, variants)
                except Exception as exc:  # report it and go on
                    log(f"{m}: FAILED: {type(exc).__name__}: {exc}")
                    res["failed"][m] = f"{type(exc).__name__}: {str(exc)[:500]}"
        if "transfer" in args.only:
            try:
                res["transfer"] = bench_transfer(bench, args.reps, args.mb, threads,
                                                 variants.get("mmap_threshold"))
            except Exception as exc:
                log(f"transfer: FAILED: {type(exc).__name__}: {exc}")
                res["failed"]["transfer"] = f"{type(exc).__name__}: {str(exc)[:500]}"
    finally:
        bench.close()
        if tmp is not None:
            tmp.cleanup()
    res["env"]["total_s"] = time.perf_counter() - t_start
    print(render(res))
    if args.json:
        text = json.dumps(res, indent=2, default=float)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
            log(f"figures written to {args.json}")
    return 1 if res["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

