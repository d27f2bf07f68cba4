"""bench/agent.py, memory: a bare process as the baseline, the import ladder, the signing
stack in a process of its own, the malloc prototype."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from agent_rig import SERVED, Bench, Variant, proc_status  # noqa: E402

# --------------------------------------------------------------------------- 3. memory

_RSS = textwrap.dedent("""
    import json, sys

    def rss():
        out = {}
        for line in open("/proc/self/status"):
            k = line.split(":", 1)[0]
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[k] = int(line.split()[1]) / 1024.0
        return out
""")

_BARE = _RSS + textwrap.dedent("""
    import numpy as np
    import onnxruntime as ort

    path, threads, served, ladder = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]

    # the agent's session options (edgepack.agent.runtimes.onnx), written out with ort alone
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
    with np.load(sys.argv[1].rsplit("/", 1)[0] + "/golden.npz") as z:
        x = z["input_0"][0]
    feed = {sess.get_inputs()[0].name: x}
    for _ in range(1 + served):  # the agent's warm-up run, then the calls it served
        sess.run(None, feed)
    steps = [["bare (numpy, onnxruntime, model, inferences)", rss()]]
    import importlib
    for group in ladder:
        for mod in group.split("+"):
            importlib.import_module(mod)
        steps.append([group, rss()])
    print(json.dumps(steps))
""")

# The agent's imports, heaviest third-party and stdlib modules first in the order the daemon
# pulls them in, protocol v2's signing stack last of those (cryptography, securesystemslib,
# python-tuf: their deltas are what moving the signature work out of the agent would save),
# then the agent's own modules (and whatever small stdlib modules only they import).
SIGNING_STACK = (
    "cryptography.exceptions+cryptography.hazmat.primitives.serialization"
    "+cryptography.hazmat.primitives.asymmetric.ed25519",
    "securesystemslib.signer",
    "tuf.api.metadata",
)
LADDER = [
    "hashlib",
    "_ssl+ssl",
    "urllib.request",
    "paho.mqtt.client",
    "sqlite3",
    "zipfile",
    "http.server+socketserver+http.client",
    "psutil",
    "datasketches",
    "logging+argparse+subprocess+queue+random",
    *SIGNING_STACK,
    "edgepack.agent.daemon",
]

# Protocol v2 keeps the signature work in the agent's process: the device key signs every
# report (securesystemslib's CryptoSigner over cryptography), and desired states are TUF
# metadata checked with python-tuf. The former prototype that moved Ed25519 checks into a child
# process cannot be measured any more: the agent imports cryptography at start to sign its
# first report. What can be measured is where that work could run: in the agent (as shipped),
# in a resident helper process (its whole RSS is what it would cost), or in a short-lived child
# per check (its time, paid on every report). This is that helper: it does what the agent's
# process does with the stack, reading its RSS before and after.
_SIGNER = _RSS + textwrap.dedent("""
    import time
    t0 = time.perf_counter()
    data_dir, gate_dir, pub, fleet, device, desired, served = sys.argv[1:8]
    steps = [["python", rss()]]
    from edgepack.agent.identity import DeviceIdentity
    from edgepack.agent.trust import DesiredGate

    identity = DeviceIdentity.load(data_dir)
    gate = DesiredGate(gate_dir, device_id=device, fleet=fleet, trusted_keys=[pub])
    want = gate.desired(open(desired, "rb").read())
    for i in range(int(served)):  # reports as the agent signs them
        identity.encode({"kind": "telemetry", "device_id": device, "seq": i, "p50_ms": 1.5})
    steps.append(["edgepack.agent.identity + trust: 1 desired state checked, "
                  f"{served} reports signed", rss()])
    print(json.dumps({"steps": steps, "bundle_id": want.bundle_id,
                      "in_child_s": time.perf_counter() - t0}))
""")

# glibc raises its mmap threshold (up to 32 MiB) each time a big mmapped block is freed, so
# later big buffers (a bundle member, a model being parsed) come from the heap, whose freed
# space is kept. A fixed threshold (which also turns the adjustment off) gives them back.
MMAP_ENV = (("MALLOC_MMAP_THRESHOLD_", str(128 * 1024)),)


def write_prototypes() -> dict[str, Variant]:
    return {"mmap_threshold": Variant("mmap_threshold", env=MMAP_ENV)}


def bare_process(model_file: Path, threads: int, ladder: list[str] = ()) -> list:
    r = subprocess.run([sys.executable, "-c", _BARE, str(model_file), str(threads), str(SERVED),
                        *ladder], capture_output=True, text=True, timeout=600, cwd="/")
    if r.returncode != 0:
        raise RuntimeError(f"bare process failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout)


def serve_and_read(socket_path: Path, pid: int, x: np.ndarray, n: int = SERVED) -> dict:
    from edgepack.agent.inference import Client

    with Client(f"unix:{socket_path}") as c:
        for _ in range(n):
            c.predict(x)
    time.sleep(1.0)  # let the agent loop go idle (an outbox flush, a telemetry tick)
    return proc_status(pid)


def signer_process(bench: Bench, bundle: Path, runs: int = 5) -> dict:
    """The v2 signing work in a process of its own (see ``_SIGNER``), ``runs`` times: the RSS of
    the last run, and the median wall time of one run (spawn, imports, one desired state
    checked, ``SERVED`` reports signed): what a short-lived child per check would cost."""
    from agent_helpers import signed_desired
    from agent_rig import FLEET, enroll_device

    from edgepack.agent.bundle import read_bundle

    b = read_bundle(bundle)
    d = bench.work / "signer"
    enroll_device(d / "data", "signer", d / "enrollment.json")
    desired = d / "desired.json"
    desired.write_bytes(signed_desired(FLEET, b.bundle_id, length=bundle.stat().st_size,
                                       device_id="signer", name=b.name, version=b.version,
                                       deployment_id="d-signer", key=bench.key))
    walls, out = [], {}
    for k in range(runs):
        trust = d / f"trust-{k}"  # a fresh trust dir per run: no state carried over
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", _SIGNER, str(d / "data"), str(trust),
                            str(bench.pub), FLEET, "signer", str(desired), str(SERVED)],
                           capture_output=True, text=True, timeout=120, cwd="/")
        walls.append(time.perf_counter() - t0)
        if r.returncode != 0:
            raise RuntimeError(f"signer process failed: {r.stderr[-2000:]}")
        out = json.loads(r.stdout)
        if out["bundle_id"] != b.bundle_id:
            raise RuntimeError("the signer process verified another bundle id")
    return {"steps": out["steps"], "child_ms": float(np.median(walls)) * 1e3, "runs": runs}
