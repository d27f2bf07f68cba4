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
    Then where the difference goes: RSS after each import, in a bare process, in the agent's
    order, with ``cryptography`` imported last (its delta is what removing it saves); and a
    prototype of the recommended fix (the agent launched with a bench-only
    ``edgepack.agent.signing`` that verifies Ed25519 in a short-lived child process, so the
    agent never imports cryptography) measured the same way.

Nothing is downloaded: MobileNetV2 (random weights, batch-norm statistics set from smooth random
images) and the digits CNN come from ``bench/build.py``'s builders and ``edgepack.host.build.pipeline``;
the 20 MB bundles from ``tests/agent/agent_helpers.py``. Mosquitto comes from ``tests/brokers.py``.

    python bench/agent.py                                  # all three, both models
    python bench/agent.py --only transfer --reps 7
    python bench/agent.py --only inference,memory --models digits --json out.json
    python bench/agent.py --keep /tmp/agent-bench          # reuse built bundles next time
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT, ROOT / "tests", ROOT / "tests" / "agent"):  # examples, brokers, agent_helpers
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

TARGET = "x86-64-vnni"  # what bench/build.py builds for; the agent runs as this target
FLEET = "bench"
GOALS = {"inference_ratio": 1.05, "transfer_ratio": 2.0, "rss_over_bare_mb": 15.0}
SERVED = 20  # endpoint calls before RSS is read (and inferences in the bare process)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _bench_build() -> Any:
    """bench/build.py (model builders, CPU info), loaded by path: ``build`` is also a PyPI name."""
    spec = importlib.util.spec_from_file_location("_bench_build", ROOT / "bench" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------- /proc

def proc_status(pid: int | str = "self") -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile (MB) of a process."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
            v = int(line.split()[1])
            out[key] = v if key == "Threads" else v / 1024.0
    return out


# --------------------------------------------------------------------------- bundles

def make_model_bundles(models: list[str], work: Path, key: Path, size: int,
                       quantize: str) -> dict[str, Path]:
    """Build a signed bundle per model with ``edgepack.host.build.pipeline.run_build`` (cached)."""
    out: dict[str, Path] = {}
    todo = []
    for m in models:
        path = work / "bundles" / f"{m}-{quantize}{'-' + str(size) if m == 'mobilenetv2' else ''}" \
            ".edgepack"
        out[m] = path
        if not path.exists():
            todo.append(m)
    if not todo:
        return out
    from edgepack.host.build.pipeline import BuildConfig, run_build
    from edgepack.host.build.report import Progress

    b = _bench_build()
    for m in todo:
        log(f"making {m}")
        files = (b.make_mobilenet(work / "mobilenet", size, 100, 50, 32) if m == "mobilenetv2"
                 else b.make_digits(work / "digits"))
        log(f"building the {m} bundle (target {TARGET}, {quantize})")
        cfg = BuildConfig(model=str(files["model"]), target=TARGET, quantize=quantize,
                          calibration=str(files["calibration"]), eval_data=str(files["eval"]),
                          key=str(key), out_dir=str(work / "dist" / m), variants=False,
                          name=m, max_drop=100.0 if m == "mobilenetv2" else None)
        res = run_build(cfg, Progress(enabled=False))
        out[m].parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(res.path, out[m])
    return out


# --------------------------------------------------------------------------- agents

class Bench:
    """The broker, keys and agents of one run."""

    def __init__(self, work: Path) -> None:
        from brokers import start_mosquitto

        from edgepack.host.keys import generate_keys, load_private_key

        self.work = work
        keydir = work / "keys"
        if not (keydir / "fleet.key").exists():
            generate_keys(keydir, "fleet", overwrite=True)
        self.key, self.pub = keydir / "fleet.key", keydir / "fleet.pub"
        self.private = load_private_key(self.key)
        self.broker = start_mosquitto()
        self.url = self.broker.url
        self._n = 0
        self.agents: list[Any] = []

    def close(self) -> None:
        for a in self.agents:
            a.stop()
        self.broker.stop()
        shutil.rmtree(self.broker.workdir, ignore_errors=True)

    def new_agent(self, threads: int, *, variant: Variant | None = None
                  ) -> tuple[Any, str, Path]:
        """A fresh agent process (own data dir and device id), production transfer settings."""
        from agent_helpers import AgentProcess, agent_config

        from edgepack.agent.config import TransferSection

        self._n += 1
        device = f"bench{self._n}"
        d = self.work / "agents" / f"{device}-{int(time.time())}"
        cfg = agent_config(d, self.url, FLEET, device_id=device, pub=self.pub, target=TARGET,
                           transfer=dataclasses.asdict(TransferSection()),
                           telemetry={"interval_s": 10.0}, runtime={"threads": threads},
                           # the gate's p95 budget is for a quiet device; this host is shared
                           health={"timeout_s": 300.0, "enforce_budgets": False})
        agent = (_LaunchedAgent(cfg, variant) if variant else AgentProcess(cfg)).start()
        self.agents.append(agent)
        return agent, device, d / "data"


@dataclasses.dataclass(frozen=True)
class Variant:
    """The agent as shipped, changed only by how it is launched (a prototype of a fix)."""

    name: str
    launcher: Path | None = None  # a script replacing ``-m edgepack.agent.daemon``
    env: tuple[tuple[str, str], ...] = ()


class _LaunchedAgent:
    """An agent process started as a :class:`Variant`."""

    def __init__(self, config: Path, variant: Variant) -> None:
        from agent_helpers import AgentProcess

        self._p = AgentProcess(config)
        self._v = variant

    def start(self) -> _LaunchedAgent:
        entry = [str(self._v.launcher)] if self._v.launcher else ["-m", "edgepack.agent.daemon"]
        with open(self._p.log, "ab") as logf:
            self._p.proc = subprocess.Popen(
                [sys.executable, *entry, "--config", str(self._p.config)],
                stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=dict(os.environ, PYTHONUNBUFFERED="1", **dict(self._v.env)))
        return self

    def __getattr__(self, name: str) -> Any:
        return getattr(self._p, name)


def deploy_and_wait(bench: Bench, device: str, bundle: Path, timeout: float = 300.0) -> dict:
    """Publish (if needed) and deploy ``bundle`` to ``device``; return the ``installed`` event."""
    from agent_helpers import Watcher, deploy

    with Watcher(bench.url, FLEET, device) as w:
        _, dep = deploy(bench.url, FLEET, bundle, key=bench.key, device_id=device,
                        chunk_size=None)
        bad = ("rejected", "health_failed", "rolled_back")
        w.wait(lambda: any(k in w.kinds(dep) for k in ("installed", *bad)), timeout,
               f"install of {bundle.name}")
        for e in w.events:
            if e.get("deployment_id") == dep and e["kind"] in bad:
                raise RuntimeError(f"{bundle.name}: {e['kind']}: {e.get('detail')}")
        return w.wait_event("installed", dep)


def wait_socket(path: Path, timeout: float = 30.0) -> None:
    from edgepack.agent.inference import Client

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with Client(f"unix:{path}", timeout=2) as c:
                c.info()
                return
        except Exception:  # noqa: BLE001 - not up yet, or no model yet
            time.sleep(0.1)
    raise TimeoutError(f"the agent's endpoint {path} did not serve a model within {timeout}s")


def golden_input(slot_dir: Path) -> np.ndarray:
    with np.load(slot_dir / "golden.npz") as z:
        return np.ascontiguousarray(z["input_0"][0])


# --------------------------------------------------------------------------- timing

def interleaved(fns: dict[str, Callable[[], Any]], budget_s: float, block_s: float = 0.002,
                settle_s: float = 0.02, discard: int = 2) -> dict[str, dict]:
    """p50/p95/mean ms per callable, timed in short blocks (one call of MobileNetV2, ~2 ms of
    calls of a tiny model), every callable once per round in a fresh random order (a fixed
    rotation can alias with periodic load): adjacent blocks are tens of milliseconds apart, so
    load from other jobs on a shared machine hits all of them alike, and the median over rounds
    of per-round ratios (``paired``) pairs them.

    Before each block: a pause and ``discard`` untimed calls of that callable, because
    onnxruntime's worker threads keep spinning after a run and would steal the CPU from the next
    session's block (bench/build.py measured up to 2.6x on two cores without it)."""
    names = list(fns)
    block: dict[str, int] = {}
    for n in names:
        for _ in range(5):
            fns[n]()
        t0 = time.perf_counter()
        for _ in range(5):
            fns[n]()
        one = max((time.perf_counter() - t0) / 5, 1e-6)
        block[n] = int(min(200, max(1, block_s / one)))
    round_s = sum(settle_s + (block[n] + discard) * block_s / block[n] for n in names)
    rounds = int(min(5000, max(10, budget_s / round_s)))
    times: dict[str, list[float]] = {n: [] for n in names}
    per_round: dict[str, list[float]] = {n: [] for n in names}
    rng = np.random.default_rng(0)
    for _ in range(rounds):
        for n in rng.permutation(names):
            fn = fns[n]
            time.sleep(settle_s)
            for _ in range(discard):
                fn()
            ms = []
            for _ in range(block[n]):
                t = time.perf_counter()
                fn()
                ms.append((time.perf_counter() - t) * 1e3)
            times[n] += ms
            per_round[n].append(float(np.median(ms)))
    out = {}
    for n in names:
        a = np.array(times[n])
        out[n] = {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
                  "mean_ms": float(a.mean()), "runs": len(a), "rounds": rounds,
                  "_rounds": np.array(per_round[n])}
    return out


def _ratios(lat: dict, name: str, base: str) -> dict[str, float]:
    return {"p50": lat[name]["p50_ms"] / lat[base]["p50_ms"],
            "mean": lat[name]["mean_ms"] / lat[base]["mean_ms"],
            "paired": float(np.median(lat[name]["_rounds"] / lat[base]["_rounds"]))}


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


# --------------------------------------------------------------------------- 2. transfer

def _mosq(tool: str) -> str:
    exe = shutil.which(tool)
    if exe is None:
        raise RuntimeError(f"{tool} is not installed (apt-get install mosquitto-clients)")
    return exe


def raw_live(port: int, payload: Path, out: Path, topic: str) -> float:
    """Seconds from spawning ``mosquitto_pub -f`` to ``mosquitto_sub`` exiting with the bytes."""
    with open(out, "wb") as f:
        sub = subprocess.Popen([_mosq("mosquitto_sub"), "-h", "127.0.0.1", "-p", str(port), "-t",
                                topic, "-q", "1", "-C", "1", "-N"], stdout=f)
        time.sleep(0.5)  # subscribed long before this (not timed)
        t0 = time.perf_counter()
        pub = subprocess.Popen([_mosq("mosquitto_pub"), "-h", "127.0.0.1", "-p", str(port), "-t",
                                topic, "-q", "1", "-f", str(payload)])
        sub.wait(60)
        t = time.perf_counter() - t0
        pub.wait(60)
    return t


def raw_retained(port: int, payload: Path, out: Path, topic: str) -> float:
    """Seconds for ``mosquitto_sub -C 1`` to fetch the same bytes held as one retained message."""
    subprocess.run([_mosq("mosquitto_pub"), "-h", "127.0.0.1", "-p", str(port), "-t", topic,
                    "-q", "1", "-r", "-f", str(payload)], check=True, timeout=60)
    with open(out, "wb") as f:
        t0 = time.perf_counter()
        subprocess.run([_mosq("mosquitto_sub"), "-h", "127.0.0.1", "-p", str(port), "-t", topic,
                        "-q", "1", "-C", "1", "-N"], stdout=f, check=True, timeout=60)
        t = time.perf_counter() - t0
    subprocess.run([_mosq("mosquitto_pub"), "-h", "127.0.0.1", "-p", str(port), "-t", topic,
                    "-r", "-n"], check=True, timeout=60)
    return t


def big_bundles(bench: Bench, n: int, mb: float) -> list[Path]:
    """``n`` signed bundles of about ``mb`` MB each, successive versions (each is an upgrade)."""
    from agent_helpers import build_bundle

    # the MLP's two float32 weight matrices; zip's deflate takes ~6% off random normal floats
    hidden = int(mb * 1e6 / (4 * (64 + 10)) / 0.94)
    out = []
    for k in range(n):
        p = bench.work / "big" / f"big-1.0.{k}-{hidden}.edgepack"
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            build_bundle(p, name="big", version=f"1.0.{k}", target=TARGET, key=bench.private,
                         hidden=hidden, seed=k)
        out.append(p)
    return out


def bench_transfer(bench: Bench, reps: int, mb: float, threads: int,
                   variant: Variant | None) -> dict:
    from agent_helpers import Watcher, publish_desired

    from edgepack.agent.bundle import read_bundle
    from edgepack.host.fleet.publish import publish_bundle

    log(f"transfer: building {reps} signed bundles of ~{mb:g} MB")
    bundles = big_bundles(bench, reps, mb)
    published = []
    for p in bundles:
        r = publish_bundle(p, bench.url, key_path=bench.key, fleet=FLEET)
        published.append(r)
    agent, device, data_dir = bench.new_agent(threads)
    port = bench.broker.port
    rounds = []
    with Watcher(bench.url, FLEET, device) as w:
        w.wait_state(lambda s: s.get("online"), 30)
        for k, path in enumerate(bundles):
            b = read_bundle(path)
            payload = bench.work / "raw-out.bin"
            t_live = raw_live(port, path, payload, f"raw/live/{k}")
            live_ok = hashlib.sha256(payload.read_bytes()).hexdigest() == b.bundle_id
            t_ret = raw_retained(port, path, payload, f"raw/retained/{k}")
            ret_ok = hashlib.sha256(payload.read_bytes()).hexdigest() == b.bundle_id
            time.sleep(0.5)
            t0 = time.time()
            dep = publish_desired(bench.url, FLEET, b.bundle_id, device_id=device, name=b.name,
                                  version=b.version)
            ev = {kind: w.wait_event(kind, dep, timeout=300)
                  for kind in ("download_started", "downloaded", "verified", "installed")}
            st = ev["downloaded"].get("stats") or {}
            rounds.append({
                "bytes": path.stat().st_size,
                "raw_live_s": t_live, "raw_retained_s": t_ret,
                "raw_bytes_match": live_ok and ret_ok,
                "desired_to_download_started_s": ev["download_started"]["ts"] - t0,
                "desired_to_downloaded_s": ev["downloaded"]["ts"] - t0,
                "desired_to_verified_s": ev["verified"]["ts"] - t0,
                "desired_to_installed_s": ev["installed"]["ts"] - t0,
                "chunk_transfer_s": ev["downloaded"]["ts"] - ev["download_started"]["ts"],
                "transfer_stats": st})
            r = rounds[-1]
            log(f"transfer round {k + 1}/{reps}: raw {t_live:.3f}s (retained {t_ret:.3f}s), "
                f"agent desired->downloaded {r['desired_to_downloaded_s']:.3f}s, "
                f"chunks {r['chunk_transfer_s']:.3f}s")
    from edgepack.agent.inference import active_slot_dir

    # Memory after handling big bundles, vs a bare process holding the same 20 MB model, and
    # after a restart (which loads the committed bundle without downloading or unpacking it).
    slot = active_slot_dir(data_dir)
    sock = data_dir / "agent.sock"
    x = golden_input(slot)
    rss_after = serve_and_read(sock, agent.proc.pid, x)
    agent.stop()
    agent.start()
    wait_socket(sock)
    rss_restart = serve_and_read(sock, agent.proc.pid, x)
    agent.stop()
    bare = bare_process(slot / "model.onnx", threads)[0][1]
    proto = None
    if variant is not None:  # the same last two deployments, to the fixed agent
        pa, pdev, pdata = bench.new_agent(threads, variant=variant)
        for p in bundles[-2:]:
            deploy_and_wait(bench, pdev, p)
        proto = serve_and_read(pdata / "agent.sock", pa.proc.pid, x)
        pa.stop()

    def med(key: str) -> float:
        return float(np.median([r[key] for r in rounds]))

    size = path.stat().st_size
    summary = {k: med(k) for k in ("raw_live_s", "raw_retained_s",
                                   "desired_to_download_started_s", "desired_to_downloaded_s",
                                   "desired_to_verified_s", "desired_to_installed_s",
                                   "chunk_transfer_s")}
    st = rounds[-1]["transfer_stats"]
    return {
        "bundle_bytes": size, "chunk_size": st.get("chunk_size"), "chunks": st.get("chunks_total"),
        "window": st.get("window"), "reps": reps, "median_s": summary,
        "ratio": {"downloaded_vs_raw": summary["desired_to_downloaded_s"] / summary["raw_live_s"],
                  "verified_vs_raw": summary["desired_to_verified_s"] / summary["raw_live_s"],
                  "chunks_vs_raw": summary["chunk_transfer_s"] / summary["raw_live_s"],
                  "downloaded_vs_raw_retained": summary["desired_to_downloaded_s"]
                  / summary["raw_retained_s"]},
        "paired_ratio_downloaded_vs_raw": float(np.median(
            [r["desired_to_downloaded_s"] / r["raw_live_s"] for r in rounds])),
        "host_publish_s": float(np.median([p["seconds"] for p in published])),
        "agent_rss_after_mb": rss_after, "agent_rss_after_restart_mb": rss_restart,
        "bare_rss_same_model_mb": bare, "proto_both_rss_mb": proto, "rounds": rounds}


# --------------------------------------------------------------------------- driver

def bench_model(bench: Bench, name: str, bundle: Path, threads: int, args: Any,
                variants: dict[str, Variant]) -> dict:
    from edgepack.agent.inference import active_slot_dir

    out: dict[str, Any] = {"bundle": bundle.name, "bundle_bytes": bundle.stat().st_size}
    log(f"{name}: fresh agent, deploying {bundle.name}")
    agent, device, data_dir = bench.new_agent(threads)
    installed = deploy_and_wait(bench, device, bundle)
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
            mem[f"proto_{vname}"]["cryptography_mapped"] = _loaded(ppid)
            pa.stop()
        b = mem["bare"]["VmRSS"]
        mem["over_bare_mb"] = {k: v["VmRSS"] - b for k, v in mem.items()
                               if isinstance(v, dict) and "VmRSS" in v and k != "bare"}
        out["memory"] = mem
    else:
        agent.stop()
    return out


def _loaded(pid: int) -> bool:
    """Is cryptography's Rust extension mapped into the process?"""
    return "_rust.abi3.so" in Path(f"/proc/{pid}/maps").read_text()


def _f(v: float, nd: int = 3) -> str:
    return f"{v:.{nd}f}"


def _mark(ok: bool) -> str:
    return "ok" if ok else "MISS"


def _table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def fmt(r: tuple) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

    return [fmt(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
            *[fmt(r) for r in rows]]


def render(res: dict) -> str:
    env = res["env"]
    lines = [f"edgepack agent benchmark — {env['date']}, {env['cpu']} ({env['cpus']} CPUs), "
             f"Python {env['python']}, onnxruntime {env['onnxruntime']}, "
             f"{env['mosquitto']}, {env['threads']} inference thread(s)", ""]
    models = res.get("models", {})
    names = list(models)
    inf = {n: models[n]["inference"] for n in names if "inference" in models[n]}
    if inf:
        g = GOALS["inference_ratio"]
        ns = list(inf)

        def p50(n: str, pas: str, k: str) -> str:
            return _f(inf[n]["latency_ms"][pas][k]["p50_ms"])

        def ratio(n: str, k: str, goal: bool = False) -> str:
            r = inf[n]["ratios"][k]
            return (f"{r['paired']:.3f}x ({r['p50']:.3f}x)"
                    + (f" {_mark(r['paired'] <= g)}" if goal else ""))

        rows = [
            ("goal pass, p50 ms: bare InferenceSession.run", "", *[p50(n, "goal", "bare")
                                                                  for n in ns]),
            ("goal pass, p50 ms: Model.predict (array)", "", *[p50(n, "goal", "predict")
                                                              for n in ns]),
            ("goal pass, p50 ms: Model.run (typed feeds)", "", *[p50(n, "goal", "run")
                                                                for n in ns]),
            ("Model.predict / bare", f"<= {g}x", *[ratio(n, "predict", True) for n in ns]),
            ("Model.run / bare", f"<= {g}x", *[ratio(n, "run", True) for n in ns]),
            ("wrapper pass, p50 ms: the Model's session.run", "",
             *[p50(n, "wrapper", "own_session") for n in ns]),
            ("Model.predict / its own session.run", "",
             *[ratio(n, "predict_vs_own_session") for n in ns]),
            ("Model.run / its own session.run", "", *[ratio(n, "run_vs_own_session")
                                                      for n in ns]),
            ("Model.predict - session.run, p50", "", *[
                f"{inf[n]['wrapper_overhead_us_p50']['predict']:+.1f} us" for n in ns]),
            ("endpoint pass, p50 ms: bare / Client.predict", "", *[
                f"{p50(n, 'endpoint', 'bare')} / {p50(n, 'endpoint', 'endpoint')}" for n in ns]),
            ("endpoint (unix socket, npy) / bare", "", *[ratio(n, "endpoint") for n in ns]),
            ("goal pass calls each / rounds; load avg", "", *[
                f"{inf[n]['latency_ms']['goal']['bare']['runs']} / "
                f"{inf[n]['latency_ms']['goal']['bare']['rounds']}; "
                f"{inf[n]['loadavg_1min'][0]:.1f}->{inf[n]['loadavg_1min'][1]:.1f}" for n in ns]),
        ]
        lines += ["Inference: agent path vs bare session.run (same model file, threads, input; "
                  "interleaved). Ratios: paired (median over rounds of the per-round ratio), "
                  "then ratio of p50s in brackets.", "",
                  *_table(("metric", "goal", *ns), rows), ""]
    tr = res.get("transfer")
    if tr:
        g = GOALS["transfer_ratio"]
        m = tr["median_s"]
        rows = [
            ("raw: mosquitto_pub -f -> mosquitto_sub (live)", "", _f(m["raw_live_s"]), "1.00x"),
            ("raw: mosquitto_sub of one retained message", "", _f(m["raw_retained_s"]),
             f"{m['raw_retained_s'] / m['raw_live_s']:.2f}x"),
            ("agent: desired -> download_started", "", _f(m["desired_to_download_started_s"]),
             ""),
            ("agent: chunk transfer (started -> downloaded)", "", _f(m["chunk_transfer_s"]),
             f"{tr['ratio']['chunks_vs_raw']:.2f}x"),
            ("agent: desired -> downloaded", f"<= {g}x", _f(m["desired_to_downloaded_s"]),
             f"{tr['ratio']['downloaded_vs_raw']:.2f}x "
             f"{_mark(tr['ratio']['downloaded_vs_raw'] <= g)}"),
            ("agent: desired -> verified", "", _f(m["desired_to_verified_s"]),
             f"{tr['ratio']['verified_vs_raw']:.2f}x"),
            ("agent: desired -> installed (health gate incl.)", "",
             _f(m["desired_to_installed_s"]), ""),
        ]
        lines += [f"Transfer: {tr['bundle_bytes'] / 1e6:.1f} MB signed bundle over loopback "
                  f"Mosquitto, {tr['chunks']} chunks of {tr['chunk_size'] // 1024} KiB, window "
                  f"{tr['window']}; median of {tr['reps']} interleaved rounds (host publish "
                  f"{tr['host_publish_s']:.2f}s, not in the figures)", "",
                  *_table(("step", "goal", "seconds", "vs raw live"), rows),
                  "", f"paired per-round ratio desired->downloaded / raw: "
                  f"{tr['paired_ratio_downloaded_vs_raw']:.2f}x",
                  f"VmRSS holding the {tr['bundle_bytes'] / 1e6:.0f} MB model: agent after the "
                  f"{tr['reps']} deployments {tr['agent_rss_after_mb']['VmRSS']:.1f} MB, same agent "
                  f"restarted {tr['agent_rss_after_restart_mb']['VmRSS']:.1f} MB, bare process "
                  f"{tr['bare_rss_same_model_mb']['VmRSS']:.1f} MB"
                  + (f", prototype 'both' agent after 2 deployments "
                     f"{tr['proto_both_rss_mb']['VmRSS']:.1f} MB" if tr["proto_both_rss_mb"]
                     else ""), ""]
    mem = {n: models[n]["memory"] for n in names if "memory" in models[n]}
    if mem:
        g = GOALS["rss_over_bare_mb"]
        ns = list(mem)
        rows = [("bare process VmRSS", "", *[_f(mem[n]["bare"]["VmRSS"], 1) for n in ns])]
        for k, lab in (("agent_after_install", "agent after install + 20 calls"),
                       ("agent_after_inference_bench", "agent after the inference bench"),
                       ("agent_after_restart", "agent after restart + 20 calls"),
                       ("proto_no_crypto", "prototype: no cryptography in the agent"),
                       ("proto_mmap_threshold", "prototype: MALLOC_MMAP_THRESHOLD_=131072"),
                       ("proto_both", "prototype: both")):
            if all(k in mem[n] for n in ns):
                rows.append((f"{lab}: VmRSS (over bare)", f"<= +{g:g}" if k ==
                             "agent_after_install" else "", *[
                    f"{mem[n][k]['VmRSS']:.1f} (+{mem[n]['over_bare_mb'][k]:.1f})"
                    + (f" {_mark(mem[n]['over_bare_mb'][k] <= g)}" if k == "agent_after_install"
                       else "") for n in ns]))
        rows.append(("agent after install: RssAnon / RssFile", "", *[
            f"{mem[n]['agent_after_install']['RssAnon']:.1f} / "
            f"{mem[n]['agent_after_install']['RssFile']:.1f}" for n in ns]))
        rows.append(("bare: RssAnon / RssFile", "", *[
            f"{mem[n]['bare']['RssAnon']:.1f} / {mem[n]['bare']['RssFile']:.1f}" for n in ns]))
        lines += ["Memory: agent VmRSS over a bare process holding the same runtime and model (MB)",
                  "", *_table(("metric", "goal", *ns), rows), ""]
        n0 = ns[0]
        ladder = mem[n0]["ladder"]
        rows = []
        for (_, prev), (grp, cur) in zip(ladder, ladder[1:], strict=False):
            rows.append((grp.replace("+", ", "), f"+{cur['VmRSS'] - prev['VmRSS']:.2f}",
                         f"+{cur['RssAnon'] - prev['RssAnon']:.2f}",
                         f"+{cur['RssFile'] - prev['RssFile']:.2f}"))
        total = ladder[-1][1]["VmRSS"] - ladder[0][1]["VmRSS"]
        rest = mem[n0]["over_bare_mb"]["agent_after_install"] - total
        rows.append(("all imports", f"+{total:.2f}", "", ""))
        rows.append(("agent at run time (threads, sockets, SQLite, heap)", f"{rest:+.2f}", "",
                     ""))
        lines += [f"Where it goes ({n0}): RSS after each import, in a bare process holding the "
                  f"model (start {ladder[0][1]['VmRSS']:.1f} MB), in order", "",
                  *_table(("import", "VmRSS MB", "anon", "file"), rows), ""]
        if "prototype_child_verify_ms" in res:
            mapped = any(mem[n].get("proto_no_crypto", {}).get("cryptography_mapped")
                         for n in ns)
            lines.append(f"Prototypes (agent code unchanged, launched differently), after install "
                         f"+ 20 calls. no cryptography: edgepack.agent.signing swapped for one that "
                         f"parses the PEM key itself and verifies in a child process "
                         f"({res['prototype_child_verify_ms']:.0f} ms per check, two per "
                         f"deployment; cryptography mapped in that agent: {mapped}). "
                         f"MALLOC_MMAP_THRESHOLD_: glibc environment, as a systemd unit would "
                         f"set it.")
    fails = res.get("failed") or {}
    lines += [f"{k} FAILED: {v}" for k, v in fails.items()]
    return "\n".join(lines).rstrip() + "\n"


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
                    help="skip the memory fix prototype (agent without cryptography)")
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
    from edgepack.host.build import pipeline

    threads = args.threads or pipeline._host_threads(load_profile(TARGET))
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
            variants = write_prototypes(work)
            res["prototype_child_verify_ms"] = time_child_verify(bench, variants["no_crypto"])
        if args.only & {"inference", "memory"}:
            key_path = bench.key
            bundles = make_model_bundles(models, work, key_path, args.size, args.quantize)
            for m in models:
                try:
                    res["models"][m] = bench_model(bench, m, bundles[m], threads, args, variants)
                except Exception as exc:  # report it and go on
                    log(f"{m}: FAILED: {type(exc).__name__}: {exc}")
                    res["failed"][m] = f"{type(exc).__name__}: {str(exc)[:500]}"
        if "transfer" in args.only:
            try:
                res["transfer"] = bench_transfer(bench, args.reps, args.mb, threads,
                                                 variants.get("both"))
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
