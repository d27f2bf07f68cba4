"""The rig of bench/agent.py: paths, goals, the broker, keys and agents of a run, timing."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import subprocess
import sys
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
    """Build a signed bundle per model with ``edgepack.host.build`` (cached)."""
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
    from edgepack.host import build
    from edgepack.host.build.report import Progress

    b = _bench_build()
    for m in todo:
        log(f"making {m}")
        files = (b.make_mobilenet(work / "mobilenet", size, 100, 50, 32) if m == "mobilenetv2"
                 else b.make_digits(work / "digits"))
        log(f"building the {m} bundle (target {TARGET}, {quantize})")
        res = build(str(files["model"]), target=TARGET, quantize=quantize,
                    calibration=str(files["calibration"]), eval=str(files["eval"]), key=str(key),
                    out=str(work / "dist" / m), variants=False, name=m,
                    max_drop=100.0 if m == "mobilenetv2" else None,
                    progress=Progress(enabled=False))
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
        enroll_device(d / "data", device, d / "enrollment.json")
        agent = (_LaunchedAgent(cfg, variant) if variant else AgentProcess(cfg)).start()
        self.agents.append(agent)
        return agent, device, d / "data"


def enroll_device(data_dir: Path, device: str, out: Path) -> dict:
    """What ``edgepack agent init`` does for identity (protocol v2): the device's Ed25519 key
    (``identity.key``, 0600) in its data dir and its public enrollment in ``out``; returns the
    enrollment. The agent signs every report with that key."""
    from edgepack.host.fleet.provision import write_enrollment

    data_dir.mkdir(parents=True, exist_ok=True)
    return write_enrollment(data_dir, device, (), out)[0]


def verified_report(report: dict, device: str, data_dir: Path) -> str:
    """The key id of the device key that signed ``report``, checked as the collector checks it
    against the enrollment :func:`enroll_device` wrote (ReportRefused otherwise)."""
    from edgepack.host.fleet.identity import ReportVerifier, read_enrollment

    enrollment = read_enrollment(data_dir.parent / "enrollment.json")
    return ReportVerifier({device: enrollment}).verify(report, topic_device=device).key_id


@dataclasses.dataclass(frozen=True)
class Variant:
    """The agent as shipped, changed only by its environment (a prototype of a fix)."""

    name: str
    env: tuple[tuple[str, str], ...] = ()


class _LaunchedAgent:
    """An agent process started as a :class:`Variant`."""

    def __init__(self, config: Path, variant: Variant) -> None:
        from agent_helpers import AgentProcess

        self._p = AgentProcess(config)
        self._v = variant

    def start(self) -> _LaunchedAgent:
        with open(self._p.log, "ab") as logf:
            self._p.proc = subprocess.Popen(
                [sys.executable, "-m", "edgepack.agent.daemon", "--config", str(self._p.config)],
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


