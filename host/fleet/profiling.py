"""Profile bundles on real devices, and let the devices choose the variant to ship.

Host side of the profile-job protocol (``docs/protocol.md`` § Profile jobs):

* :func:`profile_on_devices` publishes the bundles (the normal retained chunks), sends each
  device one signed job (``devices/{id}/jobs``, QoS 1, not retained, with a deadline), and
  collects ``devices/{id}/results`` until every device said ``done`` or the deadline passed. A
  device that goes silent (its last will says offline, or it just stops) gives a timeout with
  whatever results arrived and a message saying so.
* :class:`ProfileCache` keeps results per (board, runtime, runtime version, model sha256,
  threads): devices with the same board and runtime are measured once, and a bundle already
  measured on such a board is not measured again (no job is sent at all).
* :func:`choose_on_devices` is ``edgepack build --profile-on``: given candidate bundles and the
  fp32 reference outputs on eval samples, it applies the accuracy gate
  (:func:`edgepack.host.build.validate.compare`) to the outputs the *device* computed, and picks the
  fastest passing candidate by p95 within the RSS (and p95) budget; every candidate's report
  says why it lost. :func:`stamp_bundle` writes the winner with the device figures in its
  manifest.

Pipeline integration (``edgepack build --profile-on DEV``), in ``_build_onnx`` once ``prepared``,
``evalset``, ``ref`` and the candidates exist: package every candidate (fp32, fp16, each int8
scheme of the profile) as its own signed bundle in a temporary directory, then::

    choice = choose_on_devices(
        [Candidate(label, path) for label, path in packaged], devices=cfg.profile_on,
        broker=cfg.broker, key_path=cfg.key, fleet=cfg.fleet,
        input_specs=prepared.inputs, output_specs=prepared.outputs, evalset=evalset,
        reference=ref, batch=cfg.batch, max_drop=max_drop,
        rss_budget_mb=profile.budgets.rss_mb, p95_budget_ms=profile.budgets.p95_ms,
        runs=cfg.profile_runs, timeout=cfg.profile_timeout,
        cache=ProfileCache(cfg.profile_cache) if cfg.profile_cache else ProfileCache.default())
    winner = choice.require()  # GateError listing every candidate's reason when none passed
    stamp_bundle(winner.bundle, out, choice.manifest_entry(), key_path=cfg.key,
                 report_extra={"device_profile": choice.to_dict()})

``tests/profiling/test_profiling_choice.py`` does exactly this with candidates built by
``run_build(variants=False)``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.agent.bundle import Bundle, read_bundle
from edgepack.agent.errors import DataError, EdgepackError, GateError, ProtocolError
from edgepack.agent.mqtt import BrokerConfig, SyncClient, parse_broker_url
from edgepack.agent.protocol import (
    MAX_EVAL_BYTES,
    JobBundle,
    ProfileJob,
    Topics,
    decode,
    encode,
    parse_result,
)
from edgepack.agent.runtimes import FORMAT_RUNTIME

__all__ = [
    "Candidate",
    "CandidateReport",
    "DeviceChoice",
    "DeviceRun",
    "ProfileCache",
    "ProfileReport",
    "cache_key",
    "choose_on_devices",
    "default_cache_path",
    "make_job",
    "profile_on_devices",
    "stamp_bundle",
]

_GRACE_S = 5.0  # after the deadline, for answers already on their way
_STATE_WAIT_S = 1.0  # retained device states arrive right after SUBACK; wait at most this


# =========================================================================== cache
def default_cache_path() -> Path:
    """``$XDG_CACHE_HOME/edgepack/profiles.json`` (``~/.cache/edgepack/profiles.json``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgepack" / "profiles.json"


def cache_key(board: str, runtime: str, runtime_version: str, model_sha256: str,
              threads: int) -> str:
    """What makes two measurements interchangeable: same board, runtime build, model, threads."""
    return f"{board}|{runtime}|{runtime_version}|{model_sha256}|t{threads}"


class ProfileCache:
    """Device measurements on the host, one JSON file (``path=None``: in memory only).

    Only complete results are stored. Outputs on eval samples are stored per eval-set
    fingerprint, since the gate needs the outputs on *its* samples.
    """

    MAX_ENTRIES = 2000

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = Path(path) if path is not None else None
        self._entries: dict[str, dict] = {}
        if self.path is not None and self.path.exists():
            try:
                doc = json.loads(self.path.read_text())
                if isinstance(doc, dict) and doc.get("version") == 1:
                    self._entries = dict(doc.get("entries") or {})
            except (OSError, ValueError):
                self._entries = {}  # a corrupt cache is only a cache

    @classmethod
    def default(cls) -> ProfileCache:
        return cls(default_cache_path())

    def get(self, key: str, eval_fp: str | None = None) -> dict | None:
        """The stored result (``eval`` filled for ``eval_fp``), or None when it cannot serve."""
        e = self._entries.get(key)
        if e is None:
            return None
        result = dict(e["result"])
        if eval_fp is not None:
            ev = (e.get("eval") or {}).get(eval_fp)
            if ev is None:
                return None
            result["eval"] = ev
        result.update(cached=True, measured_by=e.get("device_id"),
                      measured_at=e.get("stored_at"), cached_job_id=e.get("job_id"))
        return result

    def put(self, key: str, result: Mapping[str, Any], *, device_id: str, job_id: str,
            eval_fp: str | None = None) -> None:
        if result.get("status") != "ok" or result.get("cached"):
            return
        body = {k: v for k, v in result.items() if k not in ("eval", "cached", "measured_by")}
        e = self._entries.get(key)
        if e is None or e["result"].get("model_sha256") != body.get("model_sha256"):
            e = {"eval": {}}
        e.update(result=body, device_id=device_id, job_id=job_id, stored_at=time.time())
        if eval_fp is not None and result.get("eval"):
            e.setdefault("eval", {})[eval_fp] = result["eval"]
        self._entries[key] = e
        if len(self._entries) > self.MAX_ENTRIES:
            oldest = sorted(self._entries, key=lambda k: self._entries[k].get("stored_at", 0))
            for k in oldest[:len(self._entries) - self.MAX_ENTRIES]:
                del self._entries[k]

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": 1, "entries": self._entries}, default=str))
        os.replace(tmp, self.path)

    def __len__(self) -> int:
        return len(self._entries)


# =========================================================================== jobs
def make_job(bundles: Sequence[JobBundle], *, key_path: str | os.PathLike | None,
             timeout_s: float, runs: int = 50, warmup: int = 5, threads: int = 0,
             op_profile: bool = True, eval_npz: bytes | None = None,
             max_rss_mb: int | None = None, job_id: str | None = None) -> tuple[str, bytes]:
    """A signed profile job: ``(job_id, payload)``. Without ``key_path`` it is unsigned (only
    devices running with ``allow_unsigned`` accept it)."""
    if eval_npz is not None and len(eval_npz) > MAX_EVAL_BYTES:
        raise DataError(f"eval samples for the device are {len(eval_npz)} bytes, over the "
                        f"{MAX_EVAL_BYTES} byte limit of a profile job; send fewer samples")
    job_id = job_id or f"prof-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-" \
                       f"{uuid.uuid4().hex[:8]}"
    timeout = max(1, int(round(timeout_s)))
    job = ProfileJob(job_id=job_id, deadline=int(time.time()) + timeout, bundles=tuple(bundles),
                     runs=runs, warmup=warmup, threads=threads, op_profile=op_profile,
                     timeout_s=timeout, max_rss_mb=max_rss_mb, eval_npz=eval_npz)
    body = job.to_payload()
    if key_path is not None:
        from edgepack.agent.signing import canonical_json
        from edgepack.host.keys import load_private_key, sign_bytes

        body["sig"] = sign_bytes(canonical_json(body), load_private_key(key_path))
    return job_id, encode(body)


@dataclass
class DeviceRun:
    """One device's answer to one job (or what the cache said in its place)."""

    device: str
    job_id: str | None = None
    status: str = "pending"  # complete | partial | refused | timeout | cached | skipped
    message: str = ""
    reason: str | None = None  # refusal reason
    board: str | None = None
    target: str | None = None
    runtimes: dict = field(default_factory=dict)
    cpu: str | None = None
    online: bool | None = None
    offline_at: float | None = None
    accepted: bool = False
    stage: str | None = None
    bundles: list[str] = field(default_factory=list)
    results: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0
    measured_by: str | None = None  # another device of the same board measured for this one

    @property
    def finished(self) -> bool:
        return self.status not in ("pending",)

    def to_dict(self, *, with_outputs: bool = False) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "results"}
        d["results"] = [_strip(r, with_outputs) for r in self.results.values()]
        return d


def _strip(result: Mapping[str, Any], with_outputs: bool) -> dict:
    r = dict(result)
    if not with_outputs and isinstance(r.get("eval"), dict):
        r["eval"] = {k: v for k, v in r["eval"].items() if k != "outputs_npz"}
    return r


@dataclass
class ProfileReport:
    """Results of profiling bundles on devices, per device and bundle."""

    bundles: list[dict]
    devices: dict[str, DeviceRun]
    seconds: float = 0.0

    def result(self, device: str, bundle_id: str) -> dict | None:
        run = self.devices.get(device)
        return run.results.get(bundle_id) if run else None

    def to_dict(self, *, with_outputs: bool = False) -> dict[str, Any]:
        return {"bundles": self.bundles, "seconds": round(self.seconds, 3),
                "devices": {d: r.to_dict(with_outputs=with_outputs)
                            for d, r in self.devices.items()}}


def _bundle_info(path: str | os.PathLike, label: str | None = None) -> dict[str, Any]:
    b: Bundle = read_bundle(path)
    m = b.manifest
    fmt = m["model"]["format"]
    return {"path": str(path), "bundle_id": b.bundle_id, "name": b.name, "version": b.version,
            "target": b.target, "bytes": b.size, "label": label or Path(path).stem,
            "model_sha256": m["model"]["sha256"], "format": fmt,
            "runtime": (m.get("runtime") or {}).get("name") or FORMAT_RUNTIME.get(fmt, fmt),
            "outputs": m["model"]["outputs"], "inputs": m["model"]["inputs"]}


def _config(broker: str | BrokerConfig) -> BrokerConfig:
    return parse_broker_url(broker) if isinstance(broker, str) else broker


def profile_on_devices(bundles: Sequence[str | os.PathLike] | Sequence[tuple[str, str]],
                       devices: Sequence[str], *, broker: str | BrokerConfig,
                       key_path: str | os.PathLike | None, fleet: str = "default",
                       runs: int = 50, warmup: int = 5, threads: int = 0,
                       op_profile: bool = True, timeout: float = 300.0,
                       cache: ProfileCache | None = None, eval_npz: bytes | None = None,
                       max_rss_mb: int | None = None, publish: bool = True,
                       on_message: Callable[[str, dict], None] | None = None) -> ProfileReport:
    """Measure bundle files on devices; return every device's figures per bundle.

    ``bundles`` are paths, or ``(label, path)`` pairs. Devices that report the same board and
    runtime version are measured once (the first one online measures for the others), and
    results in ``cache`` are not measured again. ``timeout`` bounds the whole job on the
    device (its deadline); the host waits a few seconds longer for answers in flight.
    ``on_message(device, message)`` sees every result message as it arrives (progress).
    """
    started = time.monotonic()
    infos = list({i["bundle_id"]: i for i in (
        _bundle_info(b[1], b[0]) if isinstance(b, tuple) else _bundle_info(b)
        for b in bundles)}.values())  # the same bundle twice is measured once
    if not devices:
        raise EdgepackError("name at least one device to profile on")
    topics = Topics(fleet)
    for d in devices:
        topics.jobs(d)  # an invalid device id fails here, before anything is published
    cfg = _config(broker)
    cache = cache if cache is not None else ProfileCache(None)
    eval_fp = hashlib.sha256(eval_npz).hexdigest()[:16] if eval_npz is not None else None
    runs_by_dev = {d: DeviceRun(device=d) for d in dict.fromkeys(devices)}
    with SyncClient(cfg, timeout=max(30.0, timeout)) as client:
        states = _read_states(client, topics, list(runs_by_dev))
        for d, st in states.items():
            r = runs_by_dev[d]
            r.board, r.target, r.runtimes = st.get("board"), st.get("target"), \
                dict(st.get("runtimes") or {})
            r.online = st.get("online") is not False

        # One measuring device per (board, runtime versions); unknown boards measure alone.
        groups: dict[tuple, list[str]] = {}
        for d, r in runs_by_dev.items():
            gkey = (r.board, tuple(sorted(r.runtimes.items()))) if r.board else ("?", d)
            groups.setdefault(gkey, []).append(d)
        plans: dict[str, list[dict]] = {}
        for members in groups.values():
            lead = next((d for d in members if runs_by_dev[d].online), members[0])
            r = runs_by_dev[lead]
            todo = []
            for info in infos:
                hit = _cached(cache, r, info, threads, eval_fp)
                if hit is not None:
                    r.results[info["bundle_id"]] = hit
                else:
                    todo.append(info)
            if todo:
                plans[lead] = todo
            else:
                r.status, r.message = "cached", "every bundle was measured on this board before"
            for d in members:
                if d != lead:
                    runs_by_dev[d].measured_by = lead
        if plans and publish:
            from edgepack.host.fleet.publish import publish_bundle

            for info in {i["bundle_id"]: i for todo in plans.values() for i in todo}.values():
                publish_bundle(info["path"], cfg, key_path=key_path, fleet=fleet)
        jobs = {}
        for d, todo in plans.items():
            jb = [JobBundle(i["bundle_id"], bytes=i["bytes"], label=i["label"][:64]) for i in todo]
            jobs[d] = make_job(jb, key_path=key_path, timeout_s=timeout, runs=runs,
                               warmup=warmup, threads=threads, op_profile=op_profile,
                               eval_npz=eval_npz, max_rss_mb=max_rss_mb)
        if jobs:
            _run_jobs(client, topics, jobs, {d: runs_by_dev[d] for d in jobs}, timeout,
                      {d: [i["bundle_id"] for i in plans[d]] for d in jobs}, on_message)

    by_id = {i["bundle_id"]: i for i in infos}
    for d, r in runs_by_dev.items():
        for bid, res in list(r.results.items()):
            if d in jobs and not res.get("cached") and res.get("status") == "ok":
                info = by_id.get(bid)
                rt = res.get("runtime") or (info or {}).get("runtime", "")
                board = res.get("board") or r.board
                if board and info is not None:
                    cache.put(cache_key(board, rt, str(res.get("runtime_version")),
                                        info["model_sha256"], threads), res, device_id=d,
                              job_id=r.job_id or "", eval_fp=eval_fp)
    for r in runs_by_dev.values():  # devices measured by a twin take its figures
        if r.measured_by:
            lead = runs_by_dev[r.measured_by]
            r.results = {bid: {**res, "measured_by": res.get("measured_by") or r.measured_by}
                         for bid, res in lead.results.items()}
            r.status = lead.status
            r.message = (f"same board ({r.board}) and runtime as {r.measured_by}: measured "
                         f"there" + (f" ({lead.message})" if lead.message else ""))
    cache.save()
    return ProfileReport(bundles=[{k: v for k, v in i.items() if k not in ("inputs", "outputs")}
                                  for i in infos],
                         devices=runs_by_dev, seconds=time.monotonic() - started)


def _cached(cache: ProfileCache, run: DeviceRun, info: dict, threads: int,
            eval_fp: str | None) -> dict | None:
    version = run.runtimes.get(info["runtime"])
    if not run.board or not version:
        return None
    hit = cache.get(cache_key(run.board, info["runtime"], version, info["model_sha256"],
                              threads), eval_fp)
    if hit is not None:
        hit = {**hit, "bundle_id": info["bundle_id"], "label": info["label"]}
    return hit


def _read_states(client: SyncClient, topics: Topics, devices: list[str]) -> dict[str, dict]:
    for d in devices:
        client.subscribe(topics.state(d))
    out: dict[str, dict] = {}
    deadline = time.monotonic() + _STATE_WAIT_S
    while len(out) < len(devices) and (left := deadline - time.monotonic()) > 0:
        msg = client.get(left)
        if msg is None:
            break
        topic, payload, _ = msg
        if not payload:
            continue
        try:
            dev, leaf = topics.parse_device_topic(topic)
            if leaf == "state":
                out[dev] = decode(payload, "device state")
        except ProtocolError:
            continue
    return out


def _run_jobs(client: SyncClient, topics: Topics, jobs: Mapping[str, tuple[str, bytes]],
              runs: Mapping[str, DeviceRun], timeout: float, expected: Mapping[str, list[str]],
              on_message: Callable[[str, dict], None] | None) -> None:
    t0 = time.monotonic()
    for d in jobs:
        client.subscribe(topics.results(d))
    for d, (job_id, payload) in jobs.items():
        runs[d].job_id = job_id
        runs[d].bundles = list(expected[d])
        if runs[d].online is False:
            runs[d].offline_at = time.time()
        client.publish(topics.jobs(d), payload, qos=1, retain=False)
    deadline = time.monotonic() + timeout + _GRACE_S
    seen: set[tuple] = set()
    while any(not r.finished for r in runs.values()) and \
            (left := deadline - time.monotonic()) > 0:
        msg = client.get(min(left, 0.5))
        if msg is None:
            continue
        topic, payload, _ = msg
        if not payload:
            continue
        try:
            dev, leaf = topics.parse_device_topic(topic)
        except ProtocolError:
            continue
        run = runs.get(dev)
        if run is None:
            continue
        if leaf == "state":
            try:
                st = decode(payload, "device state")
            except ProtocolError:
                continue
            if st.get("online") is False and run.online is not False:
                run.offline_at = time.time()
            run.online = st.get("online") is not False
            continue
        if leaf != "results":
            continue
        try:
            m = parse_result(payload)
        except ProtocolError:
            continue
        if m["job_id"] != run.job_id:
            continue  # an older job's late answer
        dedupe = (m["kind"], m.get("bundle_id"), m.get("seq"))
        if dedupe in seen:
            continue
        seen.add(dedupe)
        if on_message is not None:
            on_message(dev, m)
        kind = m["kind"]
        if kind == "accepted":
            run.accepted = True
            run.board = m.get("board") or run.board
            run.target = m.get("target") or run.target
            run.runtimes = dict(m.get("runtimes") or run.runtimes)
            run.cpu = m.get("cpu")
        elif kind == "refused":
            if run.accepted and m.get("reason") == "duplicate":
                continue  # a QoS 1 redelivery of the job that is running
            run.status, run.reason = "refused", m.get("reason")
            run.message = f"device {dev} refused the job ({m.get('reason')}): {m.get('detail')}"
        elif kind == "progress":
            run.stage = f"{m.get('stage')} {str(m.get('bundle_id', ''))[:12]}"
        elif kind == "result" and m.get("bundle_id"):
            run.results[m["bundle_id"]] = {**m, "cached": False, "measured_by": dev}
        elif kind == "done":
            run.status = m.get("status") or "complete"
            bad = [r for r in run.results.values() if r.get("status") != "ok"]
            run.message = "" if not bad else "; ".join(
                f"{r.get('label') or r['bundle_id'][:12]}: {r.get('status')} "
                f"({r.get('reason')}: {r.get('detail')})" for r in bad)
    for d, run in runs.items():
        run.seconds = round(time.monotonic() - t0, 3)
        if run.finished:
            continue
        run.status = "timeout"
        got = sum(1 for bid in expected[d] if bid in run.results)
        why = []
        if run.offline_at is not None:
            when = time.strftime("%H:%M:%S", time.localtime(run.offline_at))
            why.append(f"it went offline at {when} (its last will)" if run.accepted
                       else "it is offline")
        elif not run.accepted:
            why.append("it never acknowledged the job (is edgepack-agent running there, and "
                       "recent enough to know profile jobs?)")
        else:
            why.append(f"it went silent while {run.stage or 'working'}")
        run.message = (f"device {d} did not finish profile job {run.job_id} within "
                       f"{timeout:g}s: {'; '.join(why)}. {got} of {len(expected[d])} bundle "
                       "result(s) arrived" + (" and are kept as partial results" if got else "")
                       + ". Bring the device back and run again (finished bundles are cached).")


# =========================================================================== choosing
@dataclass(frozen=True)
class Candidate:
    """A candidate variant, already packaged as a bundle (signed with the fleet key)."""

    label: str
    bundle: Path


@dataclass
class CandidateReport:
    """One candidate's device figures and verdict."""

    label: str
    bundle: str
    bundle_id: str
    passed: bool = False
    result: str = ""  # "chosen", or why it lost
    p95_ms: float | None = None  # worst over the devices
    p50_ms: float | None = None
    peak_rss_mb: float | None = None
    devices: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class DeviceChoice:
    """What :func:`choose_on_devices` decided, and why."""

    winner: CandidateReport | None
    candidates: list[CandidateReport]
    devices: dict[str, dict]
    max_drop: float
    rss_budget_mb: float | None
    p95_budget_ms: float | None
    eval_samples: int
    messages: list[str] = field(default_factory=list)

    def require(self) -> CandidateReport:
        """The winner; GateError naming every candidate's reason when none passed."""
        if self.winner is not None:
            return self.winner
        lines = "; ".join(f"{c.label}: {c.result}" for c in self.candidates)
        extra = (" " + " ".join(self.messages)) if self.messages else ""
        raise GateError(f"no candidate passed on the devices ({lines}).{extra}", stage="gate")

    def manifest_entry(self) -> dict[str, Any]:
        """What the shipped bundle's manifest records: the winner's figures and who measured."""
        w = self.require()
        return {"chosen_by": "device profiling", "candidate": w.label,
                "p95_ms": w.p95_ms, "p50_ms": w.p50_ms, "peak_rss_mb": w.peak_rss_mb,
                "max_drop_points": self.max_drop,
                "devices": {d: {k: f.get(k) for k in (
                    "measured_by", "board", "runtime", "runtime_version", "threads", "load_ms",
                    "first_ms", "p50_ms", "p95_ms", "p99_ms", "peak_rss_mb", "drop_points",
                    "basis", "cached", "job_id")} for d, f in w.devices.items()},
                "candidates": {c.label: {"p95_ms": c.p95_ms, "result": c.result}
                               for c in self.candidates}}

    def to_dict(self) -> dict[str, Any]:
        return {"winner": self.winner.label if self.winner else None,
                "candidates": [c.to_dict() for c in self.candidates], "devices": self.devices,
                "max_drop": self.max_drop, "rss_budget_mb": self.rss_budget_mb,
                "p95_budget_ms": self.p95_budget_ms, "eval_samples": self.eval_samples,
                "messages": list(self.messages)}


def _eval_payload(evalset: Any, batch: int, input_specs: Sequence[Any] | None,
                  limit: int) -> tuple[bytes, int]:
    """The eval samples as model-shaped feeds (``input_{i}``: (n, *input shape)), at most
    ``limit`` bytes: ``(npz bytes, n feeds)``."""
    names = list(evalset.inputs) if input_specs is None else [s.name for s in input_specs]
    n_total = len(evalset) // batch
    if n_total == 0:
        raise DataError(f"the eval set holds {len(evalset)} samples, fewer than one batch of "
                        f"{batch}")
    per_feed = sum(evalset.inputs[n][:batch].nbytes for n in names)
    n = min(n_total, max(0, (limit - 4096 - 512 * len(names)) // max(1, per_feed)))
    if n == 0:
        raise DataError(f"one eval sample is {per_feed} bytes: more than a profile job carries "
                        f"({limit} bytes). Profile without device-side gating (edgepack "
                        "profile), or use a smaller input.")
    arrays = {}
    for i, name in enumerate(names):
        arr = evalset.inputs[name][:n * batch]
        spec = input_specs[i] if input_specs is not None else None
        shape = tuple(spec.shape) if spec is not None else ()
        if shape and all(isinstance(x, int) and x > 0 for x in shape) \
                and int(np.prod(shape)) * n == arr.size:
            arrays[f"input_{i}"] = arr.reshape(n, *shape)
        else:
            arrays[f"input_{i}"] = arr.reshape(n, batch, *arr.shape[1:])
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue(), n


def _device_outputs(result: Mapping[str, Any], n_outputs: int, batch: int,
                    out_meta: Sequence[Mapping[str, Any]]) -> tuple[list[Any], int]:
    """The outputs the device computed on the eval samples, shaped like the host's."""
    ev = result.get("eval") or {}
    blob = ev.get("outputs_npz")
    k = int(ev.get("samples") or 0)
    arrays: list[Any] = [None] * n_outputs
    if not blob or k == 0:
        return arrays, 0
    with np.load(io.BytesIO(base64.b64decode(blob)), allow_pickle=False) as z:
        for j in range(n_outputs):
            key = f"output_{j}"
            if key not in z.files:
                continue
            a = z[key][:k]
            q = (out_meta[j].get("quantization") or {}) if j < len(out_meta) else {}
            if q.get("scale") and a.dtype.kind in "iu":
                a = (a.astype(np.float64) - float(q.get("zero_point") or 0)) * float(q["scale"])
                a = a.astype(np.float32)
            arrays[j] = a.reshape(k * batch, *a.shape[2:]) if a.ndim >= 2 else a
    return arrays, k


def choose_on_devices(candidates: Sequence[Candidate], *, devices: Sequence[str],
                      broker: str | BrokerConfig, key_path: str | os.PathLike | None,
                      output_specs: Sequence[Any], evalset: Any, reference: Any,
                      max_drop: float, batch: int = 1, input_specs: Sequence[Any] | None = None,
                      rss_budget_mb: float | None = None, p95_budget_ms: float | None = None,
                      fleet: str = "default", runs: int = 50, warmup: int = 5,
                      threads: int = 0, timeout: float = 600.0,
                      cache: ProfileCache | None = None,
                      on_message: Callable[[str, dict], None] | None = None) -> DeviceChoice:
    """Profile candidate bundles on ``devices`` and pick the one to ship.

    ``reference`` (:class:`edgepack.host.build.validate.Outputs`) holds the fp32 model's outputs on
    ``evalset`` (:class:`edgepack.host.build.data.Dataset`, labels optional), ``output_specs`` /
    ``input_specs`` the model's tensors (``PreparedModel.outputs`` / ``.inputs``). The first
    samples that fit a job are sent to the devices; each device returns its outputs on them,
    which go through the same gate as on the host (``validate.compare`` against the fp32
    reference, ``max_drop`` points). A candidate wins when it passes the gate and its golden
    check on every device, fits ``rss_budget_mb`` (peak RSS) and ``p95_budget_ms``, and has the
    lowest p95 (worst over the devices). Returns every candidate's figures and verdict; call
    :meth:`DeviceChoice.require` for the winner (GateError when none passed).
    """
    from edgepack.host.build.validate import Outputs, compare

    if not candidates:
        raise EdgepackError("no candidate bundles to profile")
    eval_npz, n_feeds = _eval_payload(evalset, batch, input_specs, MAX_EVAL_BYTES)
    rep = profile_on_devices([(c.label, str(c.bundle)) for c in candidates], devices,
                             broker=broker, key_path=key_path, fleet=fleet, runs=runs,
                             warmup=warmup, threads=threads, timeout=timeout, cache=cache,
                             eval_npz=eval_npz, on_message=on_message)
    labels = evalset.labels
    reports: list[CandidateReport] = []
    for c in candidates:
        info = meta = _bundle_info(c.bundle)
        cr = CandidateReport(label=c.label, bundle=str(c.bundle), bundle_id=info["bundle_id"])
        problems: list[str] = []
        p95s, p50s, rsss = [], [], []
        for d, run in rep.devices.items():
            res = run.results.get(info["bundle_id"])
            if res is None or res.get("status") != "ok":
                why = (f"{res.get('status')} ({res.get('reason')}): {res.get('detail')}" if res
                       else run.message or f"no result ({run.status})")
                problems.append(f"not measured on {d}: {why}")
                cr.devices[d] = {"status": res.get("status") if res else run.status,
                                 "detail": why, **_figures(res or {}, run)}
                continue
            outs, k = _device_outputs(res, len(output_specs), batch, meta["outputs"])
            rows = k * batch
            ref_k = Outputs([a[:rows] if a is not None else None for a in reference.arrays])
            gate = compare(output_specs, ref_k, Outputs(outs),
                           labels[:rows] if labels is not None else None) if k else None
            f = _figures(res, run)
            f.update(status="ok", eval_samples=rows,
                     drop_points=round(gate.drop_points, 4) if gate else None,
                     basis=gate.basis if gate else None,
                     top1_agreement=gate.top1_agreement if gate else None,
                     accuracy=gate.accuracy_optimized if gate else None,
                     min_cosine=gate.min_cosine if gate else None)
            cr.devices[d] = f
            if gate is None:
                problems.append(f"{d} returned no outputs on the eval samples")
            elif gate.drop_points > max_drop:
                problems.append(f"gate on {d}: drop {gate.drop_points:.2f} > {max_drop:g} pt "
                                f"({gate.basis})")
            if not (res.get("golden") or {}).get("passed"):
                fails = (res.get("golden") or {}).get("failures") or ["failed"]
                problems.append(f"golden check on {d}: {'; '.join(fails)[:200]} (it would fail "
                                "the install health gate)")
            p95, rss = f.get("p95_ms"), f.get("peak_rss_mb")
            if rss_budget_mb is not None and rss is not None and rss > rss_budget_mb:
                problems.append(f"peak RSS {rss:.1f} MB on {d} is over the {rss_budget_mb:g} MB "
                                "budget")
            if p95_budget_ms is not None and p95 is not None and p95 > p95_budget_ms:
                problems.append(f"p95 {p95:.3f} ms on {d} is over the {p95_budget_ms:g} ms "
                                "budget")
            p95s.append(p95)
            p50s.append(f.get("p50_ms"))
            rsss.append(rss)
        cr.p95_ms = max(p95s) if p95s and None not in p95s else None
        cr.p50_ms = max(p50s) if p50s and None not in p50s else None
        cr.peak_rss_mb = max(rsss) if rsss and None not in rsss else None
        cr.passed = not problems and cr.p95_ms is not None
        cr.result = "; ".join(problems) if problems else ""
        reports.append(cr)
    messages = [r.message for r in rep.devices.values()
                if r.status in ("timeout", "refused") and r.message]
    passing = [c for c in reports if c.passed]
    # A device that did not finish leaves the comparison open: the unmeasured candidates
    # might have been faster, so nothing is chosen (the partial figures stay in the report).
    winner = min(passing, key=lambda c: c.p95_ms) if passing and not messages else None
    for c in reports:
        if c is winner:
            c.result = "chosen"
        elif c.passed and winner is not None:
            c.result = (f"slower: p95 {c.p95_ms:.3f} ms vs {winner.p95_ms:.3f} ms "
                        f"({c.p95_ms / winner.p95_ms:.2f}x of the chosen)")
        elif c.passed:
            c.result = ("passed, not chosen: the comparison is incomplete (a device did not "
                        "finish)")
    return DeviceChoice(winner=winner, candidates=reports,
                        devices={d: r.to_dict() for d, r in rep.devices.items()},
                        max_drop=max_drop, rss_budget_mb=rss_budget_mb,
                        p95_budget_ms=p95_budget_ms, eval_samples=n_feeds * batch,
                        messages=messages)


def _figures(res: Mapping[str, Any], run: DeviceRun) -> dict[str, Any]:
    lat = res.get("latency_ms") or {}
    ops = res.get("ops") or {}
    return {"measured_by": res.get("measured_by"), "cached": bool(res.get("cached")),
            "job_id": res.get("cached_job_id") or run.job_id,
            "board": res.get("board") or run.board, "runtime": res.get("runtime"),
            "runtime_version": res.get("runtime_version"), "threads": res.get("threads"),
            "load_ms": res.get("load_ms"), "first_ms": res.get("first_ms"),
            "p50_ms": lat.get("p50"), "p95_ms": lat.get("p95"), "p99_ms": lat.get("p99"),
            "runs": lat.get("runs"), "peak_rss_mb": res.get("peak_rss_mb"),
            "golden_passed": (res.get("golden") or {}).get("passed"),
            "top_ops": [(o.get("op"), o.get("ms")) for o in (ops.get("ops") or [])[:3]]}


def stamp_bundle(src: str | os.PathLike, out: str | os.PathLike, entry: Mapping[str, Any], *,
                 key_path: str | os.PathLike | None,
                 report_extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``src`` again as ``out`` with ``manifest["device_profile"] = entry`` (and
    ``report_extra`` merged into ``report.json``), signed with ``key_path``."""
    from edgepack.host.build.package import write_bundle

    b = read_bundle(src)
    manifest = json.loads(b.manifest_bytes)
    manifest["device_profile"] = dict(entry)
    files = {name: b.read_member(name) for name in b.manifest["files"]}
    if report_extra and "report.json" in files:
        report = json.loads(files["report.json"])
        report.update(report_extra)
        files["report.json"] = json.dumps(report, indent=2, sort_keys=True,
                                          default=float).encode()
    from edgepack.host.keys import signer

    sign, _ = signer(key_path)
    return write_bundle(out, manifest, b.read_member(b.model_file), files, sign=sign)
