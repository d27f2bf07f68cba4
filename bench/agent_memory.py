"""bench/agent.py, memory: a bare process as the baseline, the import ladder, prototypes."""

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

_BARE = textwrap.dedent("""
    import json, sys
    import numpy as np
    import onnxruntime as ort

    path, threads, served, ladder = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]

    def rss():
        out = {}
        for line in open("/proc/self/status"):
            k = line.split(":", 1)[0]
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[k] = int(line.split()[1]) / 1024.0
        return out

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
# pulls them in, cryptography last of those (its delta is then what dropping it saves), then the
# agent's own modules (and whatever small stdlib modules only they import).
LADDER = [
    "hashlib",
    "_ssl+ssl",
    "urllib.request",
    "paho.mqtt.client",
    "sqlite3",
    "zipfile",
    "http.server+socketserver+http.client",
    "psutil",
    "logging+argparse+subprocess+queue+random",
    "cryptography.exceptions+cryptography.hazmat.primitives.serialization"
    "+cryptography.hazmat.primitives.asymmetric.ed25519",
    "edgepack.agent.daemon",
]

# Bench-only prototype of the fix: edgepack.agent.signing without cryptography in the agent
# process. Public keys are parsed from PEM by hand (fixed SPKI prefix); verification runs
# cryptography in a short-lived child. Same API and errors as the real module.
_PROTO_SIGNING = textwrap.dedent('''
    """PROTOTYPE (bench/agent.py only): Ed25519 verification in a child process."""
    from __future__ import annotations

    import base64
    import binascii
    import hashlib
    import json
    import subprocess
    import sys
    from pathlib import Path

    from edgepack.agent.errors import SignatureError

    ALG = "ed25519"
    _SPKI = bytes.fromhex("302a300506032b6570032100")
    _CHILD = (
        "import base64, json, sys\\n"
        "from cryptography.exceptions import InvalidSignature\\n"
        "from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey\\n"
        "d = json.load(sys.stdin)\\n"
        "k = Ed25519PublicKey.from_public_bytes(base64.b64decode(d['key']))\\n"
        "try:\\n"
        "    k.verify(base64.b64decode(d['sig']), base64.b64decode(d['data']))\\n"
        "except InvalidSignature:\\n"
        "    sys.exit(1)\\n")


    class RawPublicKey:
        def __init__(self, raw: bytes) -> None:
            self.raw = raw

        def verify(self, signature: bytes, data: bytes) -> None:
            doc = json.dumps({"key": base64.b64encode(self.raw).decode(),
                              "sig": base64.b64encode(signature).decode(),
                              "data": base64.b64encode(data).decode()})
            r = subprocess.run([sys.executable, "-c", _CHILD], input=doc.encode(),
                               capture_output=True, timeout=60)
            if r.returncode == 1:
                raise SignatureError("signature does not verify")
            if r.returncode != 0:
                raise SignatureError(f"signature check failed: {r.stderr.decode()[-300:]}")


    def canonical_json(obj):
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


    def key_id(public_key):
        return hashlib.sha256(public_key.raw).hexdigest()[:16]


    def load_public_key(path):
        text = Path(path).read_text()
        body = "".join(ln for ln in text.splitlines() if ln and not ln.startswith("-----"))
        der = base64.b64decode(body)
        if len(der) != 44 or not der.startswith(_SPKI):
            raise SignatureError(f"{path} is not an Ed25519 PEM public key")
        return RawPublicKey(der[12:])


    def load_public_keys(paths):
        keys = {}
        for p in paths:
            k = load_public_key(p)
            keys[key_id(k)] = k
        return keys


    def verify_detached(data, sig_doc, keys, what="bundle"):
        if not isinstance(sig_doc, dict):
            raise SignatureError(f"{what} signature is not a JSON object")
        if sig_doc.get("alg") != ALG:
            raise SignatureError(f"{what} signature algorithm is not supported")
        kid = sig_doc.get("key_id")
        if not isinstance(kid, str) or kid not in keys:
            raise SignatureError(f"{what} is signed by key {kid!r}, which is not trusted here")
        sig = sig_doc.get("sig")
        try:
            raw = base64.b64decode(sig, validate=True) if isinstance(sig, str) else b""
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != 64:
            raise SignatureError(f"{what} signature is not a base64 Ed25519 signature")
        try:
            keys[kid].verify(raw, data)
        except SignatureError:
            raise SignatureError(f"{what} signature does not verify with key {kid}") from None
        return kid
''')

_LAUNCHER = textwrap.dedent("""
    import runpy, sys
    sys.path.insert(0, {proto_dir!r})
    import _proto_signing
    sys.modules["edgepack.agent.signing"] = _proto_signing
    sys.argv[0] = "edgepack-agent"
    runpy.run_module("edgepack.agent.daemon", run_name="__main__", alter_sys=True)
""")


# glibc raises its mmap threshold (up to 32 MiB) each time a big mmapped block is freed, so
# later big buffers (a bundle member, a model being parsed) come from the heap, whose freed
# space is kept. A fixed threshold (which also turns the adjustment off) gives them back.
MMAP_ENV = (("MALLOC_MMAP_THRESHOLD_", str(128 * 1024)),)


def write_prototypes(work: Path) -> dict[str, Variant]:
    d = work / "prototype"
    d.mkdir(parents=True, exist_ok=True)
    (d / "_proto_signing.py").write_text(_PROTO_SIGNING)
    launcher = d / "launch_agent.py"
    launcher.write_text(_LAUNCHER.format(proto_dir=str(d)))
    return {"no_crypto": Variant("no_crypto", launcher),
            "mmap_threshold": Variant("mmap_threshold", env=MMAP_ENV),
            "both": Variant("both", launcher, MMAP_ENV)}


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


def time_child_verify(bench: Bench, variant: Variant, n: int = 5) -> float:
    """ms per signature check in the prototype (spawn python, import cryptography, verify)."""
    assert variant.launcher is not None
    sys.path.insert(0, str(variant.launcher.parent))
    import _proto_signing

    from edgepack.host.keys import sign_bytes

    keys = _proto_signing.load_public_keys([bench.pub])
    data = b"x" * 4096
    doc = sign_bytes(data, bench.private)
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        _proto_signing.verify_detached(data, doc, keys)
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)) * 1e3


