"""Profile jobs: measure candidate bundles on this device, without touching the active model.

The host publishes a signed job on ``devices/{id}/jobs`` naming published bundles
(``docs/protocol.md`` § Profile jobs). With protocol v2 a job is a control message of kind
``job`` for this one device (``docs/protocol.md`` §9): the agent's trust gate checks its
signature, addressee, expiry and version, and records the version in the trust ledger *before*
the job runs, so a replayed job — or the same job delivered again after an agent restart — is
refused instead of run twice. The bundles and the eval samples are the message's targets (sha256
and length), fetched with the chunked transfer: the samples are not inline, so their size is
bounded by the transfer limits, not by the job message.

The agent loop hands every job message to a :class:`Profiler`: it verifies the job in the
loop's thread (the gate is not shared across threads), then the profiler's own thread works,
one job at a time:

1. admit: refuse duplicates, expired jobs, and jobs that arrive while an install is in progress
   or while free RAM or disk is short (an unverified job is refused before this, and becomes a
   ``control_refused`` event as well);
2. fetch the eval samples when the job names them (an npz target), then for each bundle:
   fetch it with the normal :class:`~edgepack.agent.transfer.Transfer` into a scratch
   directory (``{data_dir}/profiling``, never a slot), verify its signature, unpack it, and
   measure it in a child process (``python -m edgepack.agent.measure``) at lower priority
   (``nice`` 10), killed when it outgrows the memory bound, when the job's deadline comes, or
   when an install starts (installs always win);
3. answer on ``devices/{id}/results`` through the agent's outbox: ``accepted``, ``progress``,
   one ``result`` per bundle (partial figures when a measurement was cut short), ``done``.

What the child measures: :mod:`edgepack.agent.measure` (re-exported here for callers of the
former single module).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edgepack.agent.errors import BundleError, ProtocolError, SignatureError
from edgepack.agent.measure import NICE, MeasureOptions, measure_bundle, summarize_ort_trace
from edgepack.agent.protocol import (
    MAX_JSON_BYTES,
    JobBundle,
    ProfileJob,
    Topics,
    encode,
    job_signed_part,
    parse_profile_job,
)
from edgepack.agent.signing import canonical_json, verify_detached
from edgepack.agent.trust import ControlRefused, Reason, Target

__all__ = ["Profiler", "MeasureOptions", "measure_bundle", "summarize_ort_trace"]

log = logging.getLogger("edgepack.agent.profiler")
_MB = 1024 * 1024
RAM_RESERVE_MB = 128  # refuse a job when less than this (plus its max_rss_mb) is available
_SEEN_JOBS = 256


# trust reasons that say "the signature does not hold" to the host (the event keeps the precise one)
_SIGNATURE_REASONS = (Reason.UNSIGNED, Reason.BAD_SIGNATURE, Reason.UNKNOWN_KEY,
                      Reason.WRONG_ROLE, Reason.THRESHOLD_NOT_MET, Reason.WRONG_DEVICE,
                      Reason.WRONG_FLEET)


@dataclass(frozen=True)
class _Job:
    """A job that passed the trust gate (or, in development, the v1 checks)."""

    job: ProfileJob
    eval_target: Target | None = None  # v2: the eval npz, fetched by hash and length


class _Stopped(Exception):
    """The agent is shutting down."""


class _Failed(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class Profiler:
    """Runs profile jobs for the agent, one at a time, in its own thread.

    The agent loop calls :meth:`wants`, :meth:`on_message`, :meth:`on_connected`,
    :meth:`on_disconnected` and :meth:`close`; they only hand things over. ``link`` is the
    agent's connection (subscribe/unsubscribe are thread-safe); ``emit(topic, body)`` queues an
    outgoing message for the agent loop, which owns the outbox; ``busy()`` is true while an
    install is in progress.
    """

    def __init__(self, cfg: Any, topics: Topics, *, link: Any, keys: Mapping[str, Any],
                 emit: Callable[[str, dict], None], busy: Callable[[], bool],
                 gate: Any = None,
                 refused: Callable[[str, str, ControlRefused], None] | None = None) -> None:
        self.cfg = cfg
        self.topics = topics
        self.link = link
        self.keys = keys
        self.emit = emit
        self.busy = busy
        self.gate = gate  # the agent's DesiredGate (None: v1 jobs only, as before v2)
        self.refused = refused  # the agent's control_refused event (topic, kind, exc)
        self.jobs_topic = topics.jobs(cfg.device_id)
        self.results_topic = topics.results(cfg.device_id)
        self.root = Path(cfg.data_dir) / "profiling"
        self._q: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._transfer: Any = None
        self._connected = False
        self._seen: OrderedDict[str, None] = OrderedDict()

    # ---- called from the agent loop: never blocks
    def wants(self, topic: str) -> bool:
        tr = self._transfer
        return topic == self.jobs_topic or (tr is not None and tr.wants(topic))

    def on_message(self, topic: str, payload: bytes) -> None:
        if topic == self.jobs_topic:
            job = self._verify(payload)
            if job is None:
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="edgepack-profiler",
                                                daemon=True)
                self._thread.start()
            self._q.put(("job", job))
        elif self._thread is not None:
            self._q.put(("msg", topic, payload))

    def on_connected(self) -> None:
        self._connected = True
        if self._thread is not None:
            self._q.put(("conn", True))

    def on_disconnected(self) -> None:
        self._connected = False
        if self._thread is not None:
            self._q.put(("conn", False))

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker: a running measurement is killed, scratch files removed."""
        self._q.put(("stop",))
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- worker thread
    def _run(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)  # leftovers of a crash
        while True:
            item = self._q.get()
            if item[0] == "stop":
                return
            if item[0] != "job":
                continue
            try:
                job = self._admit(item[1])
                if job is not None:
                    self._run_job(job)
            except _Stopped:
                return
            except Exception:  # noqa: BLE001 - a bug in one job must not end profiling
                log.exception("profile job failed")
            finally:
                self._transfer = None
                shutil.rmtree(self.root, ignore_errors=True)

    def _send(self, job_id: str, kind: str, **body: Any) -> None:
        self.emit(self.results_topic, {"job_id": job_id, "kind": kind,
                                       "device_id": self.cfg.device_id, **body})

    def _refuse(self, job_id: str, reason: str, detail: str) -> None:
        log.warning("profile job %s refused (%s): %s", job_id, reason, detail)
        self._send(job_id, "refused", reason=reason, detail=detail)

    def _verify(self, payload: bytes) -> _Job | None:
        """Check a job's signature (in the agent loop's thread); refuse it (None) otherwise."""
        if self.gate is not None and (self.gate.enforcing or _looks_v2(payload)):
            return self._verify_v2(payload)
        try:
            job = parse_profile_job(payload)
        except ProtocolError as exc:
            self._refuse(_raw_job_id(payload), "malformed", str(exc))
            return None
        if job.sig is not None and (self.keys or not self.cfg.allow_unsigned):
            try:
                doc = json.loads(payload)
                verify_detached(canonical_json(job_signed_part(doc)), job.sig, self.keys,
                                what="profile job")
            except SignatureError as exc:
                self._refuse(job.job_id, "signature", str(exc))
                return None
        elif job.sig is None and not self.cfg.allow_unsigned:
            self._refuse(job.job_id, "signature", "the profile job is not signed; sign it with "
                         "the fleet key (`key=`)")
            return None
        return _Job(job)

    def _verify_v2(self, payload: bytes) -> _Job | None:
        """A v2 job: the gate verifies and records it; its targets bind bundles and samples."""
        job_id = _raw_job_id(payload)
        if not _looks_v2(payload):
            exc = ControlRefused("the profile job is not signed as a protocol v2 control "
                                 "message (a v1 detached signature binds no device and no "
                                 "version): sign it with the fleet key (`key=`)",
                                 reason=Reason.UNSIGNED, kind="job")
            return self._refuse_control(job_id, exc)
        try:
            v = self.gate.job(payload)
        except ControlRefused as exc:
            return self._refuse_control(job_id, exc)
        if not v.new:
            self._refuse(job_id, "duplicate", f"job v{v.version} was already received (a "
                         "redelivery or a replay); it does not run again")
            return None
        doc = v.fields.get("job")
        if not isinstance(doc, Mapping):
            return self._refuse_control(job_id, ControlRefused(
                "the job message lacks its 'job' object", reason=Reason.MALFORMED, kind="job"))
        doc = dict(doc)
        eval_ref = doc.pop("eval", None)
        try:
            job = parse_profile_job(encode({k: v for k, v in doc.items() if k != "sig"}))
        except ProtocolError as exc:
            self._refuse(job_id, "malformed", str(exc))
            return None
        targets = {t.bundle_id: t for t in v.targets}
        bundles = []
        for b in job.bundles:
            t = targets.get(b.bundle_id)
            if t is None:
                self._refuse(job.job_id, "malformed", f"bundle {b.bundle_id[:12]} is not among "
                             "the job's signed targets")
                return None
            bundles.append(replace(b, bytes=t.length))
        eval_target = None
        if eval_ref is not None:
            digest = eval_ref.get("sha256") if isinstance(eval_ref, Mapping) else None
            eval_target = targets.get(digest) if isinstance(digest, str) else None
            if eval_target is None:
                self._refuse(job.job_id, "malformed", "the job's eval samples are not among its "
                             "signed targets")
                return None
        return _Job(replace(job, bundles=tuple(bundles)), eval_target)

    def _refuse_control(self, job_id: str, exc: ControlRefused) -> None:
        reason = "signature" if exc.reason in _SIGNATURE_REASONS else exc.reason
        hint = (": that key is not trusted by this device" if exc.reason == Reason.UNKNOWN_KEY
                else "")
        self._refuse(job_id, reason, f"{exc}{hint}")
        if self.refused is not None:
            self.refused(self.jobs_topic, "job", exc)
        return None

    def _admit(self, item: _Job, running: str | None = None) -> _Job | None:
        """Check a verified job; refuse it (and return None) unless it may run now."""
        job = item.job
        if job.job_id in self._seen:
            self._refuse(job.job_id, "duplicate", "this job id was already received")
            return None
        self._seen[job.job_id] = None
        while len(self._seen) > _SEEN_JOBS:
            self._seen.popitem(last=False)
        now = time.time()
        if now >= job.deadline:
            self._refuse(job.job_id, "expired", f"the job's deadline passed {now - job.deadline:.0f}"
                         "s ago (was the device offline? is its clock right?)")
            return None
        if running is not None:
            self._refuse(job.job_id, "busy", f"profile job {running} is running; try again later")
            return None
        if self.busy():
            self._refuse(job.job_id, "busy", "an install is in progress on this device; profile "
                         "after it finished")
            return None
        import psutil

        avail = psutil.virtual_memory().available / _MB
        need = RAM_RESERVE_MB + (job.max_rss_mb or 0)
        if avail < need:
            self._refuse(job.job_id, "memory", f"{avail:.0f} MB of RAM available, {need:.0f} MB "
                         "needed (reserve + the job's max_rss_mb): measuring could starve the "
                         "device")
            return None
        self.root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.root).free / _MB
        biggest = max((b.bytes or 0 for b in job.bundles), default=0) / _MB
        samples = (item.eval_target.length if item.eval_target else 0) / _MB
        need_disk = self.cfg.transfer.min_free_mb + 2 * biggest + samples
        if free < need_disk:
            self._refuse(job.job_id, "disk", f"{free:.0f} MB of disk free, {need_disk:.0f} MB "
                         "needed (download + unpack + eval samples + transfer.min_free_mb)")
            return None
        return item

    def _pump(self, timeout: float, job_id: str) -> None:
        """Handle what the agent loop handed over while a job runs."""
        try:
            item = self._q.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            kind = item[0]
            if kind == "stop":
                raise _Stopped
            tr = self._transfer
            if kind == "job":
                self._admit(item[1], running=job_id)
            elif kind == "msg" and tr is not None and tr.wants(item[1]):
                tr.on_message(item[1], item[2])
            elif kind == "conn" and tr is not None:
                if item[1]:
                    tr.on_connected()
                else:
                    tr.on_disconnected()
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                return

    def _run_job(self, item: _Job) -> None:
        from edgepack.agent.runtimes import available_runtimes, runtime_version

        job = item.job
        started = time.monotonic()
        allowed = max(0.0, min(float(job.timeout_s), job.deadline - time.time()))
        # Leave time to send the answers before the host stops listening.
        end = started + allowed - min(2.0, 0.1 * allowed)
        work = self.root / job.job_id
        work.mkdir(parents=True, exist_ok=True)
        eval_path = None
        if job.eval_npz is not None:
            eval_path = work / "eval.npz"
            eval_path.write_bytes(job.eval_npz)
        self._send(job.job_id, "accepted", board=self.cfg.board, target=self.cfg.target,
                   runtimes={n: runtime_version(n) for n in available_runtimes()},
                   cpu=_cpu_model(), cores=os.cpu_count(), deadline=job.deadline,
                   bundles=[b.bundle_id for b in job.bundles])
        log.info("profile job %s: %d bundle(s), %d runs", job.job_id, len(job.bundles), job.runs)
        eval_failed = None
        if item.eval_target is not None:
            self._send(job.job_id, "progress", stage="downloading eval samples")
            try:
                eval_path = self._fetch_eval(job, item.eval_target, end, work)
            except _Failed as f:
                eval_failed = {"status": "failed", "reason": f.reason,
                               "detail": f"the eval samples could not be fetched: {f.detail}"}
        summary = []
        for i, b in enumerate(job.bundles):
            left = end - time.monotonic()
            base = {"index": i, "bundle_id": b.bundle_id, "label": b.label,
                    "board": self.cfg.board, "target": self.cfg.target}
            if eval_failed is not None:
                res = {**base, **eval_failed}
            elif left <= 0:
                res = {**base, "status": "skipped", "reason": "deadline",
                       "detail": "the job's deadline came before this bundle's turn"}
            elif self.busy():
                res = {**base, "status": "skipped", "reason": "busy",
                       "detail": "an install started; profiling yields to it"}
            else:
                res = self._profile_one(job, b, base, end, left / (len(job.bundles) - i),
                                        work, eval_path)
            self._send(job.job_id, "result", **res)
            summary.append({"bundle_id": b.bundle_id, "status": res["status"],
                            "reason": res.get("reason")})
        complete = all(s["status"] == "ok" for s in summary)
        self._send(job.job_id, "done", status="complete" if complete else "partial",
                   results=summary, seconds=round(time.monotonic() - started, 3))
        log.info("profile job %s done (%s)", job.job_id, "complete" if complete else "partial")

    def _profile_one(self, job: ProfileJob, b: JobBundle, base: dict, end: float, share: float,
                     work: Path, eval_path: Path | None) -> dict[str, Any]:
        t0 = time.monotonic()
        self._send(job.job_id, "progress", bundle_id=b.bundle_id, stage="downloading")
        tr = None
        bdir = work / b.bundle_id[:16]
        try:
            tr = self._download(job, b.bundle_id, end)
            dl = {"bytes": tr.stats.bytes, "seconds": round(time.monotonic() - t0, 3)}
            from edgepack.agent.bundle import read_bundle

            try:
                bundle = read_bundle(tr.result_path, bundle_id=b.bundle_id)
                bundle.verify(self.keys, allow_unsigned=self.cfg.allow_unsigned)
                bundle.extract(bdir)
            except BundleError as exc:
                raise _Failed("rejected", str(exc)) from None
            self._check_runtime(bundle.manifest)
            tr.cleanup()  # the unpacked copy is all the measurement needs
            self._send(job.job_id, "progress", bundle_id=b.bundle_id, stage="measuring")
            res = self._measure(job, bdir, end, share, eval_path)
            res["download"] = dl
        except _Failed as f:
            res = {"status": "failed", "reason": f.reason, "detail": f.detail}
        finally:
            self._transfer = None
            if tr is not None:
                tr.cleanup()
            shutil.rmtree(bdir, ignore_errors=True)
        res["seconds"] = round(time.monotonic() - t0, 3)
        return {**base, **res}

    def _check_runtime(self, manifest: Mapping[str, Any]) -> None:
        from edgepack.agent.runtimes import FORMAT_RUNTIME, available_runtimes

        fmt = (manifest.get("model") or {}).get("format")
        runtime = (manifest.get("runtime") or {}).get("name") or FORMAT_RUNTIME.get(fmt or "")
        if runtime not in available_runtimes():
            raise _Failed("runtime", f"bundle needs runtime {runtime!r} (format {fmt!r}), which "
                          f"this device does not have (available: "
                          f"{', '.join(available_runtimes()) or 'none'})")

    def _fetch_eval(self, job: ProfileJob, target: Target, end: float, work: Path) -> Path:
        """Fetch the job's eval npz (a target: sha256 and length signed in the job)."""
        from edgepack.agent.transfer import Rejected

        def precheck(table: Any) -> None:
            if table.bytes != target.length:
                raise Rejected(f"the published eval samples are {table.bytes} bytes, the job "
                               f"names {target.length}", reason="length",
                               bundle_id=target.bundle_id)

        tr = self._download(job, target.bundle_id, end, precheck)
        path = work / "eval.npz"
        os.replace(tr.result_path, path)
        tr.cleanup()
        return path

    def _download(self, job: ProfileJob, bundle_id: str, end: float,
                  precheck: Callable[[Any], None] | None = None) -> Any:
        from edgepack.agent.transfer import Rejected, Transfer

        t = self.cfg.transfer

        def runtime_check(table: Any) -> None:
            try:
                self._check_runtime(table.manifest)
            except _Failed as f:
                raise Rejected(f.detail, reason="runtime", bundle_id=bundle_id) from None

        tr = Transfer(bundle_id, topics=self.topics, directory=self.root / "downloads",
                      link=self.link, keys=self.keys, allow_unsigned=self.cfg.allow_unsigned,
                      window=t.window, chunk_timeout_s=t.chunk_timeout_s,
                      manifest_timeout_s=t.manifest_timeout_s, max_bundle_mb=t.max_bundle_mb,
                      min_free_mb=t.min_free_mb, precheck=precheck or runtime_check)
        self._transfer = tr
        tr.start(self._connected)
        while not tr.done:
            self._pump(0.1, job.job_id)
            tr.tick()
            if time.monotonic() > end:
                tr.cancel()
                tr.cleanup()
                raise _Failed("deadline", f"the job's deadline came while downloading bundle "
                              f"{bundle_id[:12]} ({tr.stats.chunks_done}/{tr.stats.chunks_total} "
                              "chunks)")
            if self.busy():
                tr.cancel()
                tr.cleanup()
                raise _Failed("busy", "an install started; profiling yields to it")
        self._transfer = None
        if tr.state != "done":
            exc = tr.error
            reason = getattr(exc, "reason", None)
            tr.cleanup()
            raise _Failed("runtime" if reason == "runtime" else
                          f"rejected:{reason}" if reason else "transfer", str(exc))
        return tr

    def _measure(self, job: ProfileJob, bdir: Path, end: float, share: float,
                 eval_path: Path | None) -> dict[str, Any]:
        import psutil

        out = bdir / "profile.json"
        err = bdir / "profile.stderr"
        threads = job.threads or self.cfg.runtime.threads
        cmd = [sys.executable, "-I", "-m", "edgepack.agent.measure", str(bdir),  # -I: no cwd
               "--out", str(out), "--runs", str(job.runs), "--warmup", str(job.warmup), "--threads", str(threads),
               "--nice", str(NICE), "--max-timing-s", f"{max(0.5, min(120.0, 0.4 * share)):.2f}"]
        if eval_path is not None:
            cmd += ["--eval", str(eval_path)]
        if not job.op_profile:
            cmd.append("--no-ops")
        avail = psutil.virtual_memory().available / _MB
        # Python + numpy + a runtime alone take ~60-80 MB: below 96 MB nothing could run.
        bound = float(job.max_rss_mb or max(96.0, 0.8 * avail - RAM_RESERVE_MB))
        with open(err, "wb") as errf:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errf,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        reason = None
        seen_mb = 0.0
        try:
            ps = psutil.Process(proc.pid)
            while proc.poll() is None:
                self._pump(0.05, job.job_id)
                with contextlib.suppress(psutil.Error):
                    seen_mb = max(seen_mb, ps.memory_info().rss / _MB)
                if seen_mb > bound:
                    reason = "memory"
                elif time.monotonic() > end:
                    reason = "deadline"
                elif self.busy():
                    reason = "busy"
                if reason:
                    break
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        try:
            figures = json.loads(out.read_text())
        except (OSError, ValueError):
            figures = {}
        stage = figures.get("stage", "none")
        if reason is None and proc.returncode == 0 and stage == "done":
            return {"status": "ok", **figures}
        if reason == "memory":
            detail = (f"the measurement grew to {seen_mb:.0f} MB, over its bound of {bound:.0f} "
                      "MB (the job's max_rss_mb, or 80% of the free RAM); it was killed")
        elif reason == "deadline":
            detail = ("the job's deadline came during the measurement"
                      + ("; figures so far are included" if stage not in ("none", "start")
                         else ", before the model was loaded: give the job more time"))
        elif reason == "busy":
            detail = "an install started; the measurement was stopped (installs have priority)"
        elif figures.get("error"):
            reason = "load" if stage == "start" else "error"
            detail = figures["error"]
        else:
            reason = "crash"
            tail = err.read_text(errors="replace").strip().splitlines()[-3:] if err.exists() \
                else []
            how = (f"was killed by signal {-proc.returncode}" if proc.returncode < 0
                   else f"exited with status {proc.returncode}")
            detail = f"the measurement process {how}" + (f": {' | '.join(tail)}" if tail else "")
        figures.pop("error", None)
        measured = stage not in ("none", "start")
        return {"status": "partial" if measured else "failed", "reason": reason,
                "detail": detail, **figures}


def _looks_v2(payload: bytes) -> bool:
    """A v2 control message (signed metadata) rather than a v1 job object."""
    return payload.lstrip()[:1] == b"{" and b'"signed"' in payload[:MAX_JSON_BYTES]


def _raw_job_id(payload: bytes) -> str:
    """The job id of a message that failed its checks (for the refusal), or ``unknown``."""
    with contextlib.suppress(Exception):
        raw = json.loads(payload[:MAX_JSON_BYTES])
        if isinstance(raw, dict) and isinstance(raw.get("signed"), dict):
            raw = ((raw["signed"].get("edgepack") or {}).get("job")) or {}
        if isinstance(raw, dict) and isinstance(raw.get("job_id"), str):
            return raw["job_id"][:128]
    return "unknown"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model", "Hardware")):
                return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or platform.machine()

