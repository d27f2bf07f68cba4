"""Profile bundles on real devices: the host side of the profile-job protocol.

``docs/protocol.md`` § Profile jobs. :func:`profile` (and :func:`profile_on_devices` under it)
publishes the bundles (the normal retained chunks) and the eval samples (the same way), sends
each device one signed job (``devices/{id}/jobs``, QoS 1, not retained, with a deadline; a
protocol v2 control message bound to that device, §8.6), and collects
``devices/{id}/results`` until every device said ``done`` or the deadline passed. A device that
goes silent (its last will says offline, or it just stops) gives a timeout with whatever results
arrived and a message saying so. Results are cached per board and runtime
(:mod:`~edgepack.host.fleet.profiling_cache`); letting devices choose the build's variant is
:mod:`~edgepack.host.fleet.profiling_choice`.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepack.agent.bundle import Bundle, read_bundle
from edgepack.agent.errors import DataError, EdgepackError, ProtocolError
from edgepack.agent.mqtt import BrokerConfig, parse_broker_url
from edgepack.agent.protocol import (
    MAX_EVAL_BYTES,
    JobBundle,
    ProfileJob,
    Topics,
    chunk_table_payload,
    decode,
    encode,
    parse_result,
)
from edgepack.agent.runtimes import FORMAT_RUNTIME
from edgepack.agent.trust import Target
from edgepack.agent.trust.errors import ReportRefused
from edgepack.host.fleet.client import SyncClient
from edgepack.host.fleet.identity import ReportVerifier
from edgepack.host.fleet.profiling_cache import ProfileCache, cache_key, default_cache_path

__all__ = [
    "MAX_EVAL_TARGET_BYTES",
    "DeviceRun",
    "ProfileCache",
    "ProfileReport",
    "bundle_info",
    "cache_key",
    "default_cache_path",
    "make_job",
    "publish_data",
    "sign_profile_job",
    "profile",
    "profile_on_devices",
]

#: eval samples of a signed (v2) job travel as a target through the chunked transfer: up to this
MAX_EVAL_TARGET_BYTES = 32 * 1024 * 1024
_DATA_CHUNK = 256 * 1024
_BATCH = 64  # publishes awaiting PUBACK at a time
_GRACE_S = 5.0  # after the deadline, for answers already on their way
_STATE_WAIT_S = 1.0  # retained device states arrive right after SUBACK; wait at most this


def make_job(bundles: Sequence[JobBundle], *, key_path: str | os.PathLike | None,
             timeout_s: float, runs: int = 50, warmup: int = 5, threads: int = 0,
             op_profile: bool = True, eval_npz: bytes | None = None,
             max_rss_mb: int | None = None, job_id: str | None = None) -> tuple[str, bytes]:
    """A v1 profile job: ``(job_id, payload)``, with a detached signature by ``key_path`` or
    unsigned. Only devices running with ``allow_unsigned`` accept it; :func:`sign_profile_job`
    makes the protocol v2 job every other device needs."""
    if eval_npz is not None and len(eval_npz) > MAX_EVAL_BYTES:
        raise DataError(f"eval samples for the device are {len(eval_npz)} bytes, over the "
                        f"{MAX_EVAL_BYTES} byte limit of a profile job; send fewer samples")
    job_id = job_id or _job_id()
    timeout = max(1, int(round(timeout_s)))
    job = ProfileJob(job_id=job_id, deadline=math.ceil(time.time() + timeout),
                     bundles=tuple(bundles),
                     runs=runs, warmup=warmup, threads=threads, op_profile=op_profile,
                     timeout_s=timeout, max_rss_mb=max_rss_mb, eval_npz=eval_npz)
    body = job.to_payload()
    if key_path is not None:
        from edgepack.agent.signing import canonical_json
        from edgepack.host.keys import load_private_key, sign_bytes

        body["sig"] = sign_bytes(canonical_json(body), load_private_key(key_path))
    return job_id, encode(body)


def sign_profile_job(bundles: Sequence[JobBundle], *, key_path: str | os.PathLike,
                     device: str, fleet: str, timeout_s: float, runs: int = 50,
                     warmup: int = 5, threads: int = 0, op_profile: bool = True,
                     eval_target: Target | None = None, max_rss_mb: int | None = None,
                     job_id: str | None = None) -> tuple[str, bytes]:
    """A profile job as a protocol v2 control message (kind ``job``) for ``device``:
    ``(job_id, payload)``. The bundles (``bytes`` required) and the eval samples are its
    targets, named by sha256 and length; the device fetches them with the chunked transfer."""
    from tuf.api.metadata import Metadata  # noqa: F401 - imported before the deadline starts

    from edgepack.host.fleet.keyring import load_signer
    from edgepack.host.fleet.trust import sign_job

    signer = load_signer(key_path)
    job_id = job_id or _job_id()
    timeout = max(1, int(round(timeout_s)))
    job = ProfileJob(job_id=job_id, deadline=math.ceil(time.time() + timeout),
                     bundles=tuple(bundles),
                     runs=runs, warmup=warmup, threads=threads, op_profile=op_profile,
                     timeout_s=timeout, max_rss_mb=max_rss_mb).to_payload()
    targets = [Target(b.bundle_id, int(b.bytes or 0)) for b in bundles]
    if eval_target is not None:
        job["eval"] = {"sha256": eval_target.bundle_id, "bytes": eval_target.length}
        targets.append(eval_target)
    else:
        job.pop("eval", None)
    payload = sign_job(signer, fleet, device=device, job=job, targets=targets,
                       lifetime_s=timeout)
    return job_id, payload


def _job_id() -> str:
    return f"prof-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def publish_data(client: SyncClient, data: bytes, *, fleet: str,
                 key_path: str | os.PathLike | None, kind: str = "eval",
                 chunk_size: int = _DATA_CHUNK) -> Target:
    """Put ``data`` (eval samples) on the broker like a bundle — retained chunks, then a signed
    chunk table on ``bundles/{sha256}/manifest`` — and return it as a job target."""
    from edgepack.agent.signing import canonical_json
    from edgepack.host.keys import signer

    sign, _ = signer(key_path)
    topics = Topics(fleet)
    digest = hashlib.sha256(data).hexdigest()
    chunks = [data[i:i + chunk_size] for i in range(0, len(data), chunk_size)]
    table = chunk_table_payload(digest, len(data), chunk_size,
                                [hashlib.sha256(c).hexdigest() for c in chunks])
    for start in range(0, len(chunks), _BATCH):
        client.wait_published([client.publish(topics.bundle_chunk(digest, i), chunks[i], qos=1,
                                               retain=True, wait=False)
                               for i in range(start, min(start + _BATCH, len(chunks)))])
    msg = {**table, "manifest": {"kind": kind, "format": "npz"}, "signature": None,
           "table_sig": sign(canonical_json(table)) if sign is not None else None}
    client.publish(topics.bundle_manifest(digest), encode(msg), qos=1, retain=True)
    return Target(digest, len(data), kind)


def unpublish_data(client: SyncClient, target: Target, *, fleet: str,
                   chunk_size: int = _DATA_CHUNK) -> None:
    """Clear the retained messages :func:`publish_data` left (the table first)."""
    topics = Topics(fleet)
    client.publish(topics.bundle_manifest(target.bundle_id), b"", qos=1, retain=True)
    n = -(-target.length // chunk_size)
    for start in range(0, n, _BATCH):
        client.wait_published([client.publish(topics.bundle_chunk(target.bundle_id, i), b"",
                                              qos=1, retain=True, wait=False)
                               for i in range(start, min(start + _BATCH, n))])


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
    verified: bool = False  # its messages were checked against its enrolled device key
    refused_reports: int = 0  # messages on its topics that its enrolled key did not sign

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


def bundle_info(path: str | os.PathLike, label: str | None = None) -> dict[str, Any]:
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
                       on_message: Callable[[str, dict], None] | None = None,
                       device_keys: Mapping[str, Any] | None = None) -> ProfileReport:
    """Measure bundle files on devices; return every device's figures per bundle.

    ``bundles`` are paths, or ``(label, path)`` pairs. Devices that report the same board and
    runtime version are measured once (the first one online measures for the others), and
    results in ``cache`` are not measured again. ``timeout`` bounds the whole job on the
    device (its deadline); the host waits a few seconds longer for answers in flight.
    ``on_message(device, message)`` sees every result message as it arrives (progress).

    ``device_keys`` (device id → its enrollment ``{"keyid", "key"}``, e.g. from
    :func:`~edgepack.host.fleet.identity.inventory_keys`): the state and result messages of
    those devices count only when their enrolled key signed them (the others are counted in
    ``refused_reports``); a device with no key is measured unverified (``verified`` False).
    """
    started = time.monotonic()
    infos = list({i["bundle_id"]: i for i in (
        bundle_info(b[1], b[0]) if isinstance(b, tuple) else bundle_info(b)
        for b in bundles)}.values())  # the same bundle twice is measured once
    if not devices:
        raise EdgepackError("name at least one device to profile on: pass `device=`",
                            field="device")
    topics = Topics(fleet)
    for d in devices:
        topics.jobs(d)  # an invalid device id fails here, before anything is published
    cfg = _config(broker)
    cache = cache if cache is not None else ProfileCache(None)
    eval_fp = hashlib.sha256(eval_npz).hexdigest()[:16] if eval_npz is not None else None
    keys = {d: k for d, k in (device_keys or {}).items() if d in devices}
    runs_by_dev = {d: DeviceRun(device=d, verified=d in keys) for d in dict.fromkeys(devices)}
    check = _Checker(ReportVerifier(keys) if keys else None, runs_by_dev)
    with SyncClient(cfg, timeout=max(30.0, timeout)) as client:
        states = _read_states(client, topics, list(runs_by_dev), check)
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
        eval_target = None
        if plans and eval_npz is not None and key_path is not None:
            if len(eval_npz) > MAX_EVAL_TARGET_BYTES:
                raise DataError(f"eval samples for the device are {len(eval_npz)} bytes, over "
                                f"the {MAX_EVAL_TARGET_BYTES} byte limit; send fewer samples")
            eval_target = publish_data(client, eval_npz, fleet=fleet, key_path=key_path)
        jobs = {}
        for d, todo in plans.items():
            jb = [JobBundle(i["bundle_id"], bytes=i["bytes"], label=i["label"][:64]) for i in todo]
            opts = dict(timeout_s=timeout, runs=runs, warmup=warmup, threads=threads,
                        op_profile=op_profile, max_rss_mb=max_rss_mb)
            if key_path is not None:  # protocol v2: bound to the device, versioned
                jobs[d] = sign_profile_job(jb, key_path=key_path, device=d, fleet=fleet,
                                           eval_target=eval_target, **opts)
            else:  # unsigned (v1): only devices with allow_unsigned run it
                jobs[d] = make_job(jb, key_path=None, eval_npz=eval_npz, **opts)
        try:
            if jobs:
                _run_jobs(client, topics, jobs, {d: runs_by_dev[d] for d in jobs}, timeout,
                          {d: [i["bundle_id"] for i in plans[d]] for d in jobs}, on_message,
                          check)
        finally:
            if eval_target is not None:
                unpublish_data(client, eval_target, fleet=fleet)

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


class _Checker:
    """Drops messages an enrolled device's key did not sign, counting them on its run."""

    def __init__(self, verifier: ReportVerifier | None, runs: Mapping[str, DeviceRun]) -> None:
        self.verifier = verifier
        self.runs = runs

    def authentic(self, device: str, payload: bytes) -> bool:
        if self.verifier is None or device not in self.verifier.inventory:
            return True
        try:
            self.verifier.verify(payload, topic_device=device)
        except ReportRefused:
            if device in self.runs:
                self.runs[device].refused_reports += 1
            return False
        return True


def _read_states(client: SyncClient, topics: Topics, devices: list[str],
                 check: _Checker) -> dict[str, dict]:
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
            if leaf == "state" and dev in devices and check.authentic(dev, payload):
                out[dev] = decode(payload, "device state")
        except ProtocolError:
            continue
    return out


def _run_jobs(client: SyncClient, topics: Topics, jobs: Mapping[str, tuple[str, bytes]],
              runs: Mapping[str, DeviceRun], timeout: float, expected: Mapping[str, list[str]],
              on_message: Callable[[str, dict], None] | None, check: _Checker) -> None:
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
        if run is None or not check.authentic(dev, payload):
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


def profile(bundles: str | os.PathLike | Sequence[str | os.PathLike], *,
            device: str | Sequence[str], broker: str | BrokerConfig,
            key: str | os.PathLike | None = None, fleet: str = "default", runs: int = 50,
            warmup: int = 5, threads: int = 0, op_profile: bool = True,
            timeout: float = 300.0, max_rss_mb: int | None = None,
            cache: ProfileCache | str | os.PathLike | None = None,
            on_message: Callable[[str, dict], None] | None = None,
            device_keys: Mapping[str, Any] | None = None) -> ProfileReport:
    """Measure bundle file(s) on device(s): load, first inference, p50/p95/p99, peak RSS, golden
    outputs and the slowest operators, per device and bundle.

    ``device_keys``: see :func:`profile_on_devices` (results of enrolled devices count only
    when their device key signed them).

    ``key`` (the fleet private key) signs the job — a protocol v2 control message for each
    device — and the published chunk tables: devices refuse unsigned jobs unless they allow
    unsigned bundles. ``cache`` is a
    :class:`ProfileCache`, a cache file, or None for the default file
    (``~/.cache/edgepack/profiles.json``); pass ``ProfileCache(None)`` to measure again and
    store nothing. ``timeout`` is the job's deadline on the device, in seconds.
    """
    paths = [bundles] if isinstance(bundles, str | os.PathLike) else list(bundles)
    devices = [device] if isinstance(device, str) else list(device)
    if cache is None:
        cache = ProfileCache.default()
    elif not isinstance(cache, ProfileCache):
        cache = ProfileCache(cache)
    return profile_on_devices(paths, devices, broker=broker, key_path=key, fleet=fleet,
                              runs=runs, warmup=warmup, threads=threads, op_profile=op_profile,
                              timeout=timeout, cache=cache, max_rss_mb=max_rss_mb,
                              on_message=on_message, device_keys=device_keys)
